//! [`TaskSender`]: how an [`Envelope`] reaches its service queue, now or after a delay.
//!
//! The client (enqueue, invoke, patterns) and the worker (hooks, retries, parts, callbacks,
//! chain steps) both send tasks through it, and it sends through the one [`Publisher`]:
//! confirmed, mandatory, retried within a deadline, declaring the service's queues on first
//! use and again when a publish comes back unroutable.

use std::time::Duration;

use tokio::time::Instant;

use super::broker::Broker;
use super::message::{HeaderValue, Outgoing};
use super::publisher::Publisher;
use crate::config::QueueType;
use crate::delay::{DelayLevels, H_DEST, H_DUE};
use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::topology::{service_queue, QueueSpec, TASK_EXCHANGE};

/// Sends envelopes to their service queues; cheap to clone (clones share the publisher).
///
/// ```no_run
/// # async fn demo(broker: warren_core::Broker) -> warren_core::Result<()> {
/// use warren_core::{Envelope, Publisher, Target, TaskSender};
/// let sender = TaskSender::new(&broker, Publisher::new(broker.clone(), 2));
/// let env = Envelope::new(&"images.resize".parse::<Target>()?, serde_json::json!(64), None);
/// sender.send(&env, None, sender.deadline()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct TaskSender {
    publisher: Publisher,
    queue_type: QueueType,
    levels: DelayLevels,
    levels_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
    publish_timeout: Duration,
    priorities: std::sync::Arc<std::collections::BTreeMap<String, u8>>,
}

/// A service's dead-letter queue and its queue (with its priority range, if any), in the
/// order they must be declared. [`Error::PrioritiesNeedClassic`] for a priority range on
/// quorum queues.
pub fn service_specs(svc: &str, qt: QueueType, max_priority: Option<u8>) -> Result<Vec<QueueSpec>> {
    Ok(vec![
        QueueSpec::dead(svc, qt)?,
        QueueSpec::service_with_priorities(svc, qt, max_priority)?,
    ])
}

/// A task's priority is above its service's range ([`TaskSender::check_priority`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("priority {priority} is outside the range of service {svc:?} (0 to {max}{})",
    if *max == 0 { "; it has no priority range: see AmqpConfig::with_priorities" } else { "" })]
pub struct PriorityOutOfRange {
    /// The service.
    pub svc: String,
    /// The priority asked for.
    pub priority: u8,
    /// The highest priority of the service's queue (0 when it has no range).
    pub max: u8,
}

impl TaskSender {
    /// A sender publishing through `publisher`, with `broker`'s queue types and publish
    /// timeout.
    #[must_use]
    pub fn new(broker: &Broker, publisher: Publisher) -> Self {
        let config = broker.config();
        Self {
            publisher,
            queue_type: config.queue_type,
            levels: config.delay_levels(),
            levels_lock: std::sync::Arc::default(),
            publish_timeout: config.publish_timeout,
            priorities: std::sync::Arc::new(config.priorities().clone()),
        }
    }

    /// The highest priority of service `svc`'s queue, when its configuration gives it a
    /// range (`AmqpConfig::with_priorities`).
    #[must_use]
    pub fn max_priority(&self, svc: &str) -> Option<u8> {
        self.priorities.get(svc).copied()
    }

    /// Checks a task's priority against its service's range: a task without a priority,
    /// or with priority 0, always fits.
    pub fn check_priority(&self, env: &Envelope) -> std::result::Result<(), PriorityOutOfRange> {
        let max = self.max_priority(&env.svc).unwrap_or(0);
        match env.priority {
            Some(p) if p > max => Err(PriorityOutOfRange {
                svc: env.svc.clone(),
                priority: p,
                max,
            }),
            _ => Ok(()),
        }
    }

