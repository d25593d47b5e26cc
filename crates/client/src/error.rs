//! The client's error type.

use std::time::Duration;

use uuid::Uuid;
use warren_core::{Failure, FailureKind, NameError};

/// What can go wrong when enqueuing or invoking.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A service, method or queue name is invalid; nothing was sent.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The payload could not be serialized to JSON; nothing was sent.
    #[error("payload could not be encoded as JSON")]
    Encode(#[source] serde_json::Error),
    /// The broker layer failed (unreachable, publish refused, unroutable, ...).
    #[error(transparent)]
    Broker(#[from] warren_core::Error),
    /// The task ran and failed; `failure` says how (handler error, rejection, bad payload,
    /// unknown method, panic).
    #[error("task {id} (cid {cid}) failed: {failure}")]
    Failed {
        /// Task id.
        id: Uuid,
        /// Correlation id.
        cid: String,
        /// Kind and message of the failure.
        failure: Failure,
    },
    /// No reply arrived before the invoke's deadline. The task may still run.
    #[error("no reply to task {id} (cid {cid}) within {after:?}")]
    Timeout {
        /// Task id.
        id: Uuid,
        /// Correlation id.
        cid: String,
        /// The deadline.
        after: Duration,
    },
    /// The reply did not deserialize into the type the caller asked for.
    #[error("reply to task {id} does not match the expected type")]
    Decode {
        /// Task id.
        id: Uuid,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// The client's reply listener stopped (the client is shutting down or the broker
    /// refused the reply queue).
    #[error("the reply listener stopped: {0}")]
    ReplyListener(String),
}

impl Error {
    /// The worker-side failure kind, when the task ran and failed.
    #[must_use]
    pub fn failure_kind(&self) -> Option<FailureKind> {
        match self {
            Error::Failed { failure, .. } => Some(failure.kind),
            _ => None,
        }
    }
}
