//! The error type of warren-core.
//!
//! One `#[non_exhaustive]` enum; each variant keeps its source, and [`Error::is_transient`]
//! answers the question reconnect and retry logic asks: "may the same call succeed later?".

use std::time::Duration;

use crate::names::NameError;

/// Result alias for warren-core operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in warren's shared layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A service, method or AMQP name is invalid (bad characters, empty, or over 255 bytes).
    #[error(transparent)]
    Name(#[from] NameError),
    /// The configuration is unusable (bad URL, empty URL list, ...).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// No broker in the URL list accepted a connection within the reconnect policy.
    #[error("could not connect to RabbitMQ at {urls} (tried for {waited:.1?})")]
    Unavailable {
        /// The URLs tried, credentials removed.
        urls: String,
        /// How long warren kept trying.
        waited: Duration,
        /// The last connection error.
        #[source]
        source: Option<AmqpError>,
    },
    /// The broker refused an operation (a protocol-level error, e.g. a queue declared
    /// with other arguments, or access refused). Retrying the same call will not help.
    #[error("RabbitMQ refused {what}")]
    Refused {
        /// What warren was doing.
        what: String,
        /// The broker's answer.
        #[source]
        source: AmqpError,
    },
    /// The connection or channel failed while the operation was in flight.
    #[error("connection to RabbitMQ lost during {what}")]
    ConnectionLost {
        /// What warren was doing.
        what: String,
        /// The lapin error.
        #[source]
        source: AmqpError,
    },
    /// The broker negatively acknowledged a publish (it could not store it, e.g. a queue
    /// with `x-overflow=reject-publish` is full).
    #[error("RabbitMQ rejected the message published to {exchange:?} with key {routing_key:?}")]
    Nacked {
        /// Exchange published to.
        exchange: String,
        /// Routing key used.
        routing_key: String,
    },
    /// A mandatory publish could not be routed to any queue (the broker returned it).
    #[error("no queue is bound for {exchange:?} / {routing_key:?} (returned: {reply_text})")]
    Unroutable {
        /// Exchange published to.
        exchange: String,
        /// Routing key used.
        routing_key: String,
        /// The broker's reply text, e.g. `NO_ROUTE`.
        reply_text: String,
    },
    /// An operation did not finish before its deadline.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What timed out.
        what: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// A JSON body could not be encoded or decoded.
    #[error("JSON codec error: {0}")]
    Json(#[from] serde_json::Error),
    /// A publish was not confirmed before its deadline, although it was tried again through
    /// nacks, lost connections and failovers. `maybe_stored` tells whether sending it again
    /// could duplicate it: `true` when an attempt reached the broker without a definite
    /// answer (sent, then nacked or the confirm was lost: a nack during a leader election
    /// may still have stored a first copy); `false` when no attempt can have been stored
    /// (the broker could not be reached, or every attempt came back unroutable).
    #[error("publishing to {exchange:?} with key {routing_key:?} was not confirmed within {after:?} ({}){}",
        if *maybe_stored { "the broker may hold it" } else { "it was not stored" },
        last.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default())]
    Unconfirmed {
        /// Exchange published to.
        exchange: String,
        /// Routing key used.
        routing_key: String,
        /// How long warren kept trying.
        after: Duration,
        /// Whether the broker may hold the message (a retry could duplicate it).
        maybe_stored: bool,
        /// The last error seen.
        #[source]
        last: Option<Box<Error>>,
    },
    /// A delay over the longest the delay levels support ([`crate::delay::MAX_DELAY`]);
    /// nothing was published.
    #[error(transparent)]
    DelayTooLong(#[from] crate::delay::DelayTooLong),
    /// A service was given a priority range (`AmqpConfig::with_priorities`,
    /// `Service::priorities`) while its queues are quorum queues, which RabbitMQ 3.10 cannot
    /// give priorities (`x-max-priority` is refused); nothing was declared or published.
    /// Priorities need `QueueType::Classic` (docs/flow.md#priorities).
    #[error("service {svc:?} has a priority range, but its queues are quorum queues, which cannot have priorities on RabbitMQ 3.10: use QueueType::Classic for it (docs/flow.md)")]
    PrioritiesNeedClassic {
        /// The service.
        svc: String,
    },
    /// The process is shutting down and the operation was abandoned.
    #[error("shutting down")]
    Shutdown,
    /// The TLS handshake with the broker failed on a certificate: the server's certificate is
    /// not issued by a trusted CA, not valid for the host name connected to, expired, or the
    /// server refused the client certificate. Not transient: the same settings fail again.
    #[error("TLS certificate problem connecting to {url}: {reason}")]
    Tls {
        /// The URL connected to, credentials removed.
        url: String,
        /// What is wrong, in words.
        reason: String,
        /// lapin's error, carrying the TLS library's own description (boxed to keep
        /// [`Error`] small).
        #[source]
        source: Box<AmqpError>,
    },
}

