//! `warren cancel <id>` / `warren cancel --cid <cid>`: cancel a task or every task of a cid
//! (docs/cancellation.md), and say what was found.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use warren_client::{CancelOutcome, CancelScope, Client, Found};
use warren_core::status::{RedisStore, StatusStore, DEFAULT_RETENTION};

use crate::opts::Global;

/// `warren cancel` options.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["id", "cid"])))]
pub struct CancelArgs {
    /// The task id (UUID) to cancel
    id: Option<uuid::Uuid>,
    /// Cancel every task of this correlation id instead
    #[arg(long)]
    cid: Option<String>,
    /// Redis URL of the status store [default: redis://127.0.0.1:6379/]; the cancellation
    /// is recorded there (it then holds across worker restarts)
    #[arg(
        long,
        env = "WARREN_REDIS_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    redis: Option<String>,
    /// Key prefix of the status store (the workers' `RedisStore::with_prefix`)
    #[arg(long, default_value = "warren:", value_name = "PREFIX")]
    redis_prefix: String,
    /// Do not use a status store: only broadcast to the running workers (see
    /// docs/cancellation.md for what then holds)
    #[arg(long, conflicts_with_all = ["redis"])]
    no_store: bool,
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
}

fn found_str(f: Found) -> String {
    match f {
        Found::Unknown => "unknown".to_owned(),
        Found::Pending => "pending".to_owned(),
        Found::Running => "running".to_owned(),
        Found::Finished(s) => format!("finished ({})", s.as_str()),
        _ => "other".to_owned(),
    }
}

fn to_json(o: &CancelOutcome) -> serde_json::Value {
    serde_json::json!({
        "scope": o.scope,
        "found": found_str(o.found()),
        "tasks": o.tasks.iter().map(|(id, f)| serde_json::json!({"id": id, "found": found_str(*f)})).collect::<Vec<_>>(),
        "recorded": o.recorded,
        "broadcast": o.broadcast,
    })
}

/// `warren cancel`.
pub async fn run(global: &Global, args: CancelArgs) -> anyhow::Result<ExitCode> {
    let scope = match (args.id, &args.cid) {
        (Some(id), _) => CancelScope::Id(id),
        (None, Some(cid)) if !cid.is_empty() && cid.len() <= 255 => CancelScope::Cid(cid.clone()),
        (None, Some(_)) => anyhow::bail!("--cid must be 1 to 255 bytes"),
        (None, None) => anyhow::bail!("give a task id or --cid"),
    };
    let mut builder = Client::builder().amqp(global.amqp("warren cancel")?);
    if !args.no_store {
        let store = match args.redis.as_deref() {
            Some(u) => RedisStore::new(u, DEFAULT_RETENTION)?,
            None => RedisStore::from_env()?,
        };
        let store: Arc<dyn StatusStore> = Arc::new(
            store
                .with_prefix(args.redis_prefix.clone())
                .with_timeout(Duration::from_secs(2)),
        );
        builder = builder.status_store(store);
    }
    let client = builder
        .connect()
        .await
        .context("cannot connect to the broker")?;
    let outcome = match &scope {
        CancelScope::Id(id) => client.cancel(*id).await,
        CancelScope::Cid(cid) => client.cancel_cid(cid).await,
    };
    client.close().await;
    let outcome = outcome.context("cancel failed")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&outcome))?);
    } else {
        println!(
            "cancelled {}: found {}; recorded in the store: {}; workers notified: {}",
            outcome.scope,
            found_str(outcome.found()),
            if outcome.recorded { "yes" } else { "no" },
            if outcome.broadcast {
                "yes"
            } else {
                "no (none listening)"
            },
        );
        for (id, f) in &outcome.tasks {
            println!("  {id}  {}", found_str(*f));
        }
    }
    Ok(ExitCode::SUCCESS)
}
