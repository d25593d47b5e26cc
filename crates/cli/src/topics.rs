//! `warren topics`, `warren peek <topic>` and `warren status <id|cid>`: what operators ask
//! about publish/subscribe and about what became of a task.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;
use serde::Serialize;
use serde_json::Value;
use warren_core::envelope::Envelope;
use warren_core::patterns::utc_timestamp;
use warren_core::status::{RedisStore, StatusStore, TaskStatus};
use warren_core::topology::{dead_queue, parse_subscription_queue, recent_queue, PREFIX};
use warren_core::Broker;

use crate::opts::Global;
use crate::queues::{is_local, rabbitmqctl_queues};

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

#[derive(Debug, Serialize)]
struct Subscriber {
    target: String,
    queue: String,
    pending: Option<u64>,
    unacked: Option<u64>,
    consumers: Option<u64>,
    /// Dead letters of the subscriber's service (all its methods).
    dead: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Topic {
    topic: String,
    /// Messages published, counted by the status store (`None` without one).
    published: Option<u64>,
    /// Recent messages kept for `warren peek`.
    recent: Option<u64>,
    subscribers: Vec<Subscriber>,
}

fn store(url: Option<&str>) -> anyhow::Result<Arc<dyn StatusStore>> {
    let store = match url {
        Some(u) => RedisStore::new(u, warren_core::status::DEFAULT_RETENTION)?,
        None => RedisStore::from_env()?,
    };
    Ok(Arc::new(store.with_timeout(Duration::from_secs(2))))
}

/// `warren topics`: topics and their subscriptions, from `rabbitmqctl` (queue names and
/// counts) and the status store (published counts, when reachable).
pub async fn run_topics(global: &Global, args: &TopicsArgs) -> anyhow::Result<ExitCode> {
    let cfg = global.amqp("warren topics")?;
    let local = cfg.urls().first().is_some_and(|u| is_local(&u.host_port()));
    if !local {
        bail!(
            "warren topics lists queues with rabbitmqctl, which needs the broker on this \
             machine (warren does not use the management API)"
        );
    }
    let broker = Broker::connect(cfg)
        .await
        .context("cannot connect to the broker")?;
    let (vhost, _) = broker.identity().await?;
    let rows = rabbitmqctl_queues(&vhost).await?;
    // rabbitmqctl finds the queues; their ready and consumer counts come from passive
    // declares, which are exact (rabbitmqctl's figures can lag by seconds).
    let mut exact: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for r in &rows {
        let ours = r.name.starts_with(&format!("{PREFIX}topic."))
            || r.name.starts_with(&format!("{PREFIX}dead."))
            || parse_subscription_queue(&r.name).is_some();
        if ours {
            if let Some(s) = broker.queue_stats(&r.name).await? {
                exact.insert(r.name.clone(), (u64::from(s.ready), u64::from(s.consumers)));
            }
        }
    }
    broker.close().await;
    let ready = |name: &str| exact.get(name).map(|e| e.0);
    let mut topics: BTreeMap<String, Topic> = BTreeMap::new();
    let recent_prefix = format!("{PREFIX}topic.");
    for r in &rows {
        if let Some(t) = r.name.strip_prefix(&recent_prefix) {
            topic_entry(&mut topics, t).recent = ready(&r.name);
        }
        if let Some((t, svc, method)) = parse_subscription_queue(&r.name) {
            let dead = dead_queue(svc).ok().and_then(|d| ready(&d));
            topic_entry(&mut topics, t).subscribers.push(Subscriber {
                target: format!("{svc}.{method}"),
                queue: r.name.clone(),
                pending: ready(&r.name),
                unacked: r.messages_unacknowledged,
                consumers: exact.get(&r.name).map(|e| e.1),
                dead,
            });
        }
    }
    let store = store(None).ok();
    for (name, t) in &mut topics {
        if let Some(s) = &store {
            t.published = s.counter(&format!("published:{name}")).await.ok().flatten();
        }
    }
    let topics: Vec<Topic> = topics.into_values().collect();
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

fn topic_entry<'a>(topics: &'a mut BTreeMap<String, Topic>, t: &str) -> &'a mut Topic {
    topics.entry(t.to_owned()).or_insert_with(|| Topic {
        topic: t.to_owned(),
        published: None,
        recent: None,
        subscribers: Vec::new(),
    })
}

#[derive(Debug, Serialize)]
struct Peeked {
    id: Option<String>,
    cid: Option<String>,
    published_at: Option<String>,
    payload: Value,
}

/// `warren peek <topic>`: the last messages published to a topic, read from its recent
/// queue without removing them.
pub async fn run_peek(global: &Global, args: &PeekArgs) -> anyhow::Result<ExitCode> {
    warren_core::names::validate_name("topic", &args.topic)?;
    let broker = Broker::connect(global.amqp("warren peek")?)
        .await
        .context("cannot connect to the broker")?;
    let queue = recent_queue(&args.topic);
    let Some(stats) = broker.queue_stats(&queue).await? else {
        broker.close().await;
        bail!(
            "no topic {:?}: nothing was ever published to it",
            args.topic
        );
    };
    let total = stats.ready as usize;
    let batch = if total == 0 {
        None
    } else {
        broker
            .take(&queue, total, Duration::from_millis(500), |b| {
                b.len() >= total
            })
            .await?
    };
    let bodies = batch.as_ref().map(|b| b.bodies.clone()).unwrap_or_default();
    if let Some(b) = batch {
        b.release().await;
    }
    broker.close().await;
    let skip = bodies.len().saturating_sub(args.last);
    let msgs: Vec<Peeked> = bodies[skip..]
        .iter()
        .map(|b| match Envelope::from_bytes(b) {
            Ok(env) => Peeked {
                id: Some(env.id.to_string()),
                cid: Some(env.cid),
                published_at: Some(utc_timestamp(env.created_ms)),
                payload: env.payload,
            },
            Err(_) => Peeked {
                id: None,
                cid: None,
                published_at: None,
                payload: Value::String(String::from_utf8_lossy(b).into_owned()),
            },
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&msgs)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} of {} recent messages on {} (oldest first)",
        msgs.len(),
        total,
        args.topic
    );
    for m in &msgs {
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
