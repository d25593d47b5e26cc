//! [`Context`]: what a running handler knows about its task, and a client to call others.

use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;
use warren_client::{Client, InvokeRetry, Parallel, ParallelReceipt, Receipt, Retried, Task};
use warren_core::{PartDecorator, Via};

/// Handed to every handler call.
///
/// Tasks enqueued or invoked through the context inherit this task's cid and record it as
/// their parent, so a whole request can be followed across services by its cid.
#[derive(Clone)]
pub struct Context {
    pub(crate) id: Uuid,
    pub(crate) cid: String,
    pub(crate) svc: String,
    pub(crate) method: String,
    pub(crate) attempt: u32,
    pub(crate) redelivered: bool,
    pub(crate) via: Via,
    pub(crate) part: Option<PartDecorator>,
    pub(crate) topic: Option<String>,
    pub(crate) client: Client,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("id", &self.id)
            .field("cid", &self.cid)
            .field("target", &format_args!("{}.{}", self.svc, self.method))
            .field("attempt", &self.attempt)
            .field("redelivered", &self.redelivered)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// The task id (stable across retries and redeliveries: use it to make effects
    /// idempotent).
    #[must_use]
    pub fn task_id(&self) -> Uuid {
        self.id
    }

    /// The correlation id.
    #[must_use]
    pub fn cid(&self) -> &str {
        &self.cid
    }

    /// The service this task was sent to.
    #[must_use]
    pub fn service(&self) -> &str {
        &self.svc
    }

    /// The method being run.
    #[must_use]
    pub fn method(&self) -> &str {
        &self.method
    }

    /// 1 on the first attempt, +1 per retry.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// `true` when the broker delivered this message before (a worker died or lost its
    /// connection while holding it): the task may already have had effects.
    #[must_use]
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// How the task was sent (enqueue, invoke, hook, retry, ...).
    #[must_use]
    pub fn via(&self) -> Via {
        self.via
    }

    /// For a part of a split job: which part (`part_id`), of how many, and its part queue.
    #[must_use]
    pub fn part(&self) -> Option<&PartDecorator> {
        self.part.as_ref()
    }

    /// For a message published to a topic (and its retries): the topic.
    #[must_use]
    pub fn topic(&self) -> Option<&str> {
        self.topic.as_deref()
    }

    /// Publishes to `topic` with this task's cid (see [`Client::publish`]).
    pub async fn publish(
        &self,
        topic: &str,
        payload: &impl Serialize,
    ) -> Result<Receipt, warren_client::Error> {
        self.client
            .publish_message(topic, payload, Some(self.cid.clone()), Some(self.id))
            .await
    }

    /// The client this worker uses; tasks sent through it directly do not inherit the cid.
    #[must_use]
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn child(&self, task: Task) -> Task {
        task.with_cid(self.cid.clone()).with_parent(self.id)
    }

    /// Enqueues a child task (same cid, this task as parent).
    pub async fn enqueue(
        &self,
        target: &str,
        payload: &impl Serialize,
    ) -> Result<Receipt, warren_client::Error> {
        self.client
            .send(self.child(Task::new(target, payload)?))
            .await
    }

    /// Invokes another service and waits for its typed result (same cid, this task as
    /// parent).
    pub async fn invoke<R: DeserializeOwned>(
        &self,
        target: &str,
        payload: &impl Serialize,
    ) -> Result<R, warren_client::Error> {
        self.client
            .invoke_task(self.child(Task::new(target, payload)?))
            .await
    }

    /// Sends a child task built with options; cid and parent are set from this task.
    pub async fn send(&self, task: Task) -> Result<Receipt, warren_client::Error> {
        self.client.send(self.child(task)).await
    }

    /// Sends a chain from this handler (same cid unless the chain sets one, this task as
    /// parent) and returns its handle.
    pub async fn enqueue_chain(
        &self,
        chain: warren_client::Chain,
    ) -> Result<warren_client::ChainHandle, warren_client::Error> {
        self.client.enqueue_chain(chain.with_parent(self.id)).await
    }

    fn source(&self) -> String {
        format!("{}.{}", self.svc, self.method)
    }

    /// Starts a parallel invoke (or fan-out/fan-in) from this handler; its callbacks see
    /// this handler as `source`. See [`Parallel`].
    pub async fn parallel(&self, p: Parallel) -> Result<ParallelReceipt, warren_client::Error> {
        self.client
            .parallel(p.with_origin(self.source(), self.id))
            .await
    }

    /// Sync + sync invoke/retry from this handler (see [`InvokeRetry`]).
    pub async fn invoke_retry<R: DeserializeOwned>(
        &self,
        r: InvokeRetry,
    ) -> Result<R, warren_client::Error> {
        self.client.invoke_retry(self.origin(r)).await
    }

    /// Sync + async invoke/retry from this handler (see [`InvokeRetry`]).
    pub async fn invoke_retry_fallback<R: DeserializeOwned>(
        &self,
        r: InvokeRetry,
    ) -> Result<Retried<R>, warren_client::Error> {
        self.client.invoke_retry_fallback(self.origin(r)).await
    }

    /// Async + async invoke/retry from this handler (see [`InvokeRetry`]); returns the
    /// call's cid. The callback's `orig_cid` is this task's cid.
    pub async fn invoke_retry_async(&self, r: InvokeRetry) -> Result<String, warren_client::Error> {
        self.client.invoke_retry_async(self.origin(r)).await
    }

    fn origin(&self, r: InvokeRetry) -> InvokeRetry {
        r.with_origin(self.source(), self.id, self.cid.clone())
    }
}
