//! The names and arguments of everything warren declares on the broker.
//!
//! ```text
//! producer ──► warren.tasks (direct) ──[routing key = svc]──► warren.svc.<svc>  ──► workers
//!                                                              │ broker dead-letters
//! worker dead-letters (with reason headers) ─────────────────► warren.dead.<svc>
//! invoke replies ──► default exchange ──► warren.reply.<client id> (exclusive, per client)
//! ```
//! Service queues are durable, of the configured [`QueueType`]; on quorum queues
//! `x-delivery-limit` stops a message that crashes its worker again and again (it is
//! dead-lettered by the broker to `warren.dead`, routed by the same service key).

use crate::config::QueueType;
use crate::names::{check_amqp_len, NameError};

/// The direct exchange every task is published to, routed by service name.
pub const TASK_EXCHANGE: &str = "warren.tasks";
/// The direct exchange dead letters go through, routed by service name.
pub const DEAD_EXCHANGE: &str = "warren.dead";
/// Prefix of every name warren creates (part queues aside).
pub const PREFIX: &str = "warren.";
/// Prefix of per-client reply queues; a worker answers only to these (or direct reply-to).
pub const REPLY_PREFIX: &str = "warren.reply.";
/// RabbitMQ's direct reply-to pseudo queue, which a worker also answers to.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// How many deliveries of one message a quorum queue allows before dead-lettering it
/// (a message that kills its worker every time must not loop forever).
pub const DELIVERY_LIMIT: i64 = 20;

/// Header: why a message was dead-lettered (a [`crate::FailureKind`] name).
pub const H_REASON: &str = "x-warren-reason";
/// Header: the detailed error text of a dead letter.
pub const H_ERROR: &str = "x-warren-error";
/// Header: the queue a dead letter came from.
pub const H_SOURCE_QUEUE: &str = "x-warren-source-queue";
/// Header: when it was dead-lettered, ms since the epoch.
pub const H_DEAD_AT: &str = "x-warren-dead-at-ms";

pub(crate) fn service_queue_unchecked(svc: &str) -> String {
    format!("{PREFIX}svc.{svc}")
}

/// The durable queue of a service: `warren.svc.<svc>`.
pub fn service_queue(svc: &str) -> Result<String, NameError> {
    let q = service_queue_unchecked(svc);
    check_amqp_len("service queue", &q)?;
    Ok(q)
}

/// The dead-letter queue of a service: `warren.dead.<svc>`.
pub fn dead_queue(svc: &str) -> Result<String, NameError> {
    let q = format!("{PREFIX}dead.{svc}");
    check_amqp_len("dead-letter queue", &q)?;
    Ok(q)
}

/// `true` when a `reply_to` names a queue a warren client created (or direct reply-to).
#[must_use]
pub fn is_reply_queue(name: &str) -> bool {
    (name.starts_with(REPLY_PREFIX) && name.len() > REPLY_PREFIX.len() && name.len() <= 255)
        || name.starts_with(DIRECT_REPLY_TO)
}

/// A queue to declare: name and arguments in warren's own terms.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    /// The queue name.
    pub name: String,
    /// Durable queue (survives a broker restart).
    pub durable: bool,
    /// Exclusive to the declaring connection (deleted with it).
    pub exclusive: bool,
    /// `x-queue-type`, if any.
    pub queue_type: Option<QueueType>,
    /// `x-dead-letter-exchange`. On quorum queues warren also sets
    /// `x-dead-letter-strategy=at-least-once` and `x-overflow=reject-publish`, without which
    /// quorum dead-lettering silently falls back to at-most-once.
    pub dead_letter_exchange: Option<String>,
    /// `x-dead-letter-routing-key` (default: the message's own routing key).
    pub dead_letter_routing_key: Option<String>,
    /// `x-message-ttl` in ms.
    pub message_ttl_ms: Option<u64>,
    /// `x-delivery-limit` (quorum only).
    pub delivery_limit: Option<i64>,
    /// `x-expires` in ms: delete when unused this long.
    pub expires_ms: Option<u64>,
    /// Binding to an exchange with a routing key, declared with the queue.
    pub bind: Option<(String, String)>,
}

impl QueueSpec {
    /// The work queue of a service, bound to [`TASK_EXCHANGE`] by service name.
    pub fn service(svc: &str, queue_type: QueueType) -> Result<Self, NameError> {
        Ok(Self {
            name: service_queue(svc)?,
            durable: true,
            exclusive: false,
            queue_type: Some(queue_type),
            dead_letter_exchange: Some(DEAD_EXCHANGE.to_owned()),
            dead_letter_routing_key: None,
            message_ttl_ms: None,
            delivery_limit: (queue_type == QueueType::Quorum).then_some(DELIVERY_LIMIT),
            expires_ms: None,
            bind: Some((TASK_EXCHANGE.to_owned(), svc.to_owned())),
        })
    }

    /// The dead-letter queue of a service, bound to [`DEAD_EXCHANGE`] by service name.
    pub fn dead(svc: &str, queue_type: QueueType) -> Result<Self, NameError> {
        Ok(Self {
            name: dead_queue(svc)?,
            durable: true,
            exclusive: false,
            queue_type: Some(queue_type),
            dead_letter_exchange: None,
            dead_letter_routing_key: None,
            message_ttl_ms: None,
            delivery_limit: None,
            expires_ms: None,
            bind: Some((DEAD_EXCHANGE.to_owned(), svc.to_owned())),
        })
    }

    /// A client's exclusive reply queue (always classic: quorum queues cannot be exclusive).
    pub fn reply(name: String) -> Result<Self, NameError> {
        check_amqp_len("reply queue", &name)?;
        Ok(Self {
            name,
            durable: false,
            exclusive: true,
            queue_type: None,
            dead_letter_exchange: None,
            dead_letter_routing_key: None,
            message_ttl_ms: None,
            delivery_limit: None,
            expires_ms: None,
            bind: None,
        })
    }
}
