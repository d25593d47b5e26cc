//! [`Task`]: one task to enqueue or invoke.

use std::time::{Duration, SystemTime};

use serde::Serialize;
use uuid::Uuid;
use warren_core::topology::{check_part_queue, validate_part_queue};
use warren_core::{Envelope, Hooks, IntoTarget, PartDecorator, RetryPolicy, Target};

use crate::args::Invalid;
use crate::Error;

/// A task to send: target, payload and options. Build with [`Task::new`] and the `with_*`
/// methods, then pass to [`crate::Client::enqueue`] (fire and forget) or
/// [`crate::Client::invoke`] (wait for the result).
///
/// Building never fails: an invalid target name or a payload that does not serialize is
/// kept and returned by the call that sends the task, before anything is published.
///
/// ```
/// use std::time::Duration;
/// use warren_client::Task;
/// let task = Task::new("billing.charge", &serde_json::json!({"cents": 1200}))
///     .with_cid("order-42")
///     .with_timeout(Duration::from_secs(3))
///     .on_error("billing.alert");
/// assert_eq!(task.target().map(|t| t.to_string()).as_deref(), Some("billing.charge"));
/// assert!(task.check().is_ok());
/// // Names are [a-z0-9_.-]: refused when sent (or by `check`).
/// assert!(Task::new("Billing.charge", &()).check().is_err());
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct Task {
    pub(crate) invalid: Invalid,
    pub(crate) target: Option<Target>,
    pub(crate) payload: serde_json::Value,
    pub(crate) cid: Option<String>,
    pub(crate) hooks: Hooks,
    pub(crate) timeout: Option<Duration>,
    pub(crate) parent: Option<Uuid>,
    pub(crate) part: Option<PartDecorator>,
    pub(crate) retry: Option<RetryPolicy>,
    pub(crate) attempt: u32,
    pub(crate) caller_retries: bool,
    pub(crate) notify: Option<String>,
    pub(crate) when: Option<When>,
    pub(crate) time_limit: Option<Duration>,
    pub(crate) key: Option<String>,
    pub(crate) priority: Option<u8>,
    pub(crate) unique: Option<crate::unique::Unique>,
}

/// When a delayed task is due.
#[derive(Debug, Clone, Copy)]
pub(crate) enum When {
    /// This long after it is sent.
    After(Duration),
    /// At this wall-clock time.
    At(SystemTime),
}

impl Task {
    /// A task for `target` (`"svc.method"`, split at the last dot, or a [`Target`]) with a
    /// JSON payload.
    pub fn new(target: impl IntoTarget, payload: &impl Serialize) -> Self {
        let mut invalid = Invalid::default();
        let target = invalid.target(target);
        let payload = invalid.json(payload);
        Self {
            invalid,
            target,
            payload,
            cid: None,
            hooks: Hooks::default(),
            timeout: None,
            parent: None,
            part: None,
            retry: None,
            attempt: 1,
            caller_retries: false,
            notify: None,
            when: None,
            time_limit: None,
            key: None,
            priority: None,
            unique: None,
        }
    }

    /// Runs the task `delay` after it is sent (rounded up to 100 ms), not before.
    /// The task waits on the broker, in a fixed set of delay queues (docs/time.md), not in a
    /// worker: it survives worker and broker restarts and costs no prefetch. A zero delay
    /// sends it at once. A delay over [`warren_core::delay::MAX_DELAY`] (about 38.8 days) is
    /// returned as [`Error::DelayTooLong`] by the call that sends it, and nothing is sent.
    ///
    /// ```
    /// use std::time::Duration;
    /// use warren_client::Task;
    /// let t = Task::new("mail.remind", &"ada").delay(Duration::from_secs(90));
    /// assert!(t.check().is_ok());
    /// assert!(Task::new("mail.remind", &()).delay(Duration::from_secs(90 * 86_400)).check().is_err());
    /// ```
    pub fn delay(mut self, delay: Duration) -> Self {
        if let Some(d) = self.invalid.delay(delay) {
            self.when = Some(When::After(d));
        }
        self
    }

