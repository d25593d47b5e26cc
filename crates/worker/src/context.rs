//! [`Context`]: what a running handler knows about its task, and a client to call others.

use std::sync::{Arc, Mutex};

use futures_util::stream::Stream;
use serde::de::DeserializeOwned;
use uuid::Uuid;
use warren_client::{
    Chain, ChainHandle, ChainResult, Client, InvokeRetry, Message, Parallel, ParallelReceipt,
    Receipt, Retried, Task,
};
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
    /// The task that caused this one, if any.
    pub(crate) parent: Option<Uuid>,
    /// The worker's shared values.
    pub(crate) state: crate::state::State,
    /// Chains this handler enqueued, in order (for `wait_children` and result merging).
    pub(crate) children: Children,
    /// When this attempt's hard time limit stops the handler, if it has one.
    pub(crate) deadline: Option<std::time::Instant>,
    /// Cancelled when the task is cancelled while it runs.
    pub(crate) cancel: tokio_util::sync::CancellationToken,
}

/// The handles of the chains a handler enqueued; shared by the context's clones.
pub(crate) type Children = Arc<Mutex<Vec<ChainHandle>>>;

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

    /// The task that caused this one: the split task of a part, the task whose outcome
    /// fired a hook, the caller of a parallel target, the handler that enqueued it through
    /// its context. `None` for a task a client sent directly.
    #[must_use]
    pub fn parent(&self) -> Option<Uuid> {
        self.parent
    }

    /// The worker's shared value of type `T` ([`crate::WorkerBuilder::state`]). A type that
    /// was never registered is a [`crate::TaskError::reject`] naming it, so `?` dead-letters
    /// the task with that reason (see the `state` module docs for why a type map).
    ///
    /// ```
    /// use warren_worker::{Context, TaskError};
    /// struct Db { url: String }
    /// async fn lookup(ctx: Context, key: String) -> Result<String, TaskError> {
    ///     let db = ctx.state::<Db>()?;
    ///     Ok(format!("{}/{key}", db.url))
    /// }
    /// // Worker::builder().state(Db { url: "postgres://..".into() }).service(..)
    /// ```
    pub fn state<T: Send + Sync + 'static>(&self) -> Result<&T, crate::TaskError> {
        self.state.get::<T>()
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

    /// When this attempt's hard time limit stops the handler (its future is dropped and the
    /// attempt fails with kind `timeout`), or `None` when it has no limit. The limit is the
    /// task's own (`Task::time_limit`) or its method's (`Service::time_limit`), the smaller
    /// of the two when both are set, counted from the moment the handler was called. A
    /// handler that can stop cleanly (save progress, return a partial result, or
    /// `TaskError::retry_after`) watches it, e.g. with
    /// `tokio::time::sleep_until(deadline.into())` or [`Context::time_left`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use warren_worker::{Context, TaskError};
    /// async fn crunch(ctx: Context, items: Vec<u64>) -> Result<u64, TaskError> {
    ///     let mut sum = 0;
    ///     for i in items {
    ///         // Stop cleanly a second before the hard limit, and continue in a retry.
    ///         if ctx.time_left().is_some_and(|left| left < Duration::from_secs(1)) {
    ///             return Err(TaskError::retry_after(Duration::ZERO, "out of time"));
    ///         }
    ///         sum += i;
    ///     }
    ///     Ok(sum)
    /// }
    /// ```
    #[must_use]
    pub fn deadline(&self) -> Option<std::time::Instant> {
        self.deadline
    }

    /// The time left before [`Context::deadline`] (zero once it has passed), or `None` when
    /// the attempt has no time limit.
    #[must_use]
    pub fn time_left(&self) -> Option<std::time::Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(std::time::Instant::now()))
    }

    /// Completes when this task is cancelled while it runs (`Client::cancel` of its id, its
    /// parent's or its chain's id, or `Client::cancel_cid` of its cid). From then on the
    /// handler has the worker's grace period ([`crate::WorkerBuilder::cancel_grace`],
    /// default 10 s) to return; after it, its future is dropped. Either way the task fails
    /// with kind `cancelled` (never retried), unless the handler returns `Ok` within the
    /// grace: a finished result stands. See docs/cancellation.md.
    ///
    /// ```
    /// use std::time::Duration;
    /// use warren_worker::{Context, TaskError};
    /// async fn crawl(ctx: Context, pages: u32) -> Result<u32, TaskError> {
    ///     for page in 0..pages {
    ///         tokio::select! {
    ///             () = ctx.cancelled() => return Err(TaskError::fail(format!("stopped at page {page}"))),
    ///             () = tokio::time::sleep(Duration::from_millis(10)) => {}
    ///         }
    ///     }
    ///     Ok(pages)
    /// }
    /// ```
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// `true` once this task was cancelled while it runs (see [`Context::cancelled`]).
    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// The task's cancellation token (a clone), for code that takes a
    /// [`tokio_util::sync::CancellationToken`]. Cancelling it yourself does not cancel the
    /// task elsewhere; use [`Client::cancel`] for that.
    #[must_use]
    pub fn cancel_token(&self) -> tokio_util::sync::CancellationToken {
        self.cancel.clone()
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

    /// Publishes `msg` to its topic with this task's cid (unless the message sets one) and
    /// this task as the parent (see [`Client::publish`]).
    pub async fn publish(&self, msg: Message) -> Result<Receipt, warren_client::Error> {
        self.client
            .publish(msg.inherit_cid(&self.cid).with_parent(self.id))
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

    /// Enqueues a child task: this task's cid and this task as its parent (see
    /// [`Client::enqueue`]).
    pub async fn enqueue(&self, task: Task) -> Result<Receipt, warren_client::Error> {
        self.client.enqueue(self.child(task)).await
    }

    /// Invokes another service and waits for its typed result: this task's cid and this
    /// task as its parent (see [`Client::invoke`]).
    pub async fn invoke<R: DeserializeOwned>(&self, task: Task) -> Result<R, warren_client::Error> {
        self.client.invoke(self.child(task)).await
    }

    /// Sends a chain from this handler (this task as its parent, this task's cid unless the
    /// chain sets one) and returns its handle. The chain counts as this handler's child:
    /// [`Context::wait_children`] waits for it, and when this handler is a chain step, the
    /// child's returned values reach the parent chain's result (merged on request, see
    /// [`warren_client::Extract::merge_children`]) if it ended before the handler returned.
    pub async fn enqueue_chain(&self, chain: Chain) -> Result<ChainHandle, warren_client::Error> {
        let chain = chain.with_parent(self.id).inherit_cid(&self.cid);
        let h = self.client.enqueue_chain(chain).await?;
        if let Ok(mut c) = self.children.lock() {
            c.push(h.clone());
        }
        Ok(h)
    }

    /// Sends a chain and waits for its result (a child, as with [`Context::enqueue_chain`]).
    pub async fn run_chain(&self, chain: Chain) -> Result<ChainResult, warren_client::Error> {
        self.enqueue_chain(chain).await?.wait().await
    }

    /// Runs `chains` as children with at most `max_parallel` running at once; results in
    /// input order (see [`Client::enqueue_in_parallel`]).
    pub async fn enqueue_in_parallel(
        &self,
        chains: impl IntoIterator<Item = Chain>,
        max_parallel: usize,
    ) -> Result<Vec<Result<ChainResult, warren_client::Error>>, warren_client::Error> {
        warren_client::run_capped(chains, max_parallel, |c| self.run_chain(c)).await
    }

    /// The handles of every chain this handler enqueued so far, in enqueue order.
    #[must_use]
    pub fn children(&self) -> Vec<ChainHandle> {
        self.children.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Waits for every chain this handler enqueued; their ids and results in enqueue order.
    pub async fn wait_children(&self) -> Vec<(Uuid, Result<ChainResult, warren_client::Error>)> {
        let mut out = Vec::new();
        for h in self.children() {
            out.push((h.id, h.wait().await));
        }
        out
    }

    /// The chains this handler enqueued, as they end (wait-any over the children).
    pub fn children_completed(
        &self,
    ) -> impl Stream<Item = (Uuid, Result<ChainResult, warren_client::Error>)> + Send + Unpin {
        warren_client::as_completed(self.children())
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