    /// The publisher it sends through (for messages that are not tasks: replies, results,
    /// dead letters, topic messages).
    #[must_use]
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// When a publish started now gives up: now + the publish timeout.
    #[must_use]
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.publish_timeout
    }

    /// The publish timeout.
    #[must_use]
    pub fn publish_timeout(&self) -> Duration {
        self.publish_timeout
    }

    /// Publishes `env` to its service's queue (declared on first use), with an optional
    /// reply queue, confirmed by `deadline`.
    pub async fn send(
        &self,
        env: &Envelope,
        reply_to: Option<&str>,
        deadline: Instant,
    ) -> Result<()> {
        self.send_with(env, reply_to, &[], deadline).await
    }

    /// [`TaskSender::send`] with extra headers.
    async fn send_with(
        &self,
        env: &Envelope,
        reply_to: Option<&str>,
        headers: &[(String, HeaderValue)],
        deadline: Instant,
    ) -> Result<()> {
        let mut msg = Outgoing::new(TASK_EXCHANGE, env.svc.clone(), env.to_bytes()?);
        msg.message_id = Some(crate::envelope::id_string(&env.id));
        msg.correlation_id = Some(env.cid.clone());
        msg.reply_to = reply_to.map(str::to_owned);
        msg.priority = env.priority;
        msg.headers.extend_from_slice(headers);
        let (qt, svc) = (self.queue_type, env.svc.as_str());
        let prio = self.max_priority(svc);
        self.publisher
            .publish_routed(&msg, svc, &|| service_specs(svc, qt, prio), deadline)
            .await?;
        crate::metrics::task_sent(env);
        tracing::debug!(id = %env.id, cid = %env.cid, svc = %env.svc, method = %env.method, "task sent");
        Ok(())
    }

    /// Sends `env` to its service queue after `delay` (rounded up to 100 ms),
    /// through the delay levels ([`crate::delay`]); at once when it is zero.
    /// The wait is on the broker and survives worker and broker restarts.
    ///
    /// The service queue is declared (and bound to the delivery exchange) first, so the
    /// task finds it when it is due. Errors: [`Error::DelayTooLong`] over
    /// [`crate::delay::MAX_DELAY`], before anything is published; else as
    /// [`TaskSender::send`].
    pub async fn send_later(
        &self,
        env: &Envelope,
        delay: Duration,
        reply_to: Option<&str>,
        deadline: Instant,
    ) -> Result<()> {
        self.send_later_with(env, delay, reply_to, &[], deadline)
            .await
    }

    /// [`TaskSender::send_later`] with extra headers on the message (a worker's flow
    /// control marks the tasks it defers so: docs/flow.md).
    pub async fn send_later_with(
        &self,
        env: &Envelope,
        delay: Duration,
        reply_to: Option<&str>,
        headers: &[(String, HeaderValue)],
        deadline: Instant,
    ) -> Result<()> {
        // The delay counts from this call: the time the declarations below take is taken
        // off it, so a task is not late by a first send's declarations.
        let due_at = Instant::now() + delay;
        if self.levels.route(delay)?.is_none() {
            return self.send_with(env, reply_to, headers, deadline).await;
        }
        let dest = service_queue(&env.svc)?;
        let timed_out = |what: String| Error::Timeout {
            what,
            after: self.publish_timeout,
        };
        tokio::time::timeout_at(deadline, self.ensure_service(&env.svc))
            .await
            .map_err(|_| timed_out(format!("declaring {dest} before a delayed publish")))??;
        let key = self.levels.cache_key();
        tokio::time::timeout_at(deadline, self.ensure_delay_levels())
            .await
            .map_err(|_| timed_out(String::from("declaring the delay levels")))??;
        let Some(route) = self
            .levels
            .route(due_at.saturating_duration_since(Instant::now()))?
        else {
            return self.send_with(env, reply_to, headers, deadline).await;
        };
        let wait_ms: u64 = (0..crate::delay::LEVELS)
            .filter(|k| route.units >> k & 1 == 1)
            .map(|k| self.levels.ttl_ms(k))
            .sum();
        let due = crate::envelope::now_ms().saturating_add(wait_ms);
        let mut msg = Outgoing::new(route.exchange, route.routing_key, env.to_bytes()?);
        msg.message_id = Some(crate::envelope::id_string(&env.id));
        msg.correlation_id = Some(env.cid.clone());
        msg.reply_to = reply_to.map(str::to_owned);
        msg.priority = env.priority;
        msg.headers.extend_from_slice(headers);
        msg.headers
            .push((H_DEST.to_owned(), HeaderValue::Str(dest)));
        msg.headers.push((
            H_DUE.to_owned(),
            HeaderValue::Int(i64::try_from(due).unwrap_or(i64::MAX)),
        ));
        // The levels are declared once per publisher, and again when a publish comes back
        // unroutable (a level queue deleted since).
        let levels = &self.levels;
        let declare = move || Ok(levels.specs());
        match self
            .publisher
            .publish_routed(&msg, &key, &declare, deadline)
            .await
        {
            // A level exchange deleted since it was declared: declare the levels again.
            Err(e) if is_missing_exchange(&e) => {
                self.publisher.forget_declared(&key);
                self.publisher
                    .publish_routed(&msg, &key, &declare, deadline)
                    .await?;
            }
            other => other?,
        }
        crate::metrics::task_sent(env);
        tracing::debug!(id = %env.id, svc = %env.svc, method = %env.method, units = route.units, "delayed task sent");
        Ok(())
    }

    /// Publishes a due message from [`crate::delay::DUE_QUEUE`] to the service queue its
    /// `warren-dest` header names (declaring it when it is missing), with its body,
    /// properties and headers (the broker's `x-death` records left out), confirmed by `deadline`.
    /// A message without a valid `warren-dest`, or whose queue the broker refuses, goes to
    /// [`crate::delay::UNROUTED_QUEUE`] instead. The caller acks the delivery only on `Ok`.
    pub async fn deliver_due(&self, due: &super::Incoming, deadline: Instant) -> Result<()> {
        let dest = due
            .header(H_DEST)
            .and_then(|v| v.as_str().map(str::to_owned));
        let svc = dest
            .as_deref()
            .and_then(|q| q.strip_prefix(crate::topology::SERVICE_QUEUE_PREFIX))
            .filter(|svc| crate::names::validate_name("service", svc).is_ok())
            .map(str::to_owned);
        let mut msg = Outgoing::new("", dest.clone().unwrap_or_default(), due.body.clone());
        msg.message_id = due.message_id().map(str::to_owned);
        msg.correlation_id = due.correlation_id().map(str::to_owned);
        msg.reply_to = due.reply_to().map(str::to_owned);
        msg.headers = due
            .headers()
            .into_iter()
            .filter(|(k, _)| {
                k != "x-death"
                    && !k.starts_with("x-first-death-")
                    && !k.starts_with("x-last-death-")
            })
            .collect();
        if due.redelivered {
            // A mover may have moved this message before (it stopped or crashed between its
            // publish and its ack): the service queue may hold an earlier copy, so this one
            // is marked as a possible re-run.
            msg.mark_resent();
        }
        if let Some(svc) = svc {
            // The queue usually exists, declared by its own workers or senders, perhaps as
            // another queue type than this worker's: publish without declaring, and declare
            // it (as this worker's type) only when it is missing.
            let sent = match self.publisher.publish_by(&msg, deadline).await {
                Err(Error::Unroutable { .. }) => {
                    let qt = self.queue_type;
                    let key = svc.clone();
                    let prio = self.max_priority(&svc);
                    let declare = move || service_specs(&svc, qt, prio);
                    self.publisher
                        .publish_routed(&msg, &key, &declare, deadline)
                        .await
                }
                other => other,
            };
            match sent {
                Ok(()) => return Ok(()),
                Err(e @ (Error::Refused { .. } | Error::Name(_))) if !e.is_node_down() => {
                    tracing::warn!(dest = ?dest, error = %e, "a due message's queue was refused; keeping it in the unrouted queue");
                }
                Err(e) => return Err(e),
            }
        } else {
            tracing::warn!(dest = ?dest, id = ?due.message_id(), "a due message without a valid warren-dest; keeping it in the unrouted queue");
        }
        msg.exchange = crate::delay::UNROUTED_EXCHANGE.to_owned();
        msg.routing_key = String::new();
        let levels = &self.levels;
        let declare = move || Ok(levels.specs());
        self.publisher
            .publish_routed(&msg, &self.levels.cache_key(), &declare, deadline)
            .await
    }

    /// Declares the delay levels (once per sender; [`TaskSender::send_later`] does it before
    /// its first delayed publish). A worker whose methods have flow limits declares them at
    /// start, so its first deferral is not held up by 25 declarations.
    pub async fn ensure_delay_levels(&self) -> Result<()> {
        let key = self.levels.cache_key();
        if self.publisher.is_declared(&key) {
            return Ok(());
        }
        // One declaration of the 25 levels at a time (the others then find them cached).
        let _one = self.levels_lock.lock().await;
        self.publisher
            .declare_cached(&key, &self.levels.specs())
            .await
    }

    /// Declares a service's queue and dead-letter queue (once per sender), so tasks can wait
    /// before any worker exists.
    pub async fn ensure_service(&self, svc: &str) -> Result<()> {
        if self.publisher.is_declared(svc) {
            return Ok(());
        }
        self.publisher
            .declare_cached(
                svc,
                &service_specs(svc, self.queue_type, self.max_priority(svc))?,
            )
            .await
    }
}

/// `true` for a publish refused because its exchange does not exist (`NOT_FOUND`).
fn is_missing_exchange(e: &Error) -> bool {
    let refused = |e: &Error| {
        matches!(e, Error::Refused { source, .. } if source.reply_code() == Some(404))
            && !e.is_node_down()
    };
    match e {
        Error::Unconfirmed {
            last: Some(last), ..
        } => refused(last),
        other => refused(other),
    }
}
