//! warren: a distributed worker framework for Rust on RabbitMQ.
//!
//! Worker processes host named services; any process enqueues or invokes work through a
//! client. This facade re-exports the three crates:
//!
//! - [`client`] (`warren-client`): [`Client`], [`Task`]: enqueue, invoke.
//! - [`worker`] (`warren-worker`): [`Worker`], [`Service`], [`Context`], [`TaskError`].
//! - [`core`] (`warren-core`): the envelope, names, topology, configuration and AMQP layer.
//!
//! See the README for a quick start and `docs/` for the architecture, wire format and
//! guarantees.

pub use warren_client as client;
pub use warren_core as core;
pub use warren_worker as worker;

pub use warren_client::{Client, ClientBuilder, Error as ClientError, Receipt, Task};
pub use warren_core::{AmqpConfig, Failure, FailureKind, QueueType, Target};
pub use warren_worker::{
    Context, RetryPolicy, Service, TaskError, Worker, WorkerBuilder, WorkerError,
};
