//! warren-client: everything a caller does — enqueue tasks, invoke services and await their
//! typed results.
//!
//! ```no_run
//! # async fn demo() -> Result<(), warren_client::Error> {
//! use warren_client::{Client, Task};
//! let client = Client::connect().await?; // WARREN_AMQP_URL or the local default
//! // Fire and forget: returns the task id and cid.
//! let receipt = client.enqueue(Task::new("images.resize", &serde_json::json!({"w": 64}))).await?;
//! println!("queued {} (cid {})", receipt.id, receipt.cid);
//! // Request/response with a typed result and a deadline.
//! let size: u64 = client
//!     .invoke(Task::new("images.size", &"cat.png").with_timeout(std::time::Duration::from_secs(5)))
//!     .await?;
//! # let _ = size; Ok(()) }
//! ```
//!
//! # Layout
//! - `client`: [`Client`] and [`ClientBuilder`]: connection, enqueue, invoke.
//! - `task`: [`Task`], a task to send (target, payload, cid, hooks, deadline), and
//!   [`Receipt`].
//! - `chain`: [`Chain`], services run in order over a shared bog; capped parallel runs.
//! - `chain_handle`: [`ChainHandle`] (awaitable), [`ChainResult`] and [`Extract`],
//!   [`as_completed`] (wait-any).
//! - `parallel`: [`Parallel`], parallel execution and fan-out/fan-in ([`Client::parallel`]).
//! - `invoke_retry`: [`InvokeRetry`], calls repeated on failure, blocking or in background.
//! - `publish`: [`Client::publish`], durable publish/subscribe.
//! - `reply`: the reply queue and the table of calls waiting for an answer.
//! - `cancel`: [`Client::cancel`], [`Client::cancel_cid`] and their [`CancelOutcome`].
//! - `unique`: [`Task::unique`] and [`UniqueError`].
//! - `error`: [`Error`].

mod args;
mod cancel;
mod chain;
mod chain_handle;
mod client;
mod error;
mod invoke_retry;
mod parallel;
mod publish;
mod reply;
mod task;
mod unique;

pub use cancel::{CancelOutcome, Found};
pub use chain::Chain;
pub use chain_handle::{as_completed, run_capped, ChainHandle, ChainResult, Extract};
pub use client::{Client, ClientBuilder};
pub use error::Error;
pub use invoke_retry::{InvokeRetry, Retried};
pub use parallel::{Parallel, ParallelReceipt};
pub use publish::Message;
pub use task::{Receipt, Task};
pub use unique::UniqueError;
pub use warren_core::cancel::{CancelScope, UniqueKeyError};
pub use warren_core::{
    AmqpConfig, Failure, FailureKind, FanInOutcome, IntoTarget, QueueType, RetryOutcome,
    RetryPolicy, SplitStarted, Target, TargetOutcome,
};
