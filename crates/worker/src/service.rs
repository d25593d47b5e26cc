//! [`Service`]: a named set of methods a worker hosts.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;

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
/// ```
/// use warren_worker::{Context, Service, TaskError};
/// async fn echo(_: Context, s: String) -> Result<String, TaskError> { Ok(s) }
/// let svc = Service::new("text").unwrap().method("echo", echo).unwrap();
/// assert!(Service::new("Text").is_err());
/// assert!(svc.method("echo", echo).is_err()); // registered twice
/// ```
pub struct Service {
    pub(crate) name: String,
    pub(crate) methods: BTreeMap<String, Arc<dyn ErasedHandler>>,
    pub(crate) retry: Option<RetryPolicy>,
    pub(crate) method_retry: HashMap<String, RetryPolicy>,
    pub(crate) subscriptions: Vec<(String, String)>,
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
    /// A service named `name` (`[a-z0-9_.-]`, and its queue name within 255 bytes).
    pub fn new(name: impl Into<String>) -> Result<Self, WorkerError> {
        let name = name.into();
        validate_name("service", &name)?;
        service_queue(&name)?;
        Ok(Self {
            name,
            methods: BTreeMap::new(),
            retry: None,
            method_retry: HashMap::new(),
            subscriptions: Vec::new(),
        })
    }

    /// Registers a method.
    pub fn method<F, Fut, In, Out>(mut self, name: &str, handler: F) -> Result<Self, WorkerError>
    where
        F: Fn(Context, In) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Out, TaskError>> + Send + 'static,
        In: DeserializeOwned + 'static,
        Out: Serialize + 'static,
    {
        validate_name("method", name)?;
        if self.methods.contains_key(name) {
            return Err(WorkerError::Duplicate(format!("{}.{name}", self.name)));
        }
        self.methods
            .insert(name.to_owned(), Arc::new(Typed::new(handler)));
        Ok(self)
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
    /// let svc = Service::new("billing").unwrap()
    ///     .method("charge", charge).unwrap()
    ///     .retry_method("charge", RetryPolicy::fixed(5, Duration::from_secs(2)));
    /// # let _ = svc;
    /// ```
    #[must_use]
    pub fn retry_method(mut self, method: &str, policy: RetryPolicy) -> Self {
        self.method_retry.insert(method.to_owned(), policy);
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
    /// let svc = Service::new("shipping").unwrap()
    ///     .method("ship", ship).unwrap()
    ///     .subscribe("orders.paid", "ship").unwrap();
    /// # let _ = svc;
    /// ```
    pub fn subscribe(mut self, topic: &str, method: &str) -> Result<Self, WorkerError> {
        validate_name("topic", topic)?;
        validate_name("method", method)?;
        warren_core::topology::QueueSpec::subscription(
            topic,
            &self.name,
            method,
            warren_core::QueueType::Quorum,
        )?;
        let sub = (topic.to_owned(), method.to_owned());
        if self.subscriptions.contains(&sub) {
            return Err(WorkerError::Duplicate(format!(
                "subscription of {}.{method} to {topic}",
                self.name
            )));
        }
        self.subscriptions.push(sub);
        Ok(self)
    }

    /// The service name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }
}
