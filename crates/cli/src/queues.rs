//! `warren queues`: warren's queues (`warren.*` and `part.*`) with their counts.
//!
//! warren does not need RabbitMQ's management plugin, so it cannot list queues over HTTP.
//! Two sources instead:
//! - `rabbitmqctl list_queues`, when the broker is on this machine and the tool is
//!   installed and allowed to talk to the node: every queue, with ready, unacked and
//!   consumer counts;
//! - AMQP passive declares of the queues of the services named with `--service`: ready and
//!   consumer counts only (AMQP does not report unacked messages), shown as `-`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;
use serde::{Deserialize, Serialize};
use warren_core::topology::{dead_queue, service_queue, PREFIX};
use warren_core::Broker;

use crate::opts::Global;

/// Prefix of part queues (`part.<svc>-<method>-<id>`), the one name warren creates outside
/// its `warren.` prefix.
const PART_PREFIX: &str = "part.";

/// `warren queues` options.
#[derive(Debug, Args)]
pub struct QueuesArgs {
    /// Only the queues of this service (repeatable); required when rabbitmqctl is not usable
    #[arg(long = "service", value_name = "NAME")]
    services: Vec<String>,
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
    /// Do not use rabbitmqctl even when it is available (AMQP passive declares only)
    #[arg(long)]
    amqp_only: bool,
}

/// One queue and its counts.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
struct QueueRow {
    name: String,
    /// `classic`, `quorum`, ... (`None` when the source cannot tell).
    #[serde(rename = "type")]
    kind: Option<String>,
    ready: Option<u64>,
    unacked: Option<u64>,
    consumers: Option<u64>,
    /// `false` for a queue asked for with `--service` that does not exist.
    exists: bool,
}

#[derive(Debug, Serialize)]
struct Listing {
    source: &'static str,
    vhost: String,
    queues: Vec<QueueRow>,
}

/// A row of `rabbitmqctl list_queues ... --formatter json`.
#[derive(Debug, Deserialize)]
pub(crate) struct CtlRow {
    pub(crate) name: String,
    #[serde(rename = "type", default)]
    pub(crate) kind: Option<String>,
    #[serde(default)]
    pub(crate) messages_ready: Option<u64>,
    #[serde(default)]
    pub(crate) messages_unacknowledged: Option<u64>,
    #[serde(default)]
    pub(crate) consumers: Option<u64>,
}

/// `warren queues`.
pub async fn run(global: &Global, args: &QueuesArgs) -> anyhow::Result<ExitCode> {
    for s in &args.services {
        warren_core::names::validate_name("service", s)
            .with_context(|| format!("--service {s:?}"))?;
    }
    let cfg = global.amqp("warren queues")?;
    let local = cfg.urls().first().is_some_and(|u| is_local(&u.host_port()));
    let broker = Broker::connect(cfg)
        .await
        .context("cannot connect to the broker")?;
    let (vhost, _) = broker.identity().await?;

    let mut why_not_ctl = None;
    let ctl = if args.amqp_only {
        why_not_ctl = Some(String::from("--amqp-only"));
        None
    } else if !local {
        why_not_ctl = Some(String::from("the broker is not on this machine"));
        None
    } else {
        match rabbitmqctl_queues(&vhost).await {
            Ok(rows) => Some(rows),
            Err(e) => {
                why_not_ctl = Some(crate::describe(&e));
                None
            }
        }
    };

    let listing = match ctl {
        Some(rows) => Listing {
            source: "rabbitmqctl",
            vhost,
            queues: rows
                .into_iter()
                .filter(|r| is_warren_queue(&r.name))
                .filter(|r| args.services.is_empty() || belongs_to_any(&r.name, &args.services))
                .map(|r| QueueRow {
                    name: r.name,
                    kind: r.kind,
                    ready: r.messages_ready,
                    unacked: r.messages_unacknowledged,
                    consumers: r.consumers,
                    exists: true,
                })
                .collect(),
        },
        None => {
            if args.services.is_empty() {
                broker.close().await;
                bail!(
                    "cannot list queues: rabbitmqctl is not usable ({}) and warren does not use \
                     the management API; name the services to look at with --service NAME",
                    why_not_ctl.unwrap_or_default()
                );
            }
            let mut queues = Vec::new();
            for svc in &args.services {
                for name in [service_queue(svc)?, dead_queue(svc)?] {
                    let stats = broker.queue_stats(&name).await?;
                    queues.push(QueueRow {
                        name,
                        kind: None,
                        ready: stats.map(|s| u64::from(s.ready)),
                        unacked: None,
                        consumers: stats.map(|s| u64::from(s.consumers)),
                        exists: stats.is_some(),
                    });
                }
            }
            Listing {
                source: "amqp",
                vhost,
                queues,
            }
        }
    };
    broker.close().await;
    let mut listing = listing;
    listing.queues.sort_by(|a, b| a.name.cmp(&b.name));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
    } else {
        print_table(&listing, why_not_ctl.as_deref());
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(listing: &Listing, why_not_ctl: Option<&str>) {
    match listing.source {
        "rabbitmqctl" => println!("# vhost {}, counts from rabbitmqctl", listing.vhost),
        _ => println!(
            "# vhost {}, counts from AMQP passive declares: unacked not available ({})",
            listing.vhost,
            why_not_ctl.unwrap_or("rabbitmqctl not used")
        ),
    }
    if listing.queues.is_empty() {
        println!("# no warren queues");
        return;
    }
    let width = listing
        .queues
        .iter()
        .map(|q| q.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:<width$}  {:<8}  {:>9}  {:>9}  {:>9}",
        "NAME", "TYPE", "READY", "UNACKED", "CONSUMERS"
    );
    let show = |v: Option<u64>| v.map_or_else(|| String::from("-"), |n| n.to_string());
    for q in &listing.queues {
        if !q.exists {
            println!("{:<width$}  (does not exist)", q.name);
            continue;
        }
        println!(
            "{:<width$}  {:<8}  {:>9}  {:>9}  {:>9}",
            q.name,
            q.kind.as_deref().unwrap_or("-"),
            show(q.ready),
            show(q.unacked),
            show(q.consumers)
        );
    }
}

