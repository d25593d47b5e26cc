//! warren's operator views: what `warren queues|topics|dead` print and what `warren web`
//! serves.
//!
//! - [`mgmt`]: a client for RabbitMQ's management HTTP API (counts, rates, consumers,
//!   connections), with credentials kept out of every message.
//! - [`queues`]: warren's queues by name and kind, from the management API, or from
//!   `rabbitmqctl` on the broker's machine as a fallback.
//! - [`topics`]: topics, subscriptions and the last messages of a topic.
//! - [`views`]: the [`Admin`] handle and the views built on all of it (overview, a service
//!   with its dead letters, jobs in flight, task lookup), each a serde type: the web pages
//!   and their JSON twins show the same value.
//! - [`web`]: the web admin (axum), `warren web --listen ADDR`.

pub mod mgmt;
pub mod queues;
pub mod topics;
pub mod views;
pub mod web;

pub use mgmt::{ManagementClient, MgmtError};
pub use views::Admin;

/// Why an operator view could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The management API failed.
    #[error(transparent)]
    Management(#[from] MgmtError),
    /// The broker (AMQP) failed.
    #[error(transparent)]
    Broker(#[from] warren_core::Error),
    /// The status store failed.
    #[error(transparent)]
    Store(#[from] warren_core::status::StoreError),
    /// `rabbitmqctl` could not be used.
    #[error("rabbitmqctl: {0}")]
    Rabbitmqctl(String),
    /// No way to list queues (no management API, no rabbitmqctl).
    #[error("cannot list queues: {0}")]
    NoSource(String),
    /// A name is not valid.
    #[error(transparent)]
    Name(#[from] warren_core::names::NameError),
    /// What was asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is not valid.
    #[error("{0}")]
    Invalid(String),
}

impl AdminError {
    /// `true` when the same call may succeed later (a broker, API or store that did not
    /// answer).
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Management(e) => e.is_transient(),
            Self::Broker(e) => e.is_transient(),
            Self::Store(_) => true,
            Self::Rabbitmqctl(_)
            | Self::NoSource(_)
            | Self::Name(_)
            | Self::NotFound(_)
            | Self::Invalid(_) => false,
        }
    }
}
