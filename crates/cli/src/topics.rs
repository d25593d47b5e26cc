//! `warren topics`, `warren peek <topic>` and `warren status <id|cid>`: what operators ask
//! about publish/subscribe and about what became of a task.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;
use warren_admin::queues::warren_queues;
use warren_core::patterns::utc_timestamp;
use warren_core::status::{RedisStore, StatusStore, TaskStatus};
use warren_core::Broker;

use crate::opts::Global;

/// `warren topics` options.
#[derive(Debug, Args)]
pub struct TopicsArgs {
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
}

/// `warren peek` options.
#[derive(Debug, Args)]
pub struct PeekArgs {
    /// The topic
    topic: String,
    /// How many of the most recent messages to show (at most 100 are kept)
    #[arg(short = 'n', long, default_value_t = 10)]
    last: usize,
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
}

/// `warren status` options.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// A task id (UUID) or a correlation id
    id_or_cid: String,
    /// Redis URL of the status store [default: redis://127.0.0.1:6379/]
    #[arg(
        long,
        env = "WARREN_REDIS_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    redis: Option<String>,
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
}

pub(crate) fn store(url: Option<&str>) -> anyhow::Result<Arc<dyn StatusStore>> {
    let store = match url {
        Some(u) => RedisStore::new(u, warren_core::status::DEFAULT_RETENTION)?,
        None => RedisStore::from_env()?,
    };
    Ok(Arc::new(store.with_timeout(Duration::from_secs(2))))
}

/// `warren topics`: topics and their subscriptions. Queue names come from the management
/// API (or rabbitmqctl on the broker's machine); ready and consumer counts from passive
/// declares, which are exact; published counts from the status store, when reachable.
pub async fn run_topics(global: &Global, args: &TopicsArgs) -> anyhow::Result<ExitCode> {
    let broker = Broker::connect(global.amqp("warren topics")?)
        .await
        .context("cannot connect to the broker")?;
    let (vhost, _) = broker.identity().await?;
    let mgmt = global.management().await?;
    let listing = warren_queues(mgmt.as_ref(), &vhost, global.broker_is_local()).await;
    let listing = match listing {
        Ok(l) => l,
        Err(e) => {
            broker.close().await;
            bail!("warren topics: {e}");
        }
    };
    let store = store(None).ok();
    let topics =
        warren_admin::topics::topics(&listing.queues, Some(&broker), store.as_deref()).await;
    broker.close().await;
    let topics = topics?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&topics)?);
        return Ok(ExitCode::SUCCESS);
    }
    if topics.is_empty() {
        println!("no topics on vhost {vhost}");
        return Ok(ExitCode::SUCCESS);
    }
    let n = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    println!(
        "{:<32} {:>10} {:>7}  {:<40} {:>8} {:>8} {:>5} {:>6}",
        "TOPIC", "PUBLISHED", "RECENT", "SUBSCRIBER", "PENDING", "UNACKED", "CONS", "DEAD"
    );
    for t in &topics {
        if t.subscribers.is_empty() {
            println!(
                "{:<32} {:>10} {:>7}  {:<40}",
                t.topic,
                n(t.published),
                n(t.recent),
                "(no subscribers)"
            );
        }
        for (i, s) in t.subscribers.iter().enumerate() {
            let (name, published, recent) = if i == 0 {
                (t.topic.as_str(), n(t.published), n(t.recent))
            } else {
                ("", String::new(), String::new())
            };
            println!(
                "{name:<32} {published:>10} {recent:>7}  {:<40} {:>8} {:>8} {:>5} {:>6}",
                s.target,
                n(s.pending),
                n(s.unacked),
                n(s.consumers),
                n(s.dead)
            );
        }
    }
    if store.is_none() {
        println!("(published counts need the status store: set WARREN_REDIS_URL)");
    }
    Ok(ExitCode::SUCCESS)
}

/// `warren peek <topic>`: the last messages published to a topic, read from its recent
/// queue without removing them.
pub async fn run_peek(global: &Global, args: &PeekArgs) -> anyhow::Result<ExitCode> {
    warren_core::names::validate_name("topic", &args.topic)?;
    let broker = Broker::connect(global.amqp("warren peek")?)
        .await
        .context("cannot connect to the broker")?;
    let peeked = warren_admin::topics::peek(&broker, &args.topic, args.last).await;
    broker.close().await;
    let Some(peek) = peeked? else {
        bail!(
            "no topic {:?}: nothing was ever published to it",
            args.topic
        );
    };
    let msgs = &peek.messages;
    if args.json {
        println!("{}", serde_json::to_string_pretty(msgs)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} of {} recent messages on {} (oldest first)",
        msgs.len(),
        peek.total,
        args.topic
    );
    for m in msgs {
        let mut payload = m.payload.to_string();
        if payload.len() > 80 {
            let mut cut = 77;
            while !payload.is_char_boundary(cut) {
                cut -= 1;
            }
            payload.truncate(cut);
            payload.push_str("...");
        }
        println!(
            "{}  {:<36}  cid {:<24}  {payload}",
            m.published_at.as_deref().unwrap_or("-"),
            m.id.as_deref().unwrap_or("-"),
            m.cid.as_deref().unwrap_or("-"),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `warren status <id|cid>`: a task's status, or every task of a cid, from the store.
pub async fn run_status(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let store = store(args.redis.as_deref())?;
    let statuses: Vec<TaskStatus> = match uuid::Uuid::parse_str(&args.id_or_cid) {
        Ok(id) => match store.get(id).await? {
            Some(s) => vec![s],
            None => store.by_cid(&args.id_or_cid).await?,
        },
        Err(_) => store.by_cid(&args.id_or_cid).await?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&statuses)?);
    } else if statuses.is_empty() {
        println!(
            "no task or cid {:?} in the status store (never recorded, or expired)",
            args.id_or_cid
        );
    } else {
        println!(
            "{:<36}  {:<24} {:<10} {:>3}  {:<27}  RESULT / ERROR",
            "TASK", "TARGET", "STATE", "TRY", "UPDATED"
        );
        for s in &statuses {
            let outcome = match (&s.result, &s.error) {
                (Some(r), _) => r.to_string(),
                (None, Some(e)) => e.to_string(),
                _ => String::new(),
            };
            println!(
                "{:<36}  {:<24} {:<10} {:>3}  {:<27}  {outcome}",
                s.id,
                s.target,
                s.state.as_str(),
                s.attempts,
                utc_timestamp(s.updated_ms)
            );
        }
    }
    Ok(if statuses.is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