fn is_warren_queue(name: &str) -> bool {
    name.starts_with(PREFIX) || name.starts_with(PART_PREFIX)
}

/// `true` when `queue` is one of the queues warren makes for one of `services`: its work,
/// dead-letter and delay queues, and its part queues.
fn belongs_to_any(queue: &str, services: &[String]) -> bool {
    services.iter().any(|svc| {
        let svc_q = format!("{PREFIX}svc.{svc}");
        let dead_q = format!("{PREFIX}dead.{svc}");
        let delay_prefix = format!("{PREFIX}delay.{svc}.");
        let part_prefix = format!("{PART_PREFIX}{svc}-");
        queue == svc_q
            || queue == dead_q
            || queue
                .strip_prefix(&delay_prefix)
                .is_some_and(|ms| !ms.is_empty() && ms.bytes().all(|b| b.is_ascii_digit()))
            || queue.starts_with(&part_prefix)
    })
}

/// `true` for a `host:port` on this machine, where rabbitmqctl can reach the node.
pub fn is_local(host_port: &str) -> bool {
    let host = host_port
        .rsplit_once(':')
        .map_or(host_port, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    matches!(host, "127.0.0.1" | "localhost" | "::1") || host.starts_with("127.")
}

/// Where rabbitmqctl is, if it is installed.
pub fn find_rabbitmqctl() -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("rabbitmqctl"))
            .find(|p| p.is_file())
    });
    from_path.or_else(|| {
        ["/usr/sbin/rabbitmqctl", "/usr/lib/rabbitmq/bin/rabbitmqctl"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    })
}

/// Every queue of `vhost`, from `rabbitmqctl list_queues`.
pub(crate) async fn rabbitmqctl_queues(vhost: &str) -> anyhow::Result<Vec<CtlRow>> {
    let Some(ctl) = find_rabbitmqctl() else {
        bail!("rabbitmqctl is not installed");
    };
    let run = tokio::process::Command::new(&ctl)
        .args(["list_queues", "-q", "-p", vhost])
        .args([
            "name",
            "type",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ])
        .args(["--formatter", "json"])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .context("rabbitmqctl did not answer within 30 s")?
        .with_context(|| format!("running {}", ctl.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        bail!("rabbitmqctl failed ({}): {first}", out.status);
    }
    serde_json::from_slice(&out.stdout).context("rabbitmqctl printed something that is not JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_warren_queues() {
        assert!(is_warren_queue("warren.svc.images"));
        assert!(is_warren_queue("part.images-resize-0190"));
        assert!(!is_warren_queue("celery"));
        let svcs = vec![String::from("images")];
        assert!(belongs_to_any("warren.svc.images", &svcs));
        assert!(belongs_to_any("warren.dead.images", &svcs));
        assert!(belongs_to_any("warren.delay.images.1000", &svcs));
        assert!(belongs_to_any("part.images-resize-abc", &svcs));
        assert!(!belongs_to_any("warren.svc.images2", &svcs));
        assert!(!belongs_to_any("warren.delay.images.big.1000", &svcs));
    }

    #[test]
    fn local_hosts() {
        assert!(is_local("127.0.0.1:5672"));
        assert!(is_local("localhost:5672"));
        assert!(is_local("[::1]:5672"));
        assert!(!is_local("rabbit.example.com:5672"));
    }

    #[test]
    fn reads_rabbitmqctl_json() {
        let text = r#"[
{"name":"warren.svc.a","type":"quorum","messages_ready":3,"messages_unacknowledged":1,"consumers":2}
,{"name":"other","type":"classic","messages_ready":0,"messages_unacknowledged":0,"consumers":0}
]"#;
        let rows: Vec<CtlRow> = serde_json::from_str(text).expect("parses");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].messages_unacknowledged, Some(1));
    }
}
