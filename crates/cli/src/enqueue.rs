//! `warren enqueue` (fire and forget) and `warren invoke` (wait for the reply).

use std::io::Read as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use clap::Args;
use serde_json::Value;
use warren_client::{Client, Task};
use warren_core::Target;

use crate::opts::{parse_duration, Global};

/// `warren enqueue` options.
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// The method to run, `service.method` (split at the last dot)
    #[arg(value_name = "SVC.METHOD")]
    target: String,
    /// The payload, as JSON (quote it for the shell); `-` reads it from stdin
    #[arg(value_name = "JSON")]
    payload: String,
    /// Correlation id to use instead of a generated one (you then own its uniqueness)
    #[arg(long)]
    cid: Option<String>,
    /// Run the task this long from now (e.g. 90s, 15m, 1h30m, 2days; rounded up to 100 ms,
    /// at most about 38 days); it waits on the broker, not in a worker
    #[arg(long, value_parser = parse_delay, value_name = "DURATION")]
    delay: Option<Duration>,
}

/// A `--delay`: humantime's format (`90s`, `1h 30m`, `2days`), within the longest delay.
fn parse_delay(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}; try 90s, 15m, 1h30m, 2days)"))?;
    warren_core::delay::check(d).map_err(|e| e.to_string())?;
    Ok(d)
}

/// `warren invoke` options.
#[derive(Debug, Args)]
pub struct InvokeArgs {
    /// The method to call, `service.method` (split at the last dot)
    #[arg(value_name = "SVC.METHOD")]
    target: String,
    /// The payload, as JSON (quote it for the shell); `-` reads it from stdin
    #[arg(value_name = "JSON")]
    payload: String,
    /// How long to wait for the reply (e.g. 500ms, 10s, 2m)
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    timeout: Duration,
    /// Correlation id to use instead of a generated one
    #[arg(long)]
    cid: Option<String>,
}

/// Checks the target and the payload before connecting, so mistakes fail fast.
fn prepare(target: &str, payload: &str, cid: Option<String>) -> anyhow::Result<Task> {
    let target: Target = target
        .parse()
        .with_context(|| format!("invalid target {target:?}"))?;
    let payload = read_payload(payload)?;
    let mut task = Task::new(target, &payload);
    if let Some(cid) = cid {
        if cid.is_empty() || cid.len() > 255 {
            return Err(anyhow!("--cid must be 1 to 255 bytes"));
        }
        task = task.with_cid(cid);
    }
    Ok(task)
}

fn read_payload(arg: &str) -> anyhow::Result<Value> {
    let text = if arg == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the payload from stdin")?;
        s
    } else {
        arg.to_owned()
    };
    serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "the payload is not valid JSON ({e}); quote it for the shell, e.g. '{{\"w\": 64}}' \
             or '\"text\"'"
        )
    })
}

async fn connect(global: &Global, invoke_timeout: Duration) -> anyhow::Result<Client> {
    Client::builder()
        .amqp(global.amqp("warren cli")?)
        .invoke_timeout(invoke_timeout)
        .connect()
        .await
        .context("cannot connect to the broker")
}

/// Explains the one mistake an operator is likely to make with an existing service queue.
fn hint(e: warren_client::Error, global: &Global) -> anyhow::Error {
    let text = crate::describe(&anyhow::Error::from(e));
    if text.contains("x-queue-type") {
        anyhow!(
            "{text}\nhint: the service queue exists with another queue type than \
             --queue-type {}; pass the type it was created with",
            global.queue_type().as_str()
        )
    } else {
        anyhow!(text)
    }
}

/// `warren enqueue`.
pub async fn run_enqueue(global: &Global, args: EnqueueArgs) -> anyhow::Result<ExitCode> {
    let mut task = prepare(&args.target, &args.payload, args.cid)?;
    if let Some(d) = args.delay {
        task = task.delay(d);
    }
    let client = connect(global, Duration::from_secs(30)).await?;
    let sent = client.enqueue(task).await;
    client.close().await;
    let receipt = sent.map_err(|e| hint(e, global))?;
    println!("id  {}", receipt.id);
    println!("cid {}", receipt.cid);
    if let Some(d) = args.delay {
        println!("due in {}", humantime::format_duration(d));
    }
    Ok(ExitCode::SUCCESS)
}

/// `warren invoke`.
pub async fn run_invoke(global: &Global, args: InvokeArgs) -> anyhow::Result<ExitCode> {
    let task = prepare(&args.target, &args.payload, args.cid)?.with_timeout(args.timeout);
    let client = connect(global, args.timeout).await?;
    let reply = client.invoke::<Value>(task).await;
    client.close().await;
    match reply {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(warren_client::Error::Failed { id, cid, failure }) => {
            eprintln!(
                "error: {} failed ({}): {}",
                args.target,
                failure.kind.as_str(),
                failure.message
            );
            eprintln!("task {id} (cid {cid})");
            Ok(ExitCode::FAILURE)
        }
        Err(e @ warren_client::Error::Timeout { .. }) => {
            eprintln!("error: {e}");
            eprintln!(
                "hint: is a worker running for {}? `warren queues` shows its consumers",
                args.target
            );
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(hint(e, global)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_input_before_connecting() {
        assert!(prepare("nodot", "{}", None).is_err());
        assert!(prepare("Svc.m", "{}", None).is_err());
        assert!(prepare("svc.m", "{oops", None).is_err());
        assert!(prepare("svc.m", "{}", Some(String::new())).is_err());
        assert!(prepare(&format!("{}.m", "s".repeat(300)), "{}", None).is_err());
        assert!(prepare("svc.m", "{\"a\": [1, 2]}", Some("c-1".into())).is_ok());
        assert!(prepare("svc.m", "\"text\"", None).is_ok());
    }
}
