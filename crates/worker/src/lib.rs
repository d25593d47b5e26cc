//! warren-worker: host services and run their tasks.
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//! use warren_worker::{Context, Service, TaskError, Worker};
//!
//! #[derive(Deserialize)]
//! struct Add { a: i64, b: i64 }
//!
//! async fn add(_ctx: Context, req: Add) -> Result<i64, TaskError> {
//!     req.a.checked_add(req.b).ok_or_else(|| TaskError::reject("overflow"))
//! }
//!
//! # async fn run() -> Result<(), warren_worker::WorkerError> {
//! let worker = Worker::builder()
//!     .service(Service::new("math").method("add", add))
//!     .concurrency(16)
//!     .build()
//!     .await?;
//! // The library installs no signal handler: the binary decides what stops the worker.
//! worker.run_until(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
//!
//! # What a worker guarantees
//! - A task is acked only after its outcome (reply, retry, dead letter, hook) was published
//!   and confirmed; a worker killed at any instant loses nothing (the broker redelivers).
//! - Bad input (not JSON, wrong envelope version, unknown service or method, a payload that
//!   does not fit the handler's input type, a panic) is dead-lettered once with the reason,
//!   answered as an error to a waiting caller, never retried, and never stops the worker.
//! - A delivery from a connection that has since died is neither executed nor acked.
//!
//! # Layout
//! - `runtime`: [`Worker`], [`WorkerBuilder`]: consume, bound concurrency, drain on shutdown.
//! - `process`: what happens to one delivery, from decode to ack.
//! - `service`, `handler`: [`Service`] registration and typed handlers.
//! - `context`: [`Context`], what a running handler knows and can do.
//! - `outcome`: [`TaskError`], the explicit "fail / retry after / reject" a handler returns.
//! - `fanout`: the callbacks of parallel targets (each target's on-target callbacks).
//! - `cancel`, `unique`: cancellation (arrival check, broadcast, grace) and unique-task
//!   keys (docs/cancellation.md).
//! - `split`, `join`: split jobs and the exactly-once join that fan-ins share.
//! - `schedule`: schedules ([`Schedule`]): the lease, the ticker, one task per tick.
//! - `metrics`: per-method metric handles and [`Prometheus`], the optional `/metrics`
//!   endpoint (names in `warren_core::metrics`).
//!
//! Retry policies ([`RetryPolicy`]) and their delay queues live in `warren_core::retry`.

mod cancel;
mod chain;
mod context;
mod early;
mod error;
mod fanout;
mod flow;
mod handler;
mod join;
mod metrics;
mod outcome;
mod process;
mod publish;
mod runtime;
mod schedule;
mod service;
mod settle;
mod split;
mod state;
mod unique;

pub use cancel::DEFAULT_CANCEL_GRACE;
pub use context::Context;
pub use error::WorkerError;
pub use metrics::{MetricsError, MetricsServer, Prometheus};
pub use outcome::TaskError;
pub use process::DUPLICATE_STEPS;
pub use runtime::{Worker, WorkerBuilder, DEFAULT_COMPLETION_WINDOW, DEFAULT_CONSUMER_TIMEOUT};
pub use service::Service;
pub use warren_client::{
    Chain, ChainHandle, ChainResult, InvokeRetry, Parallel, ParallelReceipt, Retried,
};
pub use warren_core::schedule::{Missed, Schedule, ScheduleError};
pub use warren_core::{
    AmqpConfig, FanInOutcome, PartDecorator, QueueType, RetryOutcome, RetryPolicy, Target,
    TargetOutcome, Via,
};
