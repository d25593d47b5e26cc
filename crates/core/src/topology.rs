//! The names and arguments of everything warren declares on the broker.
//!
//! ```text
//! producer ──► warren.tasks (direct) ──[routing key = svc]──► warren.svc.<svc>  ──► workers
//!                                                              │ broker dead-letters
//! worker dead-letters (with reason headers) ─────────────────► warren.dead.<svc>
//! invoke replies ──► default exchange ──► warren.reply.<client id> (exclusive, per client)
//! delayed tasks ──► warren.delay.<k> … warren.delay.0 ──► warren.delay.deliver (headers)
//!                   ──► warren.delay.due ──[a worker's mover, by warren-dest]──► warren.svc.<svc>
//!                   (see crate::delay)
//! cancellations ──► warren.cancel (fanout) ──► warren.cancel.<worker id> (exclusive, per
//!                   worker; see crate::cancel)
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
/// The direct exchange topics are published to, routed by topic name.
pub const TOPIC_EXCHANGE: &str = "warren.topics";
/// How many recent messages per topic `warren peek` can show.
pub const RECENT_PER_TOPIC: i64 = 100;
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
/// Header a replayed message carries: how many times it was replayed (1 the first time).
pub const H_REPLAYED: &str = "x-warren-replayed";

pub(crate) fn service_queue_unchecked(svc: &str) -> String {
    format!("{PREFIX}svc.{svc}")
}

/// What every service queue's name starts with (then the service name).
pub const SERVICE_QUEUE_PREFIX: &str = "warren.svc.";

/// The durable queue of a service: `warren.svc.<svc>`.
pub fn service_queue(svc: &str) -> Result<String, NameError> {
    let q = service_queue_unchecked(svc);
    check_amqp_len("service queue", &q)?;
    Ok(q)
}

/// What every dead-letter queue's name starts with (then the service name).
pub const DEAD_QUEUE_PREFIX: &str = "warren.dead.";

/// The dead-letter queue of a service: `warren.dead.<svc>`.
pub fn dead_queue(svc: &str) -> Result<String, NameError> {
    let q = format!("{DEAD_QUEUE_PREFIX}{svc}");
    check_amqp_len("dead-letter queue", &q)?;
    Ok(q)
}

/// Checks that a name of `len` bytes fits in 255 without building it: `build` makes the
/// name only for the error. For the checks every message passes.
fn check_len_of(
    len: usize,
    build: impl FnOnce() -> Result<String, NameError>,
) -> Result<(), NameError> {
    if len <= crate::names::MAX_AMQP_NAME {
        return Ok(());
    }
    build().map(drop)
}

/// [`service_queue`]'s length check, without building the name.
pub fn check_service_queue(svc: &str) -> Result<(), NameError> {
    check_len_of(SERVICE_QUEUE_PREFIX.len() + svc.len(), || {
        service_queue(svc)
    })
}

/// [`dead_queue`]'s length check, without building the name.
pub fn check_dead_queue(svc: &str) -> Result<(), NameError> {
    check_len_of(DEAD_QUEUE_PREFIX.len() + svc.len(), || dead_queue(svc))
}

/// `true` when a `reply_to` names a queue a warren client created (or direct reply-to).
#[must_use]
pub fn is_reply_queue(name: &str) -> bool {
    (name.starts_with(REPLY_PREFIX) && name.len() > REPLY_PREFIX.len() && name.len() <= 255)
        || name.starts_with(DIRECT_REPLY_TO)
}

/// A queue to declare: name and arguments in warren's own terms.
#[derive(Debug, Clone, Default)]
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
    /// `x-max-length` with `x-overflow=reject-publish`: once the queue holds this many
    /// messages, further publishes are nacked (a broker-side "first one wins").
    pub max_length_reject: Option<u64>,
    /// `x-max-length` with the default overflow: the oldest messages are dropped.
    pub max_length: Option<i64>,
    /// `x-max-priority` (classic queues only; RabbitMQ 3.10 refuses it on quorum queues):
    /// messages are delivered highest `priority` property first, 0 to this value.
    pub max_priority: Option<u8>,
    /// Binding to an exchange with a routing key, declared with the queue.
    pub bind: Option<(String, String)>,
    /// Header arguments of that binding (for headers exchanges; `x-match=all` is added).
    pub bind_headers: Vec<(String, String)>,
    /// A topic exchange to declare (with its own binding) before the queue: how the delay
    /// levels are declared (see [`crate::delay`]).
    pub exchange: Option<ExchangeSpec>,
}

