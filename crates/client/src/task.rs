//! [`Task`]: one task to enqueue or invoke.

use std::time::Duration;

use serde::Serialize;
use uuid::Uuid;
use warren_core::topology::{part_queue, validate_part_queue};
use warren_core::{Envelope, HookTarget, Hooks, PartDecorator, RetryPolicy, Target};

use crate::Error;

/// A task to send: target, payload and options. Build with [`Task::new`] and the `with_*`
/// methods, then pass to [`crate::Client::send`] or [`crate::Client::invoke_task`].
///
/// ```
/// use std::time::Duration;
/// use warren_client::Task;
/// let task = Task::new("billing.charge", &serde_json::json!({"cents": 1200}))
///     .unwrap()
///     .with_cid("order-42")
///     .with_timeout(Duration::from_secs(3));
/// assert_eq!(task.target().to_string(), "billing.charge");
/// assert!(Task::new("Billing.charge", &()).is_err()); // names are [a-z0-9_.-]
/// ```
#[derive(Debug, Clone)]
pub struct Task {
    pub(crate) target: Target,
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
}

impl Task {
    /// A task for `target` (`"svc.method"`, split at the last dot) with a JSON payload.
    pub fn new(target: &str, payload: &impl Serialize) -> Result<Self, Error> {
        Self::for_target(target.parse()?, payload)
    }

    /// A task for an already-validated target.
    pub fn for_target(target: Target, payload: &impl Serialize) -> Result<Self, Error> {
        Ok(Self {
            target,
            payload: serde_json::to_value(payload).map_err(Error::Encode)?,
            cid: None,
            hooks: Hooks::default(),
            timeout: None,
            parent: None,
            part: None,
            retry: None,
            attempt: 1,
            caller_retries: false,
            notify: None,
        })
    }

    /// Uses the caller's correlation id (the caller then owns its uniqueness); by default
    /// a fresh one is generated.
    #[must_use]
    pub fn with_cid(mut self, cid: impl Into<String>) -> Self {
        self.cid = Some(cid.into());
        self
    }

    /// How long [`crate::Client::invoke_task`] waits for the reply (default: the client's).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Invokes `target` with the result when the task succeeds.
    #[must_use]
    pub fn on_complete(mut self, target: &Target) -> Self {
        self.hooks.oncomplete = Some(HookTarget::from(target));
        self
    }

    /// Invokes `target` with the failure when the task fails for good.
    #[must_use]
    pub fn on_error(mut self, target: &Target) -> Self {
        self.hooks.onerror = Some(HookTarget::from(target));
        self
    }

    /// This task's own retry policy: it overrides the method's, the service's and the
    /// worker's (see [`RetryPolicy`] for the precedence). Travels in the envelope.
    #[must_use]
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Publishes the task's final status ([`warren_core::status::TaskStatus`], `succeeded`
    /// with the result or `failed` with the error) to `topic` when it ends: a notification
    /// instead of polling [`crate::Client::status`].
    #[must_use]
    pub fn notify(mut self, topic: impl Into<String>) -> Self {
        self.notify = Some(topic.into());
        self
    }

    /// Records the task that caused this one (set by handler contexts).
    #[must_use]
    pub fn with_parent(mut self, parent: Uuid) -> Self {
        self.parent = Some(parent);
        self
    }

    /// Marks this task as part `part_id` of `total_parts` of a job the caller split itself;
    /// its result goes to `part_queue`, and the job's `oncomplete` hook (set on every part
    /// with [`Task::on_complete`]) fires once when all parts are in. The queue name is checked
    /// (at most 255 bytes, not `amq.`) when the task is sent.
    #[must_use]
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

    /// The target.
    #[must_use]
    pub fn target(&self) -> &Target {
        &self.target
    }

    pub(crate) fn into_envelope(self) -> Result<(Envelope, Option<Duration>), Error> {
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
        let mut env = Envelope::new(&self.target, self.payload, self.cid);
        // Any task may be split by its worker: its part queue name must fit.
        part_queue(&env.svc, &env.method, &env.id)?;
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
