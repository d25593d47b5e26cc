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
    Encode(#[source] std::sync::Arc<serde_json::Error>),
    /// A delay (`Task::delay`, `Task::at`, `Parallel::delay`, `Chain::delay`) over the
    /// longest supported ([`warren_core::delay::MAX_DELAY`], about 38.8 days); nothing was
    /// sent.
    #[error(transparent)]
    DelayTooLong(#[from] warren_core::delay::DelayTooLong),
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
    /// A parallel invoke was given no targets; nothing was sent.
    #[error("a parallel invoke needs at least one target")]
    NoTargets,
    /// A task was given a time limit of zero (`Task::time_limit`); nothing was sent.
    #[error("a task's time limit must be more than zero")]
    ZeroTimeLimit,
    /// A concurrency key (`Task::key`) is empty or over 255 bytes; nothing was sent.
    #[error(transparent)]
    Key(#[from] warren_core::flow::KeyError),
    /// A task's priority (`Task::priority`) is above its service's range (or the service
    /// has none in this client's `AmqpConfig::with_priorities`); nothing was sent.
    #[error(transparent)]
    PriorityOutOfRange(#[from] warren_core::PriorityOutOfRange),
    /// An invoke/retry was given zero repeats; nothing was sent.
    #[error("invoke/retry needs repeats >= 1 (the number of attempts in all)")]
    ZeroRepeats,
    /// An invoke/retry was given no interval; nothing was sent.
    #[error("invoke/retry needs an interval: call .seconds(..), .minutes(..) or .interval(..)")]
    MissingInterval,
    /// Chains were to run with `max_parallel` 0; nothing was sent.
    #[error("chains in parallel need max_parallel >= 1")]
    ZeroParallel,
    /// A blocking invoke/retry failed on every attempt; `failure` is the last one.
    #[error("{target} failed on all {attempts} attempts (cid {cid}); last: {failure}")]
    RetriesExhausted {
        /// The target, `svc.method`.
        target: String,
        /// The call's correlation id.
        cid: String,
        /// Attempts made.
        attempts: u32,
        /// The last attempt's failure.
        failure: Failure,
    },
    /// A status was asked for but this client has no status store
    /// ([`crate::ClientBuilder::status_store`]): results then reach only waiting callers.
    #[error("no status store is configured: task statuses are not recorded (configure one with ClientBuilder::status_store)")]
    NoStatusStore,
    /// The status store failed.
    #[error(transparent)]
    Store(#[from] warren_core::status::StoreError),
    /// A unique task (`Task::unique`) was refused; nothing was sent.
    #[error(transparent)]
    Unique(#[from] crate::UniqueError),
    /// The client's reply listener stopped (the client is shutting down or the broker
    /// refused the reply queue).
    #[error("the reply listener stopped: {0}")]
    ReplyListener(String),
}

impl Error {
    /// For a send that failed: `Some(true)` when the broker may hold the task anyway (it may
    /// run; sending it again could run it twice), `Some(false)` when it surely does not,
    /// `None` when the error is not about an unconfirmed publish. See
    /// [`warren_core::Error::maybe_stored`].
    ///
    /// ```no_run
    /// # async fn demo(client: warren_client::Client) {
    /// use warren_client::Task;
    /// match client.enqueue(Task::new("images.resize", &7)).await {
    ///     Ok(r) => println!("queued {}", r.id),
    ///     Err(e) if e.maybe_stored() == Some(true) => println!("unsure: check before resending ({e})"),
    ///     Err(e) => println!("not queued: {e}"),
    /// }
    /// # }
    /// ```
    #[must_use]
    pub fn maybe_stored(&self) -> Option<bool> {
        match self {
            Error::Broker(e) => e.maybe_stored(),
            Error::Name(_)
            | Error::Encode(_)
            | Error::Unique(_)
            | Error::Key(_)
            | Error::PriorityOutOfRange(_) => Some(false),
            _ => None,
        }
    }

    /// `true` when the same call may succeed later (the broker or the status store is
    /// unreachable, a publish was not confirmed in time, a queue's node is down, the
    /// process is shutting down); `false` when retrying cannot help (an invalid name, a
    /// payload that does not encode, a refusal such as mismatched queue arguments, a task
    /// that failed). The worker settles a delivery whose outcome could not be published by
    /// this answer: requeued (with backoff) when transient, dead-lettered otherwise.
    ///
    /// ```
    /// use warren_client::Error;
    /// assert!(!Error::NoTargets.is_transient());
    /// assert!(Error::Broker(warren_core::Error::Shutdown).is_transient());
    /// ```
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Broker(e) => {
                e.is_transient()
                    || e.is_node_down()
                    || matches!(
                        e,
                        warren_core::Error::Shutdown | warren_core::Error::Nacked { .. }
                    )
            }
            Error::Store(_) | Error::Timeout { .. } | Error::ReplyListener(_) => true,
            _ => false,
        }
    }

    /// The worker-side failure kind, when the task ran and failed.
    #[must_use]
    pub fn failure_kind(&self) -> Option<FailureKind> {
        match self {
            Error::Failed { failure, .. } | Error::RetriesExhausted { failure, .. } => {
                Some(failure.kind)
            }
            _ => None,
        }
    }
}