/// A durable topic exchange declared before a queue, optionally bound (exchange to
/// exchange) to another exchange with a routing pattern.
#[derive(Debug, Clone, Default)]
pub struct ExchangeSpec {
    /// The exchange name.
    pub name: String,
    /// `(destination exchange, pattern)`: messages matching the pattern go on to it.
    pub bind_to: Option<(String, String)>,
}

impl QueueSpec {
    /// The work queue of a service, bound to [`TASK_EXCHANGE`] by service name.
    pub fn service(svc: &str, queue_type: QueueType) -> Result<Self, NameError> {
        Ok(Self {
            name: service_queue(svc)?,
            durable: true,
            queue_type: Some(queue_type),
            dead_letter_exchange: Some(DEAD_EXCHANGE.to_owned()),
            delivery_limit: (queue_type == QueueType::Quorum).then_some(DELIVERY_LIMIT),
            bind: Some((TASK_EXCHANGE.to_owned(), svc.to_owned())),
            ..Self::default()
        })
    }

    /// [`QueueSpec::service`] with a priority range (`x-max-priority`, see docs/flow.md):
    /// [`crate::Error::PrioritiesNeedClassic`] on a quorum queue, which RabbitMQ 3.10
    /// refuses to give priorities.
    pub fn service_with_priorities(
        svc: &str,
        queue_type: QueueType,
        max_priority: Option<u8>,
    ) -> crate::Result<Self> {
        let mut spec = Self::service(svc, queue_type)?;
        if max_priority.is_some() && queue_type == QueueType::Quorum {
            return Err(crate::Error::PrioritiesNeedClassic {
                svc: svc.to_owned(),
            });
        }
        spec.max_priority = max_priority;
        Ok(spec)
    }

    /// The dead-letter queue of a service, bound to [`DEAD_EXCHANGE`] by service name.
    pub fn dead(svc: &str, queue_type: QueueType) -> Result<Self, NameError> {
        Ok(Self {
            name: dead_queue(svc)?,
            durable: true,
            queue_type: Some(queue_type),
            bind: Some((DEAD_EXCHANGE.to_owned(), svc.to_owned())),
            ..Self::default()
        })
    }

    /// The durable queue of one subscriber (`svc.method`) of `topic`:
    /// `warren.sub.<topic>:<svc>:<method>`, bound to [`TOPIC_EXCHANGE`] by topic name. Like a
    /// service queue, the broker dead-letters a message redelivered too often to
    /// `warren.dead.<svc>`.
    pub fn subscription(
        topic: &str,
        svc: &str,
        method: &str,
        queue_type: QueueType,
    ) -> Result<Self, NameError> {
        crate::names::validate_name("topic", topic)?;
        let name = subscription_queue(topic, svc, method);
        check_amqp_len("subscription queue", &name)?;
        Ok(Self {
            name,
            durable: true,
            queue_type: Some(queue_type),
            dead_letter_exchange: Some(DEAD_EXCHANGE.to_owned()),
            dead_letter_routing_key: Some(svc.to_owned()),
            delivery_limit: (queue_type == QueueType::Quorum).then_some(DELIVERY_LIMIT),
            bind: Some((TOPIC_EXCHANGE.to_owned(), topic.to_owned())),
            ..Self::default()
        })
    }

    /// The last [`RECENT_PER_TOPIC`] messages published to `topic`, for `warren peek`
    /// (`warren.topic.<topic>`: classic, oldest dropped first; nobody consumes it). Its
    /// existence also makes a topic routable before anyone subscribes. Not durable: it is
    /// only a window for operators, so it costs no disk writes, and a broker restart empties
    /// it (publishers and workers declare it again).
    pub fn recent(topic: &str) -> Result<Self, NameError> {
        crate::names::validate_name("topic", topic)?;
        let name = recent_queue(topic);
        check_amqp_len("topic queue", &name)?;
        Ok(Self {
            name,
            durable: false,
            queue_type: Some(QueueType::Classic),
            max_length: Some(RECENT_PER_TOPIC),
            bind: Some((TOPIC_EXCHANGE.to_owned(), topic.to_owned())),
            ..Self::default()
        })
    }

    /// A client's reply queue (always classic: quorum queues cannot be exclusive).
    pub fn reply(name: String) -> Result<Self, NameError> {
        check_amqp_len("reply queue", &name)?;
        Ok(Self {
            name,
            exclusive: true,
            ..Self::default()
        })
    }

