//! warren: a distributed worker framework for Rust on RabbitMQ.
//!
//! Worker processes host named services; any process enqueues or invokes work through a
//! client. This facade re-exports the three crates:
//!
//! - [`client`] (`warren-client`): [`Client`], [`Task`]: enqueue, invoke; [`Parallel`]
//!   (parallel execution, fan-out/fan-in) and [`InvokeRetry`].
//! - [`worker`] (`warren-worker`): [`Worker`], [`Service`], [`Context`], [`TaskError`].
//! - [`core`] (`warren-core`): the envelope, names, topology, configuration and AMQP layer.
//!
//! See the README for a quick start and `docs/` for the architecture, wire format and
//! guarantees.

pub mod testing;

pub use warren_client as client;
pub use warren_core as core;
pub use warren_worker as worker;

pub use warren_client::{
    as_completed, Chain, ChainHandle, ChainResult, Client, ClientBuilder, Error as ClientError,
    Extract, InvokeRetry, Parallel, ParallelReceipt, Receipt, Retried, Task,
};
#[cfg(feature = "redis")]
pub use warren_core::status::RedisStore;
pub use warren_core::status::{StatusStore, TaskState, TaskStatus};
pub use warren_core::{
    AmqpConfig, Failure, FailureKind, FanInOutcome, QueueType, RetryOutcome, SplitStarted, Target,
    TargetOutcome, Via,
};
pub use warren_worker::{
    Context, RetryPolicy, Service, TaskError, Worker, WorkerBuilder, WorkerError,
};

/// The README's and `docs/patterns.md`'s code blocks, compiled by `cargo test` so the
/// documentation cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
#[doc = include_str!("../docs/patterns.md")]
#[doc = include_str!("../docs/pubsub.md")]
#[doc = include_str!("../docs/chains.md")]
pub struct DocExamples;
