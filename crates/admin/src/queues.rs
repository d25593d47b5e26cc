//! warren's queues and where their counts come from: the management API when there is one,
//! `rabbitmqctl` on the broker's own machine as a fallback, AMQP passive declares (ready and
//! consumers only) for named services.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use warren_core::topology::{
    dead_queue, parse_subscription_queue, service_queue, PART_PREFIX, PREFIX, REPLY_PREFIX,
};
use warren_core::Broker;

use crate::mgmt::{ManagementClient, QueueInfo};
use crate::AdminError;

/// Where a listing's counts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// RabbitMQ's management HTTP API (counts lag by its statistics interval, 5 s by default).
    Management,
    /// `rabbitmqctl list_queues` on this machine.
    Rabbitmqctl,
    /// AMQP passive declares: ready and consumers only, of named queues.
    Amqp,
}

impl Source {
    /// `management`, `rabbitmqctl` or `amqp`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Management => "management",
            Self::Rabbitmqctl => "rabbitmqctl",
            Self::Amqp => "amqp",
        }
    }
}

/// One queue and its counts (`None`: the source cannot tell).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueRow {
    /// Queue name.
    pub name: String,
    /// `classic`, `quorum`, ...
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Ready messages.
    pub ready: Option<u64>,
    /// Delivered, not acked.
    pub unacked: Option<u64>,
    /// Consumers.
    pub consumers: Option<u64>,
    /// Messages published into it per second (management API only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_rate: Option<f64>,
    /// Deliveries per second (management API only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliver_rate: Option<f64>,
    /// Acks per second (management API only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_rate: Option<f64>,
    /// `false` for a queue asked for by name that does not exist.
    pub exists: bool,
}

impl QueueRow {
    /// Ready + unacked (unacked counted as 0 when unknown).
    #[must_use]
    pub fn messages(&self) -> u64 {
        self.ready.unwrap_or(0) + self.unacked.unwrap_or(0)
    }
}

impl From<QueueInfo> for QueueRow {
    fn from(q: QueueInfo) -> Self {
        let stats = q.message_stats.unwrap_or_default();
        Self {
            name: q.name,
            kind: q.kind,
            ready: q.messages_ready,
            unacked: q.messages_unacknowledged,
            consumers: q.consumers,
            publish_rate: Some(stats.publish_details.rate),
            deliver_rate: Some(stats.deliver_get_details.rate),
            ack_rate: Some(stats.ack_details.rate),
            exists: true,
        }
    }
}

/// Queues and where their counts come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listing {
    /// The source of the counts.
    pub source: Source,
    /// The vhost.
    pub vhost: String,
    /// The queues, sorted by name.
    pub queues: Vec<QueueRow>,
    /// Why a better source was not used (e.g. "rabbitmqctl is not installed").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What a warren queue is, from its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueKind {
    /// `warren.svc.<svc>`: a service's tasks.
    Service(String),
    /// `warren.dead.<svc>`: its dead letters.
    Dead(String),
    /// `warren.delay.<svc>.<ms>`: retries waiting `ms`.
    Delay {
        /// The service.
        svc: String,
        /// The delay step.
        ms: u64,
    },
    /// `warren.done.<svc>.<ms>`: a service's join done markers.
    Done(String),
    /// `warren.sub.<topic>:<svc>:<method>`: a subscriber's queue.
    Subscription {
        /// The topic.
        topic: String,
        /// The subscriber's service.
        svc: String,
        /// The subscriber's method.
        method: String,
    },
    /// `warren.topic.<topic>`: a topic's recent messages (for peek).
    Recent(String),
    /// `part.fanout-<job>`: a fan-in's part queue.
    FanIn(String),
    /// `part.<svc>-<method>-<task id>`: a split job's part queue (`<svc>-<method>`, which
    /// cannot be split without knowing the service names: both may hold `-`).
    SplitJob {
        /// `<svc>-<method>`.
        svc_method: String,
        /// The split task's id.
        task_id: String,
    },
    /// `warren.reply.<client>`: a client's reply queue.
    Reply,
    /// Another `warren.` or `part.` queue.
    OtherWarren,
    /// Not warren's.
    Foreign,
}

