//! A client for RabbitMQ's management HTTP API (the `rabbitmq_management` plugin).
//!
//! Only the read endpoints warren's views need, plus purging a queue:
//! `GET /api/overview`, `/api/queues/{vhost}`, `/api/queues/{vhost}/{name}`,
//! `/api/consumers/{vhost}`, `/api/connections`, `/api/exchanges/{vhost}` and
//! `DELETE /api/queues/{vhost}/{name}/contents`.
//!
//! The credentials (user and password of the URL) are kept apart from the URL: every URL this
//! module shows, in [`ManagementClient::url`], in `Debug` and in every [`MgmtError`], is the
//! redacted one.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The port the management plugin listens on by default.
pub const DEFAULT_PORT: u16 = 15672;
/// The environment variable naming the management URL.
pub const ENV_URL: &str = "WARREN_MANAGEMENT_URL";

/// Why a management API call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MgmtError {
    /// The URL cannot be used (not http/https, no host, ...). Retrying does not help.
    #[error("invalid management URL: {0}")]
    Config(String),
    /// The API did not answer (connection refused, timeout, TLS failure). Retrying may help.
    #[error("the management API at {url} did not answer: {reason}")]
    Unreachable {
        /// The redacted base URL.
        url: String,
        /// What went wrong (no credentials).
        reason: String,
    },
    /// The API refused the credentials (401) or the user lacks the `management` tag or the
    /// vhost's permissions (403). Retrying does not help.
    #[error("the management API at {url} refused the credentials ({status}): the user needs the \"management\" (or \"monitoring\") tag and access to the vhost")]
    Unauthorized {
        /// The redacted base URL.
        url: String,
        /// 401 or 403.
        status: u16,
    },
    /// The object does not exist (404). Retrying does not help.
    #[error("not found: {0}")]
    NotFound(String),
    /// Any other HTTP error status. 5xx may be transient, 4xx is not.
    #[error("the management API answered {status} for {what}: {body}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The request (path only).
        what: String,
        /// The start of the body.
        body: String,
    },
    /// The answer was not what the documented API returns. Retrying does not help.
    #[error("unexpected answer from the management API for {what}: {reason}")]
    Decode {
        /// The request (path only).
        what: String,
        /// The decoding error.
        reason: String,
    },
}

impl MgmtError {
    /// `true` when the same call may succeed later (unreachable, 5xx, 429).
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Status { status, .. } => *status >= 500 || *status == 429,
            Self::Config(_)
            | Self::Unauthorized { .. }
            | Self::NotFound(_)
            | Self::Decode { .. } => false,
        }
    }
}

