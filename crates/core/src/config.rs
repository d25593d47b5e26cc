//! Broker configuration: URLs (several for a cluster), heartbeats, reconnect policy and the
//! queue type of the queues warren declares.
//!
//! Precedence: values set with the `with_*` builder methods win over `WARREN_AMQP_URL`, which
//! wins over the default `amqp://guest:guest@127.0.0.1:5672/%2f`.

use std::fmt;
use std::time::Duration;

use crate::error::{Error, Result};

/// The environment variable read by [`AmqpConfig::from_env`]: one URL or a comma-separated
/// list (a cluster; warren fails over between them in order).
pub const URL_ENV: &str = "WARREN_AMQP_URL";

/// The URL used when nothing else is configured.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// An `amqp://` or `amqps://` URL whose password never shows in `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    full: String,
    redacted: String,
}

impl AmqpUrl {
    /// Parses and checks a URL; adds `heartbeat=10` when the URL sets no heartbeat, so a
    /// black-holed connection is noticed within about 20 seconds.
    pub fn parse(raw: &str) -> Result<Self> {
        let raw = raw.trim();
        let mut url = url::Url::parse(raw)
            .map_err(|e| Error::Config(format!("{} is not a URL: {e}", redact_str(raw))))?;
        if !matches!(url.scheme(), "amqp" | "amqps") {
            return Err(Error::Config(format!(
                "{} must start with amqp:// or amqps://",
                redact_str(raw)
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(Error::Config(format!("{} has no host", redact_str(raw))));
        }
        if !url.query_pairs().any(|(k, _)| k == "heartbeat") {
            url.query_pairs_mut().append_pair("heartbeat", "10");
        }
        let mut shown = url.clone();
        if shown.password().is_some() {
            let _ = shown.set_password(Some("***"));
        }
        Ok(Self {
            full: url.to_string(),
            redacted: shown.to_string(),
        })
    }

    /// The URL with its password, for the connection only.
    pub(crate) fn secret(&self) -> &str {
        &self.full
    }

    /// The URL with the password replaced by `***`.
    #[must_use]
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// `host:port` of this URL (port defaulting to 5672, or 5671 for amqps).
    #[must_use]
    pub fn host_port(&self) -> String {
        match url::Url::parse(&self.full) {
            Ok(u) => {
                let port = u
                    .port()
                    .unwrap_or(if u.scheme() == "amqps" { 5671 } else { 5672 });
                format!("{}:{port}", u.host_str().unwrap_or_default())
            }
            Err(_) => String::from("?"),
        }
    }
}

fn redact_str(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => String::from("<unparseable URL>"),
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

/// The kind of queue warren declares for services and dead letters.
///
/// Quorum queues (the default) are replicated and survive a node loss in a cluster; they are
/// the recommended production choice. Classic queues are lighter on a single node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// `x-queue-type=classic`.
    Classic,
    /// `x-queue-type=quorum` (default).
    #[default]
    Quorum,
}

impl std::str::FromStr for QueueType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "classic" => Ok(Self::Classic),
            "quorum" => Ok(Self::Quorum),
            other => Err(Error::Config(format!(
                "queue type {other:?}: expected `classic` or `quorum`"
            ))),
        }
    }
}

impl QueueType {
    /// The `x-queue-type` argument value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }
}

/// How warren reconnects: exponential backoff with jitter between `min_delay` and
/// `max_delay`, trying every URL in turn, for at most `give_up_after` (or forever when
/// `None`, which is what a worker wants).
#[derive(Debug, Clone)]
pub struct ReconnectPolicy {
    /// First delay after a failed attempt.
    pub min_delay: Duration,
    /// Longest delay between attempts.
    pub max_delay: Duration,
    /// Stop trying after this long; `None` retries forever.
    pub give_up_after: Option<Duration>,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            give_up_after: Some(Duration::from_secs(60)),
        }
    }
}

/// Connection settings shared by clients and workers.
///
/// ```
/// use std::time::Duration;
/// use warren_core::{AmqpConfig, QueueType};
/// let cfg = AmqpConfig::new("amqp://guest:secret@127.0.0.1:5672/%2f")
///     .unwrap()
///     .with_queue_type(QueueType::Classic)
///     .with_publish_timeout(Duration::from_secs(10));
/// assert!(!format!("{cfg:?}").contains("secret"));
/// ```
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    urls: Vec<AmqpUrl>,
    /// TCP + AMQP handshake deadline per attempt.
    pub connect_timeout: Duration,
    /// How to reconnect after a connection is lost.
    pub reconnect: ReconnectPolicy,
    /// Queue type for service and dead-letter queues.
    pub queue_type: QueueType,
    /// How long a publish may wait for its confirm (reconnects included) before failing.
    pub publish_timeout: Duration,
    /// Name shown for the connection in RabbitMQ's tools.
    pub connection_name: String,
}

impl AmqpConfig {
    /// Configuration for one URL (or a comma-separated list).
    pub fn new(urls: &str) -> Result<Self> {
        let urls = urls
            .split(',')
            .filter(|u| !u.trim().is_empty())
            .map(AmqpUrl::parse)
            .collect::<Result<Vec<_>>>()?;
        if urls.is_empty() {
            return Err(Error::Config("no AMQP URL given".into()));
        }
        Ok(Self {
            urls,
            connect_timeout: Duration::from_secs(5),
            reconnect: ReconnectPolicy::default(),
            queue_type: QueueType::default(),
            publish_timeout: Duration::from_secs(30),
            connection_name: String::from("warren"),
        })
    }

    /// `WARREN_AMQP_URL` if set, else `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub fn from_env() -> Result<Self> {
        match std::env::var(URL_ENV) {
            Ok(v) if !v.trim().is_empty() => Self::new(&v),
            _ => Self::new(DEFAULT_URL),
        }
    }

    /// The URLs, in failover order.
    #[must_use]
    pub fn urls(&self) -> &[AmqpUrl] {
        &self.urls
    }

    /// Sets the queue type (default quorum).
    #[must_use]
    pub fn with_queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// Sets the reconnect policy.
    #[must_use]
    pub fn with_reconnect(mut self, reconnect: ReconnectPolicy) -> Self {
        self.reconnect = reconnect;
        self
    }

    /// Sets how long a publish may take, reconnects included.
    #[must_use]
    pub fn with_publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Sets the per-attempt connect deadline.
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the connection name shown by `rabbitmqctl list_connections client_properties`.
    #[must_use]
    pub fn with_connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// All URLs, redacted, comma-separated (for messages).
    #[must_use]
    pub fn redacted_urls(&self) -> String {
        self.urls
            .iter()
            .map(AmqpUrl::redacted)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_and_adds_heartbeat() {
        let u = AmqpUrl::parse("amqp://bob:hunter2@rabbit:5673/v").unwrap();
        assert!(!format!("{u:?} {u}").contains("hunter2"));
        assert!(u.secret().contains("hunter2"));
        assert!(u.secret().contains("heartbeat=10"));
        assert_eq!(u.host_port(), "rabbit:5673");
        let u = AmqpUrl::parse("amqp://h/?heartbeat=3").unwrap();
        assert!(!u.secret().contains("heartbeat=10"));
    }

    #[test]
    fn bad_urls_are_config_errors_without_secrets() {
        let e = AmqpUrl::parse("http://bob:hunter2@h").unwrap_err();
        assert!(matches!(e, Error::Config(_)));
        assert!(!e.to_string().contains("hunter2"));
        assert!(AmqpConfig::new(" , ").is_err());
        let c = AmqpConfig::new("amqp://a,amqp://b").unwrap();
        assert_eq!(c.urls().len(), 2);
    }
}