    /// Runs the task at `when` (this machine's clock; rounded up to 100 ms), not
    /// before: [`Task::delay`] with the time left when it is sent. A time in the past sends
    /// it at once; one further than [`warren_core::delay::MAX_DELAY`] is refused like an
    /// over-long delay.
    pub fn at(mut self, when: SystemTime) -> Self {
        let left = when
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        if self.invalid.delay(left).is_some() {
            self.when = Some(When::At(when));
        }
        self
    }

    /// The delay to send with, computed now (`None`: send at once).
    pub(crate) fn send_delay(&self) -> Result<Option<Duration>, Error> {
        let delay = match self.when {
            None => return Ok(None),
            Some(When::After(d)) => d,
            Some(When::At(t)) => t
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
        };
        warren_core::delay::check(delay)?;
        Ok((!delay.is_zero()).then_some(delay))
    }

    /// Uses the caller's correlation id (the caller then owns its uniqueness); by default
    /// a fresh one is generated.
    pub fn with_cid(mut self, cid: impl Into<String>) -> Self {
        self.cid = Some(cid.into());
        self
    }

    /// How long [`crate::Client::invoke`] waits for the reply (default: the client's).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Invokes `target` with the result when the task succeeds.
    pub fn on_complete(mut self, target: impl IntoTarget) -> Self {
        self.hooks.oncomplete = self.invalid.hook(target);
        self
    }

    /// Invokes `target` with the failure when the task fails for good.
    pub fn on_error(mut self, target: impl IntoTarget) -> Self {
        self.hooks.onerror = self.invalid.hook(target);
        self
    }

    /// This task's hard time limit per attempt: the worker stops the handler at this
    /// deadline (its future is dropped) and the attempt fails with kind `timeout`, retried
    /// per the retry policy. When the method has a limit too
    /// (`Service::time_limit`), the smaller one applies; the handler sees its deadline as
    /// `ctx.deadline()`. Travels in the envelope (`time_limit_ms`, whole milliseconds,
    /// rounded up). Zero is returned as [`Error::ZeroTimeLimit`] by the call that sends the
    /// task, and nothing is sent.
    ///
    /// ```
    /// use std::time::Duration;
    /// use warren_client::Task;
    /// let t = Task::new("video.encode", &"clip.mp4").time_limit(Duration::from_secs(600));
    /// assert!(t.check().is_ok());
    /// assert!(Task::new("video.encode", &()).time_limit(Duration::ZERO).check().is_err());
    /// ```
    pub fn time_limit(mut self, limit: Duration) -> Self {
        self.time_limit = self.invalid.time_limit(limit);
        self
    }

