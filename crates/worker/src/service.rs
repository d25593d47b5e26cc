//! [`Service`]: a named set of methods a worker hosts.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use warren_core::names::validate_name;
use warren_core::topology::service_queue;

use crate::handler::{ErasedHandler, Typed};
use crate::{Context, TaskError, WorkerError};
use warren_core::RetryPolicy;

/// A named service: methods whose handlers are async functions
/// `async fn(Context, In) -> Result<Out, TaskError>` with `In: Deserialize` and
/// `Out: Serialize`. warren decodes the payload into `In`; a payload that does not fit is
/// dead-lettered as `bad_payload` without calling the handler.
///
/// Registration never fails on the spot: an invalid name, a method registered twice or a
/// subscription of an unknown method is remembered, and `WorkerBuilder::build` reports every
/// one of them at once ([`WorkerError::Registration`]), before it connects.
///
/// ```
/// use warren_worker::{Context, Service, TaskError};
/// async fn echo(_: Context, s: String) -> Result<String, TaskError> { Ok(s) }
/// let svc = Service::new("text").method("echo", echo);
/// assert!(svc.errors().is_empty());
/// assert_eq!(Service::new("Text").errors().len(), 1);
/// assert_eq!(svc.method("echo", echo).errors().len(), 1); // registered twice
/// ```
pub struct Service {
    pub(crate) name: String,
    pub(crate) methods: BTreeMap<String, Arc<dyn ErasedHandler>>,
    pub(crate) retry: Option<RetryPolicy>,
    pub(crate) method_retry: HashMap<String, RetryPolicy>,
    /// Hard time limits per method (`time_limit`).
    pub(crate) time_limits: HashMap<String, Duration>,
    pub(crate) subscriptions: Vec<(String, String)>,
    /// Rate limits and per-key limits per method (`rate_limit`, `key_concurrency`).
    pub(crate) limits: crate::flow::Limits,
    /// The priority range of the service's queue (`priorities`).
    pub(crate) max_priority: Option<u8>,
    /// What was wrong with the registrations, reported by `WorkerBuilder::build`.
    pub(crate) errors: Vec<WorkerError>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("methods", &self.methods.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Service {
    /// A service named `name` (`[a-z0-9_.-]`, and its queue name within 255 bytes; an
    /// invalid name is reported by `build`).
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        let mut errors = Vec::new();
        if let Err(e) =
            validate_name("service", &name).and_then(|()| service_queue(&name).map(drop))
        {
            errors.push(e.into());
        }
        Self {
            name,
            methods: BTreeMap::new(),
            retry: None,
            method_retry: HashMap::new(),
            time_limits: HashMap::new(),
            subscriptions: Vec::new(),
            limits: crate::flow::Limits::default(),
            max_priority: None,
            errors,
        }
    }

    /// Registers a method (an invalid or repeated name is reported by `build`).
    #[must_use]
    pub fn method<F, Fut, In, Out>(mut self, name: &str, handler: F) -> Self
    where
        F: Fn(Context, In) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Out, TaskError>> + Send + 'static,
        In: DeserializeOwned + 'static,
        Out: Serialize + 'static,
    {
        if let Err(e) = validate_name("method", name) {
            self.errors.push(e.into());
        } else if self.methods.contains_key(name) {
            self.errors
                .push(WorkerError::Duplicate(format!("{}.{name}", self.name)));
        } else {
            self.methods
                .insert(name.to_owned(), Arc::new(Typed::new(handler)));
        }
        self
    }

    /// What is wrong with this service's registrations so far (empty when nothing is);
    /// `WorkerBuilder::build` fails with all of them.
    #[must_use]
    pub fn errors(&self) -> &[WorkerError] {
        &self.errors
    }

    /// The retry policy of this service's methods (overrides the worker's default).
    #[must_use]
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// The retry policy of one method; overrides the service's policy and the worker's
    /// default, and is overridden by a task's own policy (`Task::with_retry`).
    ///
    /// ```
    /// use std::time::Duration;
    /// use warren_worker::{Context, RetryPolicy, Service, TaskError};
    /// async fn charge(_: Context, cents: u64) -> Result<u64, TaskError> { Ok(cents) }
    /// let svc = Service::new("billing")
    ///     .method("charge", charge)
    ///     .retry_method("charge", RetryPolicy::fixed(5, Duration::from_secs(2)));
    /// # let _ = svc;
    /// ```
    #[must_use]
    pub fn retry_method(mut self, method: &str, policy: RetryPolicy) -> Self {
        self.method_retry.insert(method.to_owned(), policy);
        self
    }

    /// The hard time limit of one method, per attempt: at the deadline the handler's future
    /// is dropped (whatever it was awaiting is cancelled, its concurrency slot freed) and the
    /// attempt fails with kind `timeout`, which is retried per the method's retry policy
    /// like any failure. A task may carry its own limit (`Task::time_limit`); when both are
    /// set the smaller one applies. Handlers see the deadline as [`Context::deadline`] and can
    /// stop cleanly before it. A zero limit, or one for a method the service does not
    /// register, is reported by `build`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use warren_worker::{Context, Service, TaskError};
    /// async fn encode(_: Context, clip: String) -> Result<String, TaskError> { Ok(clip) }
    /// let svc = Service::new("video")
    ///     .method("encode", encode)
    ///     .time_limit("encode", Duration::from_secs(600));
    /// assert!(svc.errors().is_empty());
    /// assert_eq!(svc.time_limit("encode", Duration::ZERO).errors().len(), 1);
    /// ```
    #[must_use]
    pub fn time_limit(mut self, method: &str, limit: Duration) -> Self {
        if limit.is_zero() {
            self.errors.push(WorkerError::ZeroTimeLimit(format!(
                "{}.{method}",
                self.name
            )));
        } else {
            self.time_limits.insert(method.to_owned(), limit);
        }
        self
    }

    /// Limits how often `method` starts: at most `n` starts per `per`, spaced evenly (one
    /// every `per / n`, no burst). With a flow store (`WorkerBuilder::flow_store`, Redis)
    /// the limit holds across every worker sharing it; without one, per worker. A task over
    /// the limit waits on the broker (through the delay queues) for the start reserved for
    /// it, then runs: it is not a failure and its attempt does not change. Zero `n` or `per`,
    /// more than a million starts a second, or a method the service does not register is
    /// reported by `build`. See docs/flow.md#rate-limits.
    ///
    /// ```
    /// use std::time::Duration;
    /// use warren_worker::{Context, Service, TaskError};
    /// async fn sync(_: Context, account: String) -> Result<(), TaskError> { Ok(()) }
    /// let svc = Service::new("crm")
    ///     .method("sync", sync)
    ///     .rate_limit("sync", 50, Duration::from_secs(1));
    /// assert!(svc.errors().is_empty());
    /// assert_eq!(svc.rate_limit("sync", 0, Duration::from_secs(1)).errors().len(), 1);
    /// ```
    #[must_use]
    pub fn rate_limit(mut self, method: &str, n: u32, per: Duration) -> Self {
        let name = format!("{}.{method}", self.name);
        let interval = if n == 0 { Duration::ZERO } else { per / n };
        let reason = if n == 0 {
            Some("zero tasks per period")
        } else if per.is_zero() {
            Some("a zero period")
        } else if interval < Duration::from_micros(1) {
            Some("more than 1,000,000 starts a second")
        } else {
            None
        };
        match reason {
            Some(r) => self.errors.push(WorkerError::InvalidRate {
                method: name,
                reason: r.to_owned(),
            }),
            None => {
                self.limits.rates.insert(method.to_owned(), interval);
            }
        }
        self
    }

    /// Runs at most `n` tasks of `method` with the same key (`Task::key`) at a time. With a
    /// flow store (`WorkerBuilder::flow_store`, Redis) the limit holds across every worker
    /// sharing it, and a worker that dies holding a key frees it when its lease runs out
    /// (`WorkerBuilder::key_lease`, 30 s by default); without one, per worker. A task whose
    /// key is busy waits on the broker and comes back (so tasks of other keys are not held
    /// up behind it); tasks without a key are not limited. Zero `n`, or a method the service
    /// does not register, is reported by `build`. See docs/flow.md#per-key-concurrency.
    ///
    /// ```
    /// use warren_worker::{Context, Service, TaskError};
    /// async fn sync(_: Context, account: String) -> Result<(), TaskError> { Ok(()) }
    /// let svc = Service::new("crm").method("sync", sync).key_concurrency("sync", 1);
    /// assert!(svc.errors().is_empty());
    /// assert_eq!(svc.key_concurrency("sync", 0).errors().len(), 1);
    /// ```
    #[must_use]
    pub fn key_concurrency(mut self, method: &str, n: u32) -> Self {
        if n == 0 {
            self.errors.push(WorkerError::ZeroKeyConcurrency(format!(
                "{}.{method}",
                self.name
            )));
        } else {
            self.limits.keyed.insert(method.to_owned(), n);
        }
        self
    }

    /// Gives the service's queue the priority range `0..=max` (`x-max-priority`): tasks are
    /// delivered highest `Task::priority` first. Classic queues only (RabbitMQ 3.10 refuses
    /// priorities on quorum queues: `build` fails with
    /// `warren_core::Error::PrioritiesNeedClassic`). Clients sending to the service declare
    /// its queue too, so they need the same range in their `AmqpConfig::with_priorities`.
    /// Zero is reported by `build`; keep `max` at 10 or less. See docs/flow.md#priorities.
    ///
    /// ```
    /// use warren_worker::{Context, Service, TaskError};
    /// async fn render(_: Context, id: u64) -> Result<u64, TaskError> { Ok(id) }
    /// let svc = Service::new("reports").method("render", render).priorities(5);
    /// assert!(svc.errors().is_empty());
    /// ```
    #[must_use]
    pub fn priorities(mut self, max: u8) -> Self {
        if max == 0 {
            self.errors
                .push(WorkerError::ZeroPriorities(self.name.clone()));
        } else {
            self.max_priority = Some(max);
        }
        self
    }

    /// Subscribes `method` to `topic`: every message published to the topic
    /// ([`warren_client::Client::publish`]) is delivered to this method through its own
    /// durable queue `warren.sub.<topic>:<svc>:<method>`, created when the worker starts and
    /// kept when it stops, so messages published while no worker runs wait for it. A
    /// delivery that fails is retried per the method's policy (as a task of this service);
    /// one that can never succeed is dead-lettered to `warren.dead.<svc>`.
    ///
    /// ```
    /// use warren_worker::{Context, Service, TaskError};
    /// async fn ship(_: Context, order: serde_json::Value) -> Result<(), TaskError> { Ok(()) }
    /// let svc = Service::new("shipping")
    ///     .method("ship", ship)
    ///     .subscribe("orders.paid", "ship");
    /// # let _ = svc;
    /// ```
    #[must_use]
    pub fn subscribe(mut self, topic: &str, method: &str) -> Self {
        let checked = validate_name("topic", topic)
            .and_then(|()| validate_name("method", method))
            .and_then(|()| {
                warren_core::topology::QueueSpec::subscription(
                    topic,
                    &self.name,
                    method,
                    warren_core::QueueType::Quorum,
                )
                .map(drop)
            });
        let sub = (topic.to_owned(), method.to_owned());
        if let Err(e) = checked {
            self.errors.push(e.into());
        } else if self.subscriptions.contains(&sub) {
            self.errors.push(WorkerError::Duplicate(format!(
                "subscription of {}.{method} to {topic}",
                self.name
            )));
        } else {
            self.subscriptions.push(sub);
        }
        self
    }

    /// The service name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }
}
