//! [`TaskSender`]: how an [`Envelope`] reaches its service queue, now or after a delay.
//!
//! The client (enqueue, invoke, patterns) and the worker (hooks, retries, parts, callbacks,
//! chain steps) both send tasks through it, and it sends through the one [`Publisher`]:
//! confirmed, mandatory, retried within a deadline, declaring the service's queues on first
//! use and again when a publish comes back unroutable.

use std::time::Duration;

use tokio::time::Instant;

use super::broker::Broker;
use super::message::Outgoing;
use super::publisher::Publisher;
use crate::config::QueueType;
use crate::envelope::Envelope;
use crate::error::Result;
use crate::retry::{delay_queue, delay_step_ms};
use crate::topology::{QueueSpec, TASK_EXCHANGE};

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
    delay_queue_type: QueueType,
    publish_timeout: Duration,
}

/// A service's dead-letter queue and its queue, in the order they must be declared.
pub fn service_specs(svc: &str, qt: QueueType) -> Result<Vec<QueueSpec>> {
    Ok(vec![
        QueueSpec::dead(svc, qt)?,
        QueueSpec::service(svc, qt)?,
    ])
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
            delay_queue_type: config.delay_queue_type(),
            publish_timeout: config.publish_timeout,
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
        let mut msg = Outgoing::new(TASK_EXCHANGE, env.svc.clone(), env.to_bytes()?);
        msg.message_id = Some(env.id.to_string());
        msg.correlation_id = Some(env.cid.clone());
        msg.reply_to = reply_to.map(str::to_owned);
        let (qt, svc) = (self.queue_type, env.svc.as_str());
        self.publisher
            .publish_routed(&msg, svc, &|| service_specs(svc, qt), deadline)
            .await?;
        crate::metrics::task_sent(env);
        tracing::debug!(id = %env.id, cid = %env.cid, svc = %env.svc, method = %env.method, "task sent");
        Ok(())
    }

    /// Sends `env` to its service queue after `delay`, through the durable wait queue of
    /// that delay step (`warren.delay.<svc>.<ms>`, see [`crate::retry`]); at once when
    /// `delay` is zero. The wait survives worker and broker restarts.
    pub async fn send_later(
        &self,
        env: &Envelope,
        delay: Duration,
        reply_to: Option<&str>,
        deadline: Instant,
    ) -> Result<()> {
        if delay.is_zero() {
            return self.send(env, reply_to, deadline).await;
        }
        let spec = delay_queue(&env.svc, delay_step_ms(delay), self.delay_queue_type)?;
        let mut msg = Outgoing::new("", spec.name.clone(), env.to_bytes()?);
        msg.message_id = Some(env.id.to_string());
        msg.correlation_id = Some(env.cid.clone());
        msg.reply_to = reply_to.map(str::to_owned);
        // The wait queue expires when unused: a publish that comes back unroutable declares
        // it (and the service queue it dead-letters into) again.
        let (qt, svc) = (self.queue_type, env.svc.as_str());
        let declare = || {
            let mut specs = service_specs(svc, qt)?;
            specs.push(spec.clone());
            Ok(specs)
        };
        self.publisher
            .publish_routed(&msg, &spec.name, &declare, deadline)
            .await?;
        crate::metrics::task_sent(env);
        Ok(())
    }

    /// Declares a service's queue and dead-letter queue (once per sender), so tasks can wait
    /// before any worker exists.
    pub async fn ensure_service(&self, svc: &str) -> Result<()> {
        if self.publisher.is_declared(svc) {
            return Ok(());
        }
        self.publisher
            .declare_cached(svc, &service_specs(svc, self.queue_type)?)
            .await
    }
}