    /// The task's concurrency key: a method with a per-key limit (`Service::key_concurrency`)
    /// runs at most that many tasks with the same key at a time, across workers when they
    /// share a flow store (docs/flow.md#per-key-concurrency). Travels in the envelope
    /// (`key`). An empty key or one over 255 bytes is returned as [`Error::Key`] by the call
    /// that sends the task, and nothing is sent.
    ///
    /// ```
    /// use warren_client::Task;
    /// assert!(Task::new("crm.sync", &()).key("customer-42").check().is_ok());
    /// assert!(Task::new("crm.sync", &()).key("").check().is_err());
    /// assert!(Task::new("crm.sync", &()).key("k".repeat(256)).check().is_err());
    /// ```
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = self.invalid.key(key.into());
        self
    }

    /// The task's priority: on a service whose queue has a priority range
    /// (`Service::priorities` and this client's `AmqpConfig::with_priorities`), higher
    /// priorities are delivered first (docs/flow.md#priorities). Sent as the AMQP
    /// `priority` property and in the envelope (`priority`), so retries and deferrals keep
    /// it. A priority above the service's range (any above 0 when this client's config
    /// gives the service none) is returned as [`Error::PriorityOutOfRange`] by the call
    /// that sends the task, and nothing is sent.
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = Some(priority);
        self
    }

    /// This task's own retry policy: it overrides the method's, the service's and the
    /// worker's (see [`RetryPolicy`] for the precedence). Travels in the envelope.
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Publishes the task's final status ([`warren_core::status::TaskStatus`], `succeeded`
    /// with the result or `failed` with the error) to `topic` when it ends: a notification
    /// instead of polling [`crate::Client::status`].
    pub fn notify(mut self, topic: impl Into<String>) -> Self {
        self.notify = Some(topic.into());
        self
    }

    /// Records the task that caused this one (set by handler contexts).
    pub fn with_parent(mut self, parent: Uuid) -> Self {
        self.parent = Some(parent);
        self
    }

    /// Marks this task as part `part_id` of `total_parts` of a job the caller split itself;
    /// its result goes to `part_queue`, and the job's `oncomplete` hook (set on every part
    /// with [`Task::on_complete`]) fires once when all parts are in. The queue name is checked
    /// (at most 255 bytes, not `amq.`) when the task is sent.
    pub fn with_part(
        mut self,
        part_id: u32,
        total_parts: u32,
        part_queue: impl Into<String>,
    ) -> Self {
        self.part = Some(PartDecorator {
            part_id,
            total_parts,
            part_queue: part_queue.into(),
        });
        self
    }

    /// The target (`None` when its name was refused; [`Task::check`] says why).
    #[must_use]
    pub fn target(&self) -> Option<&Target> {
        self.target.as_ref()
    }

    /// The first invalid argument this task was built with (what sending it would return),
    /// or `Ok`.
    pub fn check(&self) -> Result<(), Error> {
        self.invalid.check()
    }

    /// The unique ttl, for a unique task.
    pub(crate) fn unique_ttl(&self) -> Option<Duration> {
        self.unique.as_ref().map(|u| u.ttl)
    }

    pub(crate) fn into_envelope(self) -> Result<(Envelope, Option<Duration>), Error> {
        self.invalid.check()?;
        let Some(target) = &self.target else {
            return Err(Error::Broker(warren_core::Error::Config(
                "the task has no target".into(),
            )));
        };
        if let Some(cid) = &self.cid {
            check_cid(cid)?;
        }
        if let Some(part) = &self.part {
            validate_part_queue(&part.part_queue)?;
            if part.part_id >= part.total_parts {
                return Err(Error::Broker(warren_core::Error::Config(format!(
                    "part_id {} is not below total_parts {}",
                    part.part_id, part.total_parts
                ))));
            }
        }
        let mut env = Envelope::new(target, self.payload, self.cid);
        // Any task may be split by its worker: its part queue name must fit.
        check_part_queue(&env.svc, &env.method)?;
        env.hooks = self.hooks;
        env.parent = self.parent;
        env.part = self.part;
        env.retry = self.retry;
        env.attempt = self.attempt.max(1);
        env.caller_retries = self.caller_retries;
        if let Some(t) = &self.notify {
            warren_core::names::validate_name("topic", t)?;
        }
        env.notify = self.notify;
        env.key = self.key;
        env.priority = self.priority.filter(|p| *p > 0);
        env.unique = self.unique.map(|u| u.key);
        env.time_limit_ms = self.time_limit.map(|d| {
            // Whole milliseconds, rounded up: a limit under 1 ms is still a limit.
            u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
        });
        Ok((env, self.timeout))
    }
}

/// A cid must be 1 to 255 bytes (it is also the AMQP `correlation_id`).
pub(crate) fn check_cid(cid: &str) -> Result<(), Error> {
    if cid.is_empty() || cid.len() > 255 {
        return Err(Error::Broker(warren_core::Error::Config(
            "a cid must be 1 to 255 bytes".into(),
        )));
    }
    Ok(())
}

/// What [`crate::Client::enqueue`] returns: the task's id and correlation id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The task id (also the AMQP `message_id`).
    pub id: Uuid,
    /// The correlation id (also the AMQP `correlation_id`).
    pub cid: String,
}