/// Classifies a queue by its name.
#[must_use]
pub fn classify(name: &str) -> QueueKind {
    if let Some((topic, svc, method)) = parse_subscription_queue(name) {
        return QueueKind::Subscription {
            topic: topic.to_owned(),
            svc: svc.to_owned(),
            method: method.to_owned(),
        };
    }
    if name.starts_with(REPLY_PREFIX) {
        return QueueKind::Reply;
    }
    if let Some(rest) = name.strip_prefix(PART_PREFIX) {
        if let Some(job) = rest.strip_prefix("fanout-") {
            return QueueKind::FanIn(job.to_owned());
        }
        // The task id is a UUID (36 characters) after the last `<svc>-<method>-`.
        if rest.len() > 37 && rest.is_char_boundary(rest.len() - 37) {
            let (head, tail) = rest.split_at(rest.len() - 37);
            if let Some(id) = tail.strip_prefix('-') {
                if uuid::Uuid::parse_str(id).is_ok() {
                    return QueueKind::SplitJob {
                        svc_method: head.to_owned(),
                        task_id: id.to_owned(),
                    };
                }
            }
        }
        return QueueKind::OtherWarren;
    }
    let Some(rest) = name.strip_prefix(PREFIX) else {
        return QueueKind::Foreign;
    };
    let with_ms = |r: &str| -> Option<(String, u64)> {
        let (svc, ms) = r.rsplit_once('.')?;
        if svc.is_empty() || ms.is_empty() || !ms.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((svc.to_owned(), ms.parse().ok()?))
    };
    if let Some(svc) = rest.strip_prefix("svc.").filter(|s| !s.is_empty()) {
        QueueKind::Service(svc.to_owned())
    } else if let Some(svc) = rest.strip_prefix("dead.").filter(|s| !s.is_empty()) {
        QueueKind::Dead(svc.to_owned())
    } else if let Some((svc, ms)) = rest.strip_prefix("delay.").and_then(with_ms) {
        QueueKind::Delay { svc, ms }
    } else if let Some((svc, _)) = rest.strip_prefix("done.").and_then(with_ms) {
        QueueKind::Done(svc)
    } else if let Some(t) = rest.strip_prefix("topic.").filter(|s| !s.is_empty()) {
        QueueKind::Recent(t.to_owned())
    } else {
        QueueKind::OtherWarren
    }
}

/// `true` for a queue warren creates (`warren.*` and `part.*`).
#[must_use]
pub fn is_warren_queue(name: &str) -> bool {
    name.starts_with(PREFIX) || name.starts_with(PART_PREFIX)
}

/// `true` when `queue` is one of the queues warren makes for one of `services`: its work,
/// dead-letter and delay queues, and its part queues.
#[must_use]
pub fn belongs_to_any(queue: &str, services: &[String]) -> bool {
    services.iter().any(|svc| {
        let part_prefix = format!("{PART_PREFIX}{svc}-");
        match classify(queue) {
            QueueKind::Service(s) | QueueKind::Dead(s) | QueueKind::Delay { svc: s, .. } => {
                &s == svc
            }
            QueueKind::SplitJob { .. } => queue.starts_with(&part_prefix),
            _ => false,
        }
    })
}

/// `true` for a `host:port` on this machine, where rabbitmqctl can reach the node.
#[must_use]
pub fn is_local(host_port: &str) -> bool {
    let host = host_port
        .rsplit_once(':')
        .map_or(host_port, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    matches!(host, "127.0.0.1" | "localhost" | "::1") || host.starts_with("127.")
}

/// Where rabbitmqctl is, if it is installed.
#[must_use]
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

/// A row of `rabbitmqctl list_queues ... --formatter json`.
#[derive(Debug, Deserialize)]
struct CtlRow {
    name: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    messages_ready: Option<u64>,
    #[serde(default)]
    messages_unacknowledged: Option<u64>,
    #[serde(default)]
    consumers: Option<u64>,
}

/// Every queue of `vhost`, from `rabbitmqctl list_queues`.
pub async fn rabbitmqctl_queues(vhost: &str) -> Result<Vec<QueueRow>, AdminError> {
    let Some(ctl) = find_rabbitmqctl() else {
        return Err(AdminError::Rabbitmqctl(String::from(
            "rabbitmqctl is not installed",
        )));
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
        .map_err(|_| AdminError::Rabbitmqctl(String::from("did not answer within 30 s")))?
        .map_err(|e| AdminError::Rabbitmqctl(format!("running {}: {e}", ctl.display())))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        return Err(AdminError::Rabbitmqctl(format!(
            "failed ({}): {first}",
            out.status
        )));
    }
    let rows: Vec<CtlRow> = serde_json::from_slice(&out.stdout)
        .map_err(|e| AdminError::Rabbitmqctl(format!("printed something that is not JSON: {e}")))?;
    Ok(rows
        .into_iter()
        .map(|r| QueueRow {
            name: r.name,
            kind: r.kind,
            ready: r.messages_ready,
            unacked: r.messages_unacknowledged,
            consumers: r.consumers,
            publish_rate: None,
            deliver_rate: None,
            ack_rate: None,
            exists: true,
        })
        .collect())
}

/// Every warren queue of `vhost` (`warren.*`, `part.*`): from the management API when
/// `mgmt` is given, else from rabbitmqctl when `local` (the broker is on this machine).
pub async fn warren_queues(
    mgmt: Option<&ManagementClient>,
    vhost: &str,
    local: bool,
) -> Result<Listing, AdminError> {
    let (source, rows, note) = match mgmt {
        Some(m) => (
            Source::Management,
            m.queues(vhost)
                .await?
                .into_iter()
                .map(QueueRow::from)
                .collect::<Vec<_>>(),
            None,
        ),
        None if local => (
            Source::Rabbitmqctl,
            rabbitmqctl_queues(vhost).await?,
            Some(String::from(
                "the management API is not configured or does not answer \
                 (--management-url / WARREN_MANAGEMENT_URL)",
            )),
        ),
        None => {
            return Err(AdminError::NoSource(String::from(
                "the management API is not configured or does not answer \
                 (--management-url / WARREN_MANAGEMENT_URL), and the broker is not on this \
                 machine, so rabbitmqctl cannot be used",
            )))
        }
    };
    let mut queues: Vec<QueueRow> = rows
        .into_iter()
        .filter(|r| is_warren_queue(&r.name))
        .collect();
    queues.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Listing {
        source,
        vhost: vhost.to_owned(),
        queues,
        note,
    })
}