    /// A split job's part queue: durable classic, deleted after `expires_ms` unused.
    pub fn part(name: &str, expires_ms: u64) -> Result<Self, NameError> {
        validate_part_queue(name)?;
        Ok(Self {
            name: name.to_owned(),
            durable: true,
            queue_type: Some(QueueType::Classic),
            expires_ms: Some(expires_ms),
            ..Self::default()
        })
    }

    /// A service's done-marker queue: `warren.done.<svc>.<window ms>`, durable classic,
    /// every message expiring `window_ms` after it was stored. Each hook or callback a join
    /// fires leaves its own message here (through the hook publish's `BCC` header), so a
    /// split task redelivered after its job joined finds that it did. One queue per service
    /// and completion window, bounded by the window, never per job.
    pub fn done_markers(svc: &str, window_ms: u64) -> Result<Self, NameError> {
        let name = format!("{PREFIX}done.{svc}.{window_ms}");
        check_amqp_len("done-marker queue", &name)?;
        Ok(Self {
            name,
            durable: true,
            queue_type: Some(QueueType::Classic),
            message_ttl_ms: Some(window_ms),
            ..Self::default()
        })
    }
}

/// Every per-job queue of the job whose part queue is `part_queue`: the part queue alone
/// (deleted when the job joins; an abandoned one expires).
#[must_use]
pub fn job_queues(part_queue: &str) -> Vec<String> {
    vec![part_queue.to_owned()]
}

/// Header on a message sent again after an attempt that the broker may have stored (a nack
/// or a lost confirm), value `true`: a consumer that sees it knows the message may be a
/// duplicate (warren shows it to handlers as `ctx.redelivered()`).
pub const H_RESENT: &str = "warren-resent";

/// Header: sender-selected distribution (RabbitMQ): the message is also routed to these
/// routing keys, and the header is removed before delivery. A join's hook names its done
/// marker queues here, so the hook and its markers are one publish.
pub const H_BCC: &str = "BCC";

/// The identity of a split job, derived from its part queue name (fixed length, so the
/// name derived from it always has the same length).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JobKey(pub uuid::Uuid);

impl JobKey {
    /// The key of the job whose part queue is `part_queue`.
    #[must_use]
    pub fn of(part_queue: &str) -> Self {
        Self(uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_URL,
            part_queue.as_bytes(),
        ))
    }
}

/// Prefix of part queues (fixed by the spec, outside the `warren.` namespace).
pub const PART_PREFIX: &str = "part.";

/// `warren.sub.<topic>:<svc>:<method>` (`:` cannot appear in names, so it parses back).
#[must_use]
pub fn subscription_queue(topic: &str, svc: &str, method: &str) -> String {
    format!("{PREFIX}sub.{topic}:{svc}:{method}")
}

/// Splits a subscription queue name into (topic, svc, method).
#[must_use]
pub fn parse_subscription_queue(queue: &str) -> Option<(&str, &str, &str)> {
    let rest = queue.strip_prefix(PREFIX)?.strip_prefix("sub.")?;
    let mut it = rest.splitn(3, ':');
    Some((it.next()?, it.next()?, it.next()?))
}

/// `warren.topic.<topic>`: the recent-messages queue of a topic.
#[must_use]
pub fn recent_queue(topic: &str) -> String {
    format!("{PREFIX}topic.{topic}")
}

/// `part.fanout-<job>`: the part queue of a fan-out/fan-in (or a background invoke/retry
/// with a callback), whose targets report to it like the parts of a split job.
#[must_use]
pub fn fanout_queue(job: &uuid::Uuid) -> String {
    format!("{PART_PREFIX}fanout-{job}")
}

/// `part.<svc>-<method>-<id>`, checked against the 255-byte limit.
pub fn part_queue(svc: &str, method: &str, id: &uuid::Uuid) -> Result<String, NameError> {
    let q = format!("{PART_PREFIX}{svc}-{method}-{id}");
    check_amqp_len("part queue", &q)?;
    Ok(q)
}

/// [`part_queue`]'s length check for any job id, without building the name.
pub fn check_part_queue(svc: &str, method: &str) -> Result<(), NameError> {
    let len = PART_PREFIX.len() + svc.len() + 1 + method.len() + 1 + uuid::fmt::Hyphenated::LENGTH;
    check_len_of(len, || part_queue(svc, method, &uuid::Uuid::nil()))
}

/// Checks a part queue name given by a caller: non-empty, at most 255 bytes, not reserved.
pub fn validate_part_queue(name: &str) -> Result<(), NameError> {
    crate::names::validate_queue_name(name)
}
