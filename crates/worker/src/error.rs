//! Errors of the worker runtime itself (not of tasks: see [`crate::TaskError`]).

/// Why a worker could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// A service or method name is invalid.
    #[error(transparent)]
    Name(#[from] warren_core::NameError),
    /// The same method was registered twice, or a service twice.
    #[error("{0} is registered twice")]
    Duplicate(String),
    /// A subscription names a method the service does not register.
    #[error("{0} subscribes to topic {1:?} but has no such method")]
    UnknownMethod(String, String),
    /// A retry policy was set for a method the service does not register.
    #[error("{0} has a retry policy (Service::retry_method) but no such method")]
    UnknownRetryMethod(String),
    /// A time limit was set for a method the service does not register.
    #[error("{0} has a time limit (Service::time_limit) but no such method")]
    UnknownTimeLimitMethod(String),
    /// A time limit of zero was given to `Service::time_limit`.
    #[error("{0} has a time limit of zero (Service::time_limit needs more than zero)")]
    ZeroTimeLimit(String),
    /// A rate limit (`Service::rate_limit`) that cannot be kept: zero tasks, a zero period,
    /// or more than a million starts a second.
    #[error("{method} has an invalid rate limit (Service::rate_limit): {reason}")]
    InvalidRate {
        /// `svc.method`.
        method: String,
        /// What is wrong.
        reason: String,
    },
    /// A per-key limit of zero was given to `Service::key_concurrency`.
    #[error("{0} has a per-key concurrency of zero (Service::key_concurrency needs at least 1)")]
    ZeroKeyConcurrency(String),
    /// A rate limit or per-key limit was set for a method the service does not register.
    #[error("{0} has a flow limit (Service::rate_limit or key_concurrency) but no such method")]
    UnknownFlowMethod(String),
    /// A priority range of zero was given to `Service::priorities`.
    #[error("service {0} has a priority range of zero (Service::priorities needs 1 to 255)")]
    ZeroPriorities(String),
    /// `Service::priorities` and the worker's `AmqpConfig::with_priorities` disagree about
    /// a service's range (both declare its queue, so they must be equal).
    #[error("service {svc} has priorities 0..={service} (Service::priorities) but 0..={config} in its AmqpConfig (with_priorities)")]
    PriorityMismatch {
        /// The service.
        svc: String,
        /// The range `Service::priorities` gave.
        service: u8,
        /// The range the `AmqpConfig` gave.
        config: u8,
    },
    /// Two values of the same type were given to `WorkerBuilder::state`.
    #[error("shared state of type {0} is registered twice")]
    DuplicateState(&'static str),
    /// Registrations were invalid (names, duplicates, unknown methods): every problem found,
    /// reported by `build` before it connects.
    #[error("invalid registrations: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Registration(Vec<WorkerError>),
    /// The worker has no services (and no schedules).
    #[error("a worker needs at least one service or schedule")]
    NoServices,
    /// A schedule is invalid: its cron expression, time zone, interval, name or payload
    /// (`WorkerBuilder::schedule`), or its name is registered twice.
    #[error(transparent)]
    Schedule(#[from] warren_core::schedule::ScheduleError),
    /// The broker failed in a way retrying does not fix (e.g. a service queue exists with
    /// another queue type).
    #[error(transparent)]
    Broker(#[from] warren_core::Error),
    /// The `/metrics` endpoint asked for with `WorkerBuilder::metrics_listen` could not be
    /// set up.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// The embedded client failed.
    #[error(transparent)]
    Client(#[from] warren_client::Error),
}
