//! Broker configuration: URLs (several for a cluster), heartbeats, reconnect policy, TLS
//! trust for `amqps://` URLs and the queue type of the queues warren declares.
//!
//! Precedence: values set with the `with_*` builder methods win over `WARREN_AMQP_URL`, which
//! wins over the default `amqp://guest:guest@127.0.0.1:5672/%2f`. The same goes for the TLS
//! settings and their variables ([`CA_FILE_ENV`], [`CLIENT_CERT_ENV`], [`CLIENT_KEY_ENV`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// The environment variable read by [`AmqpConfig::from_env`]: one URL or a comma-separated
/// list (a cluster; warren fails over between them in order).
pub const URL_ENV: &str = "WARREN_AMQP_URL";

/// The environment variable read by [`AmqpConfig::from_env`]: a PEM file of CA certificates
/// to trust for `amqps://` URLs, besides the system's (see [`AmqpConfig::with_tls_ca_file`]).
pub const CA_FILE_ENV: &str = "WARREN_AMQP_CA_FILE";

/// The environment variable read by [`AmqpConfig::from_env`]: a PEM client certificate (chain)
/// for mutual TLS; needs [`CLIENT_KEY_ENV`] too (see [`AmqpConfig::with_tls_client_cert`]).
pub const CLIENT_CERT_ENV: &str = "WARREN_AMQP_CLIENT_CERT_FILE";

/// The environment variable read by [`AmqpConfig::from_env`]: the PEM private key of the
/// client certificate named by [`CLIENT_CERT_ENV`].
pub const CLIENT_KEY_ENV: &str = "WARREN_AMQP_CLIENT_KEY_FILE";

/// The URL used when nothing else is configured.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// An `amqp://` or `amqps://` URL whose password never shows in `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    full: String,
    redacted: String,
}

/// The AMQP frame size warren asks for when the URL sets none (see [`AmqpUrl::parse`]).
pub const DEFAULT_FRAME_MAX: u32 = 16_384;

impl AmqpUrl {
    /// Parses and checks a URL; adds `heartbeat=10` when the URL sets no heartbeat, so a
    /// black-holed connection is noticed within about 20 seconds, and `frame_max=16384` when
    /// it sets no frame size: lapin keeps a send and a receive buffer of 32 frames per
    /// connection, zero-filled, so RabbitMQ's default 128 KiB frames cost 8 MiB of memory per
    /// connection, and 16 KiB frames 1 MiB (a larger message is sent as more frames).
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
        if !url.query_pairs().any(|(k, _)| k == "frame_max") {
            url.query_pairs_mut()
                .append_pair("frame_max", &DEFAULT_FRAME_MAX.to_string());
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
    /// The delay levels (`crate::delay`): real time unless a test sped them up.
    delay_levels: crate::delay::DelayLevels,
    /// How long a publish may wait for its confirm (reconnects included) before failing.
    pub publish_timeout: Duration,
    /// Name shown for the connection in RabbitMQ's tools.
    pub connection_name: String,
    /// Extra TLS trust and client identity for `amqps://` URLs.
    tls: TlsSettings,
    /// Services whose queue has a priority range (`x-max-priority`), by service name.
    priorities: std::collections::BTreeMap<String, u8>,
}

/// TLS settings for `amqps://` URLs: extra trusted CAs and a client identity. Its `Debug`
/// shows file names only, never certificate or key material.
#[derive(Clone, Default)]
struct TlsSettings {
    /// The CA file read, for messages.
    ca_file: Option<PathBuf>,
    /// Its PEM text (one or more certificates).
    ca_pem: Option<String>,
    /// Client certificate for mutual TLS.
    client: Option<ClientIdentity>,
}

#[derive(Clone)]
struct ClientIdentity {
    cert_file: PathBuf,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("ca_file", &self.ca_file)
            .field(
                "client_cert_file",
                &self.client.as_ref().map(|c| &c.cert_file),
            )
            .finish_non_exhaustive()
    }
}

/// A non-empty environment variable.
fn env_value(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Reads a file for a TLS setting; errors name the file and the setting, never its content.
fn read_tls_file(what: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::Config(format!("cannot read {what} {}: {e}", path.display())))
}

