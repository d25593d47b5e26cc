//! Options shared by every command, and how they turn into warren's configuration.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use warren_core::config::DEFAULT_URL;
use warren_core::{AmqpConfig, QueueType, ReconnectPolicy};

/// Options every command accepts (before or after the command name).
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Broker URL, `amqp[s]://user:password@host:port/vhost`; several comma-separated for a
    /// cluster [default: amqp://guest:guest@127.0.0.1:5672/%2f]
    #[arg(
        long,
        env = "WARREN_AMQP_URL",
        hide_env_values = true,
        global = true,
        value_name = "URL"
    )]
    pub url: Option<String>,

    /// Type of the service and dead-letter queues warren declares
    #[arg(long, value_enum, default_value_t = QueueTypeArg::Quorum, global = true)]
    pub queue_type: QueueTypeArg,

    /// Give up connecting to the broker after this long (e.g. 500ms, 10s, 1m)
    #[arg(long, default_value = "10s", value_parser = parse_duration, global = true, value_name = "DURATION")]
    pub connect_timeout: Duration,

    /// RabbitMQ management API, `http[s]://user:password@host:15672`, for `queues`, `topics`,
    /// `dead list` and `web` [default: the broker's host, port 15672, with the broker URL's
    /// credentials, if it answers; else rabbitmqctl]
    #[arg(
        long,
        env = "WARREN_MANAGEMENT_URL",
        hide_env_values = true,
        global = true,
        value_name = "URL"
    )]
    pub management_url: Option<String>,
}

/// `--queue-type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueueTypeArg {
    /// Classic queues: lighter on a single node.
    Classic,
    /// Quorum queues: replicated, the recommended production choice.
    Quorum,
}

impl From<QueueTypeArg> for QueueType {
    fn from(q: QueueTypeArg) -> Self {
        match q {
            QueueTypeArg::Classic => QueueType::Classic,
            QueueTypeArg::Quorum => QueueType::Quorum,
        }
    }
}

impl Global {
    /// The URL list as given (with secrets: hand it only to a connection, never print it).
    pub fn url_list(&self) -> &str {
        self.url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
            .unwrap_or(DEFAULT_URL)
    }

    /// Each URL of the list on its own (with secrets).
    pub fn each_url(&self) -> Vec<&str> {
        self.url_list()
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }

    /// The queue type chosen with `--queue-type`.
    pub fn queue_type(&self) -> QueueType {
        self.queue_type.into()
    }

    /// warren's configuration for `urls`, failing fast (within `--connect-timeout`) when
    /// the broker does not answer, as a command line should.
    pub fn amqp_for(&self, urls: &str, name: &str) -> anyhow::Result<AmqpConfig> {
        let cfg = AmqpConfig::new(urls)
            .context("invalid --url / WARREN_AMQP_URL")?
            .with_tls_from_env()
            .context("invalid TLS settings (WARREN_AMQP_CA_FILE, WARREN_AMQP_CLIENT_*_FILE)")?;
        Ok(cfg
            .with_queue_type(self.queue_type())
            .with_connect_timeout(self.connect_timeout.min(Duration::from_secs(5)))
            .with_reconnect(ReconnectPolicy {
                min_delay: Duration::from_millis(100),
                max_delay: Duration::from_secs(1),
                give_up_after: Some(self.connect_timeout),
            })
            .with_connection_name(name))
    }

    /// The management API client: `--management-url` / `WARREN_MANAGEMENT_URL`, else the
    /// first broker's host on port 15672 if it answers within a second, else `None`.
    pub async fn management(&self) -> anyhow::Result<Option<warren_admin::ManagementClient>> {
        let first = self.each_url().first().copied().unwrap_or(DEFAULT_URL);
        warren_admin::ManagementClient::discover(
            self.management_url.as_deref(),
            first,
            Duration::from_secs(1),
        )
        .await
        .context("--management-url / WARREN_MANAGEMENT_URL")
    }

    /// `true` when the first broker URL names this machine (rabbitmqctl can reach it).
    pub fn broker_is_local(&self) -> bool {
        self.amqp("warren")
            .ok()
            .and_then(|c| {
                c.urls()
                    .first()
                    .map(|u| warren_admin::queues::is_local(&u.host_port()))
            })
            .unwrap_or(false)
    }

    /// warren's configuration for the whole URL list.
    pub fn amqp(&self, name: &str) -> anyhow::Result<AmqpConfig> {
        self.amqp_for(self.url_list(), name)
    }

    /// What `warren bench` needs of these options to reach the broker.
    #[cfg(feature = "bench")]
    pub fn bench_host(&self) -> warren_bench::Host {
        let global = self.clone();
        warren_bench::Host {
            urls: self.url_list().to_owned(),
            queue_type: self.queue_type(),
            connect_timeout: self.connect_timeout,
            amqp: std::sync::Arc::new(move |name| global.amqp(name)),
            describe: crate::describe,
        }
    }
}

/// Parses `250ms`, `10s`, `1.5s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 500ms, 10s, 2m)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("").is_err());
    }
}