/// A management API client. Cheap to clone.
#[derive(Clone)]
pub struct ManagementClient {
    /// The base URL without credentials, ending in `/`.
    base: url::Url,
    user: String,
    password: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for ManagementClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagementClient")
            .field("url", &self.base.as_str())
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Percent-decodes a URL's user or password.
fn decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// `scheme://host:port/path` of `u` without user and password (for messages).
#[must_use]
pub fn redact_url(u: &str) -> String {
    match url::Url::parse(u) {
        Ok(mut parsed) => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        Err(_) => String::from("(unparsable URL)"),
    }
}

impl ManagementClient {
    /// A client for `url` (`http[s]://user:password@host:15672[/prefix]`); without
    /// credentials in the URL, `guest`/`guest`.
    pub fn new(url: &str) -> Result<Self, MgmtError> {
        let mut base = url::Url::parse(url.trim())
            .map_err(|e| MgmtError::Config(format!("{} ({e})", redact_url(url))))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(MgmtError::Config(format!(
                "{}: the management API is http:// or https://",
                redact_url(url)
            )));
        }
        if base.host_str().is_none_or(str::is_empty) {
            return Err(MgmtError::Config(format!("{}: no host", redact_url(url))));
        }
        let (user, password) = if base.username().is_empty() {
            (String::from("guest"), String::from("guest"))
        } else {
            (
                decode(base.username()),
                decode(base.password().unwrap_or_default()),
            )
        };
        let _ = base.set_username("");
        let _ = base.set_password(None);
        base.set_query(None);
        base.set_fragment(None);
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(3))
            .user_agent(concat!("warren-admin/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| MgmtError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            base,
            user,
            password,
            http,
        })
    }

    /// The management URL that goes with an AMQP URL: the same host and credentials, plain
    /// HTTP on port 15672 (`amqps://` → `https://`).
    pub fn from_amqp_url(amqp_url: &str) -> Result<Self, MgmtError> {
        let u = url::Url::parse(amqp_url.trim())
            .map_err(|e| MgmtError::Config(format!("{} ({e})", redact_url(amqp_url))))?;
        let scheme = if u.scheme() == "amqps" {
            "https"
        } else {
            "http"
        };
        let host = match u.host() {
            Some(url::Host::Ipv6(a)) => format!("[{a}]"),
            Some(h) => h.to_string(),
            None => String::from("127.0.0.1"),
        };
        let mut m = url::Url::parse(&format!("{scheme}://{host}:{DEFAULT_PORT}/"))
            .map_err(|e| MgmtError::Config(e.to_string()))?;
        if !u.username().is_empty() {
            let _ = m.set_username(u.username());
            let _ = m.set_password(u.password());
        }
        Self::new(m.as_str())
    }

    /// The base URL, without credentials.
    #[must_use]
    pub fn url(&self) -> &str {
        self.base.as_str()
    }

    /// Which client to use: `explicit` (a `--management-url`, or [`ENV_URL`]) when given;
    /// else the management API on the AMQP URL's host at port 15672 **if it answers** within
    /// `probe_timeout`; else `Ok(None)` (callers fall back to rabbitmqctl or AMQP).
    pub async fn discover(
        explicit: Option<&str>,
        amqp_url: &str,
        probe_timeout: Duration,
    ) -> Result<Option<Self>, MgmtError> {
        if let Some(u) = explicit.map(str::trim).filter(|u| !u.is_empty()) {
            return Self::new(u).map(Some);
        }
        let Ok(c) = Self::from_amqp_url(amqp_url) else {
            return Ok(None);
        };
        match tokio::time::timeout(probe_timeout, c.overview()).await {
            Ok(Ok(_)) => Ok(Some(c)),
            // Answering but refusing the credentials: say so rather than silently using
            // rabbitmqctl (the operator likely wants the API).
            Ok(Err(e @ MgmtError::Unauthorized { .. })) => Err(e),
            _ => Ok(None),
        }
    }

    fn endpoint(&self, segments: &[&str]) -> Result<url::Url, MgmtError> {
        let mut u = self.base.clone();
        {
            let mut p = u
                .path_segments_mut()
                .map_err(|()| MgmtError::Config(String::from("the URL cannot be a base")))?;
            p.pop_if_empty();
            p.push("api");
            for s in segments {
                p.push(s);
            }
        }
        Ok(u)
    }

    async fn send(
        &self,
        method: reqwest::Method,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> Result<reqwest::Response, MgmtError> {
        let u = self.endpoint(segments)?;
        let what = format!("{} {}", method, u.path());
        let resp = self
            .http
            .request(method, u)
            .query(query)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(|e| MgmtError::Unreachable {
                url: self.url().to_owned(),
                // reqwest's error text can hold the URL; ours has no credentials in it,
                // and its source chain says what went wrong.
                reason: error_chain(&e),
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        match status.as_u16() {
            401 | 403 => Err(MgmtError::Unauthorized {
                url: self.url().to_owned(),
                status: status.as_u16(),
            }),
            404 => Err(MgmtError::NotFound(what)),
            code => {
                let body = resp.text().await.unwrap_or_default();
                Err(MgmtError::Status {
                    status: code,
                    what,
                    body: body.chars().take(300).collect(),
                })
            }
        }
    }

    async fn get<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> Result<T, MgmtError> {
        let resp = self.send(reqwest::Method::GET, segments, query).await?;
        let what = format!("GET /api/{}", segments.join("/"));
        let bytes = resp.bytes().await.map_err(|e| MgmtError::Unreachable {
            url: self.url().to_owned(),
            reason: error_chain(&e),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| MgmtError::Decode {
            what,
            reason: e.to_string(),
        })
    }

    /// `GET /api/overview`: the broker's version, cluster name and totals.
    pub async fn overview(&self) -> Result<Overview, MgmtError> {
        self.get(&["overview"], &[]).await
    }

    /// `GET /api/queues/{vhost}`: every queue of `vhost` with its counts and rates.
    pub async fn queues(&self, vhost: &str) -> Result<Vec<QueueInfo>, MgmtError> {
        self.get(&["queues", vhost], &[("disable_stats", "false")])
            .await
    }

    /// `GET /api/queues/{vhost}/{name}`; `Ok(None)` when it does not exist.
    pub async fn queue(&self, vhost: &str, name: &str) -> Result<Option<QueueInfo>, MgmtError> {
        match self.get(&["queues", vhost, name], &[]).await {
            Ok(q) => Ok(Some(q)),
            Err(MgmtError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET /api/consumers/{vhost}`: every consumer of `vhost`.
    pub async fn consumers(&self, vhost: &str) -> Result<Vec<ConsumerInfo>, MgmtError> {
        self.get(&["consumers", vhost], &[]).await
    }

    /// `GET /api/connections`: every client connection (of the vhosts the user may see).
    pub async fn connections(&self) -> Result<Vec<ConnectionInfo>, MgmtError> {
        self.get(&["connections"], &[]).await
    }

    /// `GET /api/exchanges/{vhost}`: the exchanges of `vhost`.
    pub async fn exchanges(&self, vhost: &str) -> Result<Vec<ExchangeInfo>, MgmtError> {
        self.get(&["exchanges", vhost], &[]).await
    }

    /// `DELETE /api/queues/{vhost}/{name}/contents`: removes every ready message.
    pub async fn purge(&self, vhost: &str, name: &str) -> Result<(), MgmtError> {
        self.send(
            reqwest::Method::DELETE,
            &["queues", vhost, name, "contents"],
            &[],
        )
        .await
        .map(|_| ())
    }
}

/// An error and its sources on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        src = s.source();
    }
    // reqwest puts the request URL in its text; ours carries no credentials, but make sure.
    strip_userinfo(&out)
}

/// Removes `user:pass@` from anything that looks like a URL in `s`.
fn strip_userinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || c == ')')
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => out.push_str(&authority[at + 1..]),
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// A rate (`*_details` in the API).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Rate {
    /// Per second, over the last sample interval.
    #[serde(default)]
    pub rate: f64,
}

/// Message counters and rates of a queue (`message_stats`); absent fields are 0.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MessageStats {
    /// Messages published into the queue.
    #[serde(default)]
    pub publish: u64,
    /// Publish rate.
    #[serde(default)]
    pub publish_details: Rate,
    /// Messages delivered to consumers (and basic.get).
    #[serde(default)]
    pub deliver_get: u64,
    /// Delivery rate.
    #[serde(default)]
    pub deliver_get_details: Rate,
    /// Messages acked by consumers.
    #[serde(default)]
    pub ack: u64,
    /// Ack rate.
    #[serde(default)]
    pub ack_details: Rate,
    /// Messages redelivered.
    #[serde(default)]
    pub redeliver: u64,
}

/// One queue, as `GET /api/queues/{vhost}` describes it (the fields warren uses).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct QueueInfo {
    /// Queue name.
    pub name: String,
    /// Its vhost.
    #[serde(default)]
    pub vhost: String,
    /// `classic`, `quorum`, `stream`.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// Ready messages.
    #[serde(default)]
    pub messages_ready: Option<u64>,
    /// Delivered, not yet acked.
    #[serde(default)]
    pub messages_unacknowledged: Option<u64>,
    /// Ready + unacked.
    #[serde(default)]
    pub messages: Option<u64>,
    /// Consumers attached.
    #[serde(default)]
    pub consumers: Option<u64>,
    /// Durable.
    #[serde(default)]
    pub durable: bool,
    /// The node the queue (its leader) lives on.
    #[serde(default)]
    pub node: Option<String>,
    /// Counters and rates (absent until something happened, or with stats disabled).
    #[serde(default)]
    pub message_stats: Option<MessageStats>,
}

/// `GET /api/overview` (the fields warren shows).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Overview {
    /// RabbitMQ's version.
    #[serde(default)]
    pub rabbitmq_version: Option<String>,
    /// The management plugin's version.
    #[serde(default)]
    pub management_version: Option<String>,
    /// Erlang's version.
    #[serde(default)]
    pub erlang_version: Option<String>,
    /// The cluster's name.
    #[serde(default)]
    pub cluster_name: Option<String>,
    /// The node that answered.
    #[serde(default)]
    pub node: Option<String>,
    /// Objects: `queues`, `connections`, `channels`, `consumers`, `exchanges`.
    #[serde(default)]
    pub object_totals: serde_json::Map<String, serde_json::Value>,
}

/// The queue a consumer consumes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct QueueRef {
    /// Queue name.
    pub name: String,
    /// Its vhost.
    #[serde(default)]
    pub vhost: String,
}

/// The channel (and connection) a consumer is on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ChannelDetails {
    /// The connection's name (`<peer> -> <broker>`), as in [`ConnectionInfo::name`].
    #[serde(default)]
    pub connection_name: String,
    /// The client's address.
    #[serde(default)]
    pub peer_host: Option<String>,
    /// The client's port.
    #[serde(default)]
    pub peer_port: Option<serde_json::Value>,
}

/// One consumer, from `GET /api/consumers/{vhost}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ConsumerInfo {
    /// The queue consumed.
    pub queue: QueueRef,
    /// The consumer tag.
    #[serde(default)]
    pub consumer_tag: String,
    /// Prefetch of the consumer's channel.
    #[serde(default)]
    pub prefetch_count: Option<u64>,
    /// Its channel.
    #[serde(default)]
    pub channel_details: ChannelDetails,
}

/// One connection, from `GET /api/connections`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ConnectionInfo {
    /// `<peer> -> <broker>`.
    pub name: String,
    /// The vhost.
    #[serde(default)]
    pub vhost: Option<String>,
    /// The user that connected (a name, never a password).
    #[serde(default)]
    pub user: Option<String>,
    /// `running`, `blocked`, ...
    #[serde(default)]
    pub state: Option<String>,
    /// Open channels.
    #[serde(default)]
    pub channels: Option<u64>,
    /// Client address.
    #[serde(default)]
    pub peer_host: Option<String>,
    /// Client port.
    #[serde(default)]
    pub peer_port: Option<serde_json::Value>,
    /// When it connected, ms since the epoch.
    #[serde(default)]
    pub connected_at: Option<u64>,
    /// What the client said about itself (`connection_name`, `product`, ...).
    #[serde(default)]
    pub client_properties: serde_json::Map<String, serde_json::Value>,
}

impl ConnectionInfo {
    /// The name the client gave its connection (warren: `warren worker (consume)`, ...).
    #[must_use]
    pub fn client_name(&self) -> Option<&str> {
        self.client_properties
            .get("connection_name")
            .and_then(serde_json::Value::as_str)
    }
}

/// One exchange, from `GET /api/exchanges/{vhost}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExchangeInfo {
    /// Exchange name (`""` for the default exchange).
    pub name: String,
    /// `direct`, `topic`, `fanout`, `headers`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Durable.
    #[serde(default)]
    pub durable: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_kept_apart() {
        let c = ManagementClient::new("http://ops:s%40cret@rabbit.example.com:15672").expect("ok");
        assert_eq!(c.url(), "http://rabbit.example.com:15672/");
        assert_eq!(c.user, "ops");
        assert_eq!(c.password, "s@cret");
        assert!(!format!("{c:?}").contains("cret"));
        let e = c.endpoint(&["queues", "/", "warren.svc.a"]).expect("url");
        assert_eq!(
            e.as_str(),
            "http://rabbit.example.com:15672/api/queues/%2F/warren.svc.a"
        );
    }

    #[test]
    fn from_amqp() {
        let c = ManagementClient::from_amqp_url("amqp://app:pw@10.0.0.5:5672/%2f").expect("ok");
        assert_eq!(c.url(), "http://10.0.0.5:15672/");
        assert_eq!((c.user.as_str(), c.password.as_str()), ("app", "pw"));
        let c = ManagementClient::from_amqp_url("amqps://h.example:5671/").expect("ok");
        assert_eq!(c.url(), "https://h.example:15672/");
        assert_eq!(c.user, "guest");
    }

    #[test]
    fn bad_urls_say_so_without_secrets() {
        let e = ManagementClient::new("amqp://u:topsecret@h/").expect_err("not http");
        assert!(!e.to_string().contains("topsecret"), "{e}");
        assert!(!e.is_transient());
        assert_eq!(
            strip_userinfo("error sending request for url (http://u:p@h:1/api/x): refused"),
            "error sending request for url (http://h:1/api/x): refused"
        );
    }

    #[test]
    fn transient_errors() {
        let s = |status| MgmtError::Status {
            status,
            what: String::new(),
            body: String::new(),
        };
        assert!(s(503).is_transient());
        assert!(!s(400).is_transient());
        assert!(MgmtError::Unreachable {
            url: String::new(),
            reason: String::new()
        }
        .is_transient());
    }
}