/// Checks that `pem` holds at least one well-formed PEM certificate.
fn check_certificates(what: &str, path: &Path, pem: &[u8]) -> Result<()> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut count = 0usize;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| {
            Error::Config(format!("{what} {} is not valid PEM: {e}", path.display()))
        })?;
        count += 1;
    }
    if count == 0 {
        return Err(Error::Config(format!(
            "{what} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(())
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
            delay_levels: crate::delay::DelayLevels::new(),
            publish_timeout: Duration::from_secs(30),
            connection_name: String::from("warren"),
            tls: TlsSettings::default(),
            priorities: std::collections::BTreeMap::new(),
        })
    }

    /// `WARREN_AMQP_URL` if set, else `amqp://guest:guest@127.0.0.1:5672/%2f`, with the TLS
    /// settings of [`with_tls_from_env`](Self::with_tls_from_env).
    pub fn from_env() -> Result<Self> {
        let cfg = match env_value(URL_ENV) {
            Some(v) => Self::new(&v)?,
            None => Self::new(DEFAULT_URL)?,
        };
        cfg.with_tls_from_env()
    }

    /// Applies the TLS files named by `WARREN_AMQP_CA_FILE`
    /// ([`with_tls_ca_file`](Self::with_tls_ca_file)) and `WARREN_AMQP_CLIENT_CERT_FILE` +
    /// `WARREN_AMQP_CLIENT_KEY_FILE` ([`with_tls_client_cert`](Self::with_tls_client_cert)),
    /// when set. An unreadable or malformed file, or only one of the client variables, is an
    /// [`Error::Config`] here, not at connect time.
    pub fn with_tls_from_env(mut self) -> Result<Self> {
        if let Some(ca) = env_value(CA_FILE_ENV) {
            self = self.with_tls_ca_file(ca.trim())?;
        }
        match (env_value(CLIENT_CERT_ENV), env_value(CLIENT_KEY_ENV)) {
            (Some(cert), Some(key)) => self.with_tls_client_cert(cert.trim(), key.trim()),
            (None, None) => Ok(self),
            (Some(_), None) => Err(Error::Config(format!(
                "{CLIENT_CERT_ENV} is set but {CLIENT_KEY_ENV} is not"
            ))),
            (None, Some(_)) => Err(Error::Config(format!(
                "{CLIENT_KEY_ENV} is set but {CLIENT_CERT_ENV} is not"
            ))),
        }
    }

    /// Trusts the CA certificates in the PEM file at `path` for `amqps://` URLs, in addition
    /// to the system's trusted roots (for a broker whose certificate a private CA issued).
    /// The file is read and checked now: an unreadable file, or one without a PEM
    /// certificate, is an [`Error::Config`]. Ignored for `amqp://` URLs.
    ///
    /// The server's certificate must also be valid for the host name in the URL (a DNS or
    /// IP subject alternative name); otherwise connecting fails with [`Error::Tls`].
    pub fn with_tls_ca_file(mut self, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let pem = read_tls_file("TLS CA file", path)?;
        check_certificates("TLS CA file", path, &pem)?;
        let pem = String::from_utf8(pem).map_err(|_| {
            Error::Config(format!("TLS CA file {} is not PEM text", path.display()))
        })?;
        self.tls.ca_file = Some(path.to_path_buf());
        self.tls.ca_pem = Some(pem);
        Ok(self)
    }

    /// Presents a client certificate for mutual TLS on `amqps://` URLs: `cert` is a PEM file
    /// with the certificate (and any intermediates), `key` a PEM file with its unencrypted
    /// private key (PKCS#8, PKCS#1 or SEC1). Both are read and checked now ([`Error::Config`]
    /// if unusable; the key's content never appears in errors or `Debug`). Authenticating
    /// *as* the certificate's subject (RabbitMQ's `EXTERNAL` mechanism) is not done: the
    /// URL's user name and password still log in.
    pub fn with_tls_client_cert(
        mut self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::PrivateKeyDer;
        let (cert, key) = (cert.as_ref(), key.as_ref());
        let cert_pem = read_tls_file("TLS client certificate file", cert)?;
        check_certificates("TLS client certificate file", cert, &cert_pem)?;
        let key_pem = read_tls_file("TLS client key file", key)?;
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            Error::Config(format!(
                "TLS client key file {} holds no usable unencrypted PEM private key: {e}",
                key.display()
            ))
        })?;
        self.tls.client = Some(ClientIdentity {
            cert_file: cert.to_path_buf(),
            cert_pem,
            key_pem,
        });
        Ok(self)
    }

    /// The CA file given to [`with_tls_ca_file`](Self::with_tls_ca_file), if any.
    #[must_use]
    pub fn tls_ca_file(&self) -> Option<&Path> {
        self.tls.ca_file.as_deref()
    }

    /// The client certificate file given to
    /// [`with_tls_client_cert`](Self::with_tls_client_cert), if any.
    #[must_use]
    pub fn tls_client_cert_file(&self) -> Option<&Path> {
        self.tls.client.as_ref().map(|c| c.cert_file.as_path())
    }

    /// lapin's TLS configuration for these settings.
    pub(crate) fn lapin_tls(&self) -> lapin::tcp::OwnedTLSConfig {
        lapin::tcp::OwnedTLSConfig {
            identity: self
                .tls
                .client
                .as_ref()
                .map(|c| lapin::tcp::OwnedIdentity::PKCS8 {
                    pem: c.cert_pem.clone(),
                    key: c.key_pem.clone(),
                }),
            cert_chain: self.tls.ca_pem.clone(),
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

    /// Gives service `svc`'s queue the priority range `0..=max` (`x-max-priority`): its
    /// tasks are delivered highest `Task::priority` first. Every process that declares the
    /// queue (the worker hosting `svc`, which also learns it from `Service::priorities`, and
    /// every client that sends to it) must carry the same setting, because RabbitMQ
    /// refuses to declare a queue again with other arguments. Classic queues only: a
    /// quorum queue with priorities is [`Error::PrioritiesNeedClassic`] when it is declared.
    /// Keep `max` small (at most 10): each level costs the broker memory and CPU. See
    /// docs/flow.md#priorities.
    ///
    /// Errors: [`Error::Config`] for `max` 0; [`Error::Name`] for an invalid service name.
    ///
    /// ```
    /// use warren_core::{AmqpConfig, QueueType};
    /// let cfg = AmqpConfig::new("amqp://127.0.0.1").unwrap()
    ///     .with_queue_type(QueueType::Classic)
    ///     .with_priorities("reports", 5).unwrap();
    /// assert_eq!(cfg.max_priority("reports"), Some(5));
    /// assert_eq!(cfg.max_priority("other"), None);
    /// assert!(cfg.with_priorities("reports", 0).is_err());
    /// ```
    pub fn with_priorities(mut self, svc: &str, max: u8) -> Result<Self> {
        crate::names::validate_name("service", svc)?;
        if max == 0 {
            return Err(Error::Config(format!(
                "the priority range of service {svc:?} must be 1 to 255 (10 or less recommended), not 0"
            )));
        }
        self.priorities.insert(svc.to_owned(), max);
        Ok(self)
    }

    /// The highest priority of service `svc`'s queue, when it has a range
    /// ([`AmqpConfig::with_priorities`]).
    #[must_use]
    pub fn max_priority(&self, svc: &str) -> Option<u8> {
        self.priorities.get(svc).copied()
    }

    /// Every service with a priority range, and its highest priority.
    #[must_use]
    pub fn priorities(&self) -> &std::collections::BTreeMap<String, u8> {
        &self.priorities
    }

    /// **For tests only**: sends delayed tasks and retries through levels of the test's
    /// own ([`crate::delay::DelayLevels::for_test`]), so it can count what waits in them,
    /// optionally sped up. Every process sending delayed tasks in such a test must use the
    /// same levels; workers that only receive them need nothing (delivery goes through the
    /// shared `warren.delay.deliver` exchange).
    #[must_use]
    pub fn with_delay_levels(mut self, levels: crate::delay::DelayLevels) -> Self {
        self.delay_levels = levels;
        self
    }

    /// The delay levels delayed tasks and retries are sent through.
    #[must_use]
    pub fn delay_levels(&self) -> crate::delay::DelayLevels {
        self.delay_levels.clone()
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
        assert!(u.secret().contains("frame_max=16384"));
        let u = AmqpUrl::parse("amqp://h/?heartbeat=3&frame_max=131072").unwrap();
        assert!(!u.secret().contains("heartbeat=10"));
        assert!(!u.secret().contains("frame_max=16384"));
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
