//! warren-core: the pieces every warren process shares.
//!
//! Most users depend on the `warren` facade crate, or on `warren-client` and `warren-worker`;
//! this crate is what those two stand on.
//!
//! # Layout
//! - [`names`]: service, method and AMQP name validation ([`Target`], [`NameError`]).
//! - [`envelope`]: the versioned JSON task envelope and reply ([`Envelope`], [`Reply`]).
//! - [`retry`]: [`RetryPolicy`]: how failing tasks are retried.
//! - [`delay`]: delayed delivery through a fixed cascade of TTL levels on the broker.
//! - [`status`]: task statuses and results in a store that outlives processes
//!   ([`status::StatusStore`], [`status::RedisStore`]).
//! - [`cancel`]: cancellation broadcasts and unique-task keys (docs/cancellation.md).
//! - [`chain`]: the state a chain carries from step to step (its bog).
//! - [`patterns`]: the wire types of parallel execution, fan-in and invoke/retry callbacks.
//! - [`schedule`]: schedule specs (cron with seconds and time zones, intervals), their
//!   ticks, and the queues that hold a schedule's lease and last tick.
//! - [`topology`]: the exchanges and queues warren declares, and their names.
//! - [`config`]: broker URLs, heartbeats, reconnect and queue-type settings ([`AmqpConfig`]).
//! - [`amqp`]: the connection layer over lapin: reconnecting connections, confirmed
//!   mandatory publishes ([`Publisher`]) and consumers that survive reconnects
//!   ([`Subscription`]). lapin's own types never appear in this crate's public API, so a lapin
//!   upgrade is not a breaking change for users.
//! - [`error`]: the typed [`Error`] every fallible call returns.
//! - [`metrics`]: the names and labels of every metric warren records.
//! - [`trace`]: W3C trace context in AMQP headers ([`trace::TraceContext`]).

pub mod amqp;
pub mod cancel;
pub mod chain;
pub mod config;
pub mod delay;
pub mod envelope;
pub mod error;
pub mod flow;
pub mod metrics;
pub mod names;
pub mod patterns;
pub mod retry;
pub mod schedule;
pub mod status;
pub mod topology;
pub mod trace;
pub mod validate;

pub use amqp::PriorityOutOfRange;
pub use amqp::{
    Broker, ConsumerEvent, HeaderValue, Incoming, Outgoing, Publisher, QueueStats, Subscription,
    SubscriptionSpec, Take, TaskSender,
};
pub use config::{AmqpConfig, AmqpUrl, QueueType, ReconnectPolicy};
pub use envelope::{
    DecodeError, Envelope, Failure, FailureKind, HookTarget, Hooks, PartDecorator, Reply,
    SplitStarted, Via, ENVELOPE_VERSION,
};
pub use error::{Error, Result};
pub use names::{IntoTarget, NameError, Target};
pub use patterns::{FanInOutcome, FanOut, RetryCall, RetryOutcome, TargetOutcome};
pub use retry::RetryPolicy;
