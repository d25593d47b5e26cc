//! warren: a distributed worker framework for Rust on RabbitMQ.
//!
//! Worker processes host named services; any process enqueues or invokes work through a
//! client. This facade is the one curated set of names a user needs, each at one path:
//!
//! - the client side: [`Client`], [`Task`] (enqueue, invoke), [`Parallel`] (parallel
//!   execution, fan-out/fan-in), [`InvokeRetry`], [`Chain`] and its handles;
//! - the worker side: [`Worker`], [`Service`], [`Context`], [`TaskError`];
//! - outcomes and configuration: [`Failure`], [`FailureKind`], [`RetryPolicy`],
//!   [`AmqpConfig`], [`QueueType`], [`ReconnectPolicy`];
//! - [`wire`]: the envelope and the other wire types, for tools and producers that build
//!   messages themselves (docs/wire-format.md);
//! - [`topology`]: the names of warren's queues and exchanges, for operators and tests;
//! - [`testing`]: a worker for your own tests.
//!
//! The crates behind it (`warren-core`, `warren-client`, `warren-worker`) stay available
//! for lower-level work. See the README for a quick start and `docs/` for the architecture,
//! wire format and guarantees.

pub mod testing;

/// Queue and exchange names and specs (`warren.svc.<svc>`, `warren.dead.<svc>`, part and
/// subscription queues, ...): what operators and tests look for on the broker.
pub use warren_core::topology;

/// Delayed delivery (docs/time.md): the longest delay ([`delay::MAX_DELAY`]), the delay
/// levels' names and headers, and test-only levels ([`delay::DelayLevels::for_test`]).
pub use warren_core::delay;

/// The wire types: the envelope a task travels in, its hooks and decorators, the reply, and
/// the chain state (docs/wire-format.md).
pub mod wire {
    pub use warren_core::cancel::{CancelRequest, CANCEL_EXCHANGE};
    pub use warren_core::chain::ChainState;
    pub use warren_core::envelope::{
        Envelope, HookTarget, Hooks, PartDecorator, Reply, ReplyOutcome, ENVELOPE_VERSION,
    };
}

/// Metrics: the names and labels warren records (docs/operations.md#metrics), and warren's
/// own Prometheus recorder with its `/metrics` endpoint (`WorkerBuilder::metrics_listen`).
pub mod metrics {
    pub use warren_core::metrics::*;
    pub use warren_worker::{MetricsError, MetricsServer, Prometheus};
}

/// W3C trace context in AMQP headers: what every published message carries, and the
/// context a handler runs in (`TraceContext::current()`); OpenTelemetry with the `otel`
/// feature (docs/operations.md#tracing).
pub use warren_core::trace;

pub use warren_client::{
    as_completed, Chain, ChainHandle, ChainResult, Client, ClientBuilder, Error as ClientError,
    Extract, InvokeRetry, Message, Parallel, ParallelReceipt, Receipt, Retried, Task,
};
/// Cancellation and unique tasks (docs/cancellation.md).
pub use warren_client::{CancelOutcome, CancelScope, Found, UniqueError, UniqueKeyError};
#[cfg(feature = "redis")]
pub use warren_core::status::RedisStore;
pub use warren_core::status::{StatusStore, TaskState, TaskStatus};
pub use warren_core::{
    AmqpConfig, Error as BrokerError, Failure, FailureKind, FanInOutcome, IntoTarget, QueueType,
    ReconnectPolicy, RetryOutcome, SplitStarted, Target, TargetOutcome, Via,
};
pub use warren_worker::{
    Context, RetryPolicy, Service, TaskError, Worker, WorkerBuilder, WorkerError,
    DEFAULT_CANCEL_GRACE, DUPLICATE_STEPS,
};
/// Schedules (docs/time.md#schedules): `WorkerBuilder::schedule(name, Schedule, target,
/// payload)`; [`Missed`] is the missed-tick policy.
pub use warren_worker::{Missed, Schedule, ScheduleError};

/// The README's and `docs/patterns.md`'s code blocks, compiled by `cargo test` so the
/// documentation cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
#[doc = include_str!("../docs/patterns.md")]
#[doc = include_str!("../docs/pubsub.md")]
#[doc = include_str!("../docs/chains.md")]
#[doc = include_str!("../docs/cancellation.md")]
pub struct DocExamples;
