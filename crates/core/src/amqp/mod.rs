//! The AMQP layer: the only place warren talks to lapin.
//!
//! - [`Broker`] owns one connection and replaces it when it dies (backoff, URL failover).
//!   warren runs its own reconnect loop instead of lapin's auto-recovery: after a reconnect
//!   every channel, consumer and declaration is rebuilt by the code that owns it, so nothing
//!   depends on lapin replaying state, and a delivery from a dead connection is recognisable
//!   ([`Incoming::is_live`]).
//! - [`Publisher`] publishes with the mandatory flag on confirm-mode channels; a publish is
//!   done only when the broker confirmed it and did not return it, and a publish lost to a
//!   reconnect is sent again until its deadline.
//! - [`Subscription`] consumes a queue and re-subscribes by itself after a reconnect.

mod acks;
mod batch;
mod broker;
mod consumer;
mod hold;
mod lease;
mod message;
mod mover;
mod publisher;
mod sender;

pub use batch::{Batch, Take};
pub use broker::{Broker, QueueStats};
pub use consumer::{ConsumerEvent, Incoming, Subscription, SubscriptionSpec};
pub use hold::{BrokerDeath, Held, HeldMessage};
pub use lease::Lease;
pub use message::{HeaderValue, Outgoing};
pub use mover::{DelayMover, MOVER_PREFETCH};
pub use publisher::{backoff, Publisher};
pub use sender::{service_specs, PriorityOutOfRange, TaskSender};