impl Error {
    /// `true` when the same call may succeed if tried again later (the connection was lost,
    /// the broker was unreachable or a deadline passed); `false` for errors that repeat.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Unavailable { .. }
                | Error::ConnectionLost { .. }
                | Error::Timeout { .. }
                | Error::Unconfirmed { .. }
        )
    }

    /// `true` for a refusal because another connection holds a queue exclusively
    /// (`RESOURCE_LOCKED`, or `ACCESS_REFUSED ... exclusive`): after a node dies, the broker
    /// may still list the dead connection's exclusive queue or consumer for a moment, so a
    /// client resubscribing its reply queue on another node is refused until it is cleaned
    /// up. Retrying later helps.
    #[must_use]
    pub fn is_exclusive_conflict(&self) -> bool {
        matches!(self, Error::Refused { source, .. }
            if source.reply_code() == Some(405)
                || (source.reply_code() == Some(403) && source.to_string().contains("exclusive")))
    }

    /// `true` for a refusal that a cluster failover causes: a durable classic queue whose
    /// home node is down answers `NOT_FOUND ... down or inaccessible` until the node is back.
    /// Retrying later helps.
    #[must_use]
    pub fn is_node_down(&self) -> bool {
        matches!(self, Error::Refused { source, .. }
            if source.reply_code() == Some(404) && source.to_string().contains("down or inaccessible"))
    }

    /// For a publish error: `Some(true)` when the broker may hold the message anyway (sending
    /// it again could duplicate it), `Some(false)` when it surely does not, `None` when the
    /// error is not about an unconfirmed publish.
    #[must_use]
    pub fn maybe_stored(&self) -> Option<bool> {
        match self {
            Error::Unconfirmed { maybe_stored, .. } => Some(*maybe_stored),
            Error::Unroutable { .. } | Error::Name(_) | Error::Nacked { .. } => Some(false),
            _ => None,
        }
    }
}

/// An error reported by the AMQP library, kept opaque so that lapin's types stay out of
/// warren's public API. Its `Display` and `source()` carry lapin's description.
#[derive(Debug, Clone)]
pub struct AmqpError(pub(crate) lapin::Error);

impl std::fmt::Display for AmqpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

/// lapin's message already includes its cause, so the chain ends here (a `source()` would
/// print the same text twice).
impl std::error::Error for AmqpError {}

impl AmqpError {
    /// `true` when the broker closed only the channel (a soft protocol error such as
    /// `PRECONDITION_FAILED` or `NOT_FOUND`): the call itself was wrong, retrying won't help.
    pub(crate) fn is_refusal(&self) -> bool {
        self.0.is_amqp_soft_error()
    }

    /// The broker's reply code, when the error is a protocol error.
    #[must_use]
    pub fn reply_code(&self) -> Option<u16> {
        match self.0.kind() {
            lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
            _ => None,
        }
    }
}

/// Classify a lapin error raised while doing `what`.
pub(crate) fn classify(what: impl Into<String>, err: lapin::Error) -> Error {
    let source = AmqpError(err);
    let what = what.into();
    if source.is_refusal() {
        Error::Refused { what, source }
    } else {
        Error::ConnectionLost { what, source }
    }
}