/// The service and dead-letter queues of `services`, from AMQP passive declares (ready and
/// consumers only): what can be known without the management API or rabbitmqctl.
pub async fn amqp_service_queues(
    broker: &Broker,
    services: &[String],
) -> Result<Vec<QueueRow>, AdminError> {
    let mut queues = Vec::new();
    for svc in services {
        for name in [service_queue(svc)?, dead_queue(svc)?] {
            let stats = broker.queue_stats(&name).await?;
            queues.push(QueueRow {
                name,
                kind: None,
                ready: stats.map(|s| u64::from(s.ready)),
                unacked: None,
                consumers: stats.map(|s| u64::from(s.consumers)),
                publish_rate: None,
                deliver_rate: None,
                ack_rate: None,
                exists: stats.is_some(),
            });
        }
    }
    Ok(queues)
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
        assert!(belongs_to_any(
            "part.images-resize-0190a3c2-7d1e-7c4b-9a51-3f0e2b6c8d11",
            &svcs
        ));
        assert!(!belongs_to_any("warren.svc.images2", &svcs));
        assert!(!belongs_to_any("warren.delay.images.big.1000", &svcs));
    }

    #[test]
    fn classifies() {
        assert_eq!(classify("warren.svc.a-b"), QueueKind::Service("a-b".into()));
        assert_eq!(classify("warren.dead.a.b"), QueueKind::Dead("a.b".into()));
        assert_eq!(
            classify("warren.delay.a.b.1500"),
            QueueKind::Delay {
                svc: "a.b".into(),
                ms: 1500
            }
        );
        assert_eq!(
            classify("warren.done.a.300000"),
            QueueKind::Done("a".into())
        );
        assert_eq!(
            classify("warren.sub.orders.paid:ship:go"),
            QueueKind::Subscription {
                topic: "orders.paid".into(),
                svc: "ship".into(),
                method: "go".into()
            }
        );
        assert_eq!(
            classify("warren.topic.orders.paid"),
            QueueKind::Recent("orders.paid".into())
        );
        assert_eq!(
            classify("part.fanout-0190a3c2-7d1e-7c4b-9a51-3f0e2b6c8d11"),
            QueueKind::FanIn("0190a3c2-7d1e-7c4b-9a51-3f0e2b6c8d11".into())
        );
        assert_eq!(
            classify("part.t-x-1-sum-0190a3c2-7d1e-7c4b-9a51-3f0e2b6c8d11"),
            QueueKind::SplitJob {
                svc_method: "t-x-1-sum".into(),
                task_id: "0190a3c2-7d1e-7c4b-9a51-3f0e2b6c8d11".into()
            }
        );
        assert_eq!(classify("warren.reply.abc"), QueueKind::Reply);
        assert_eq!(classify("other"), QueueKind::Foreign);
    }

    #[test]
    fn local_hosts() {
        assert!(is_local("127.0.0.1:5672"));
        assert!(is_local("localhost:5672"));
        assert!(is_local("[::1]:5672"));
        assert!(!is_local("rabbit.example.com:5672"));
    }

    #[test]
    fn reads_management_json() {
        let text = r#"[{"name":"warren.svc.a","vhost":"/","type":"quorum","messages_ready":3,
            "messages_unacknowledged":1,"messages":4,"consumers":2,"durable":true,
            "message_stats":{"publish":10,"publish_details":{"rate":1.5},"ack":6,
            "ack_details":{"rate":0.5}}, "arguments":{"x-queue-type":"quorum"}}]"#;
        let rows: Vec<QueueInfo> = serde_json::from_str(text).expect("parses");
        let row = QueueRow::from(rows[0].clone());
        assert_eq!(row.ready, Some(3));
        assert_eq!(row.unacked, Some(1));
        assert_eq!(row.publish_rate, Some(1.5));
        assert_eq!(row.deliver_rate, Some(0.0));
    }
}
