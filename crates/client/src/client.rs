//! [`Client`]: connect, enqueue, invoke.

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::sync::OnceCell;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warren_core::envelope::ReplyOutcome;
use warren_core::status::{Recorder, StatusStore, TaskState, TaskStatus};
use warren_core::topology::QueueSpec;
use warren_core::{AmqpConfig, Broker, Envelope, Publisher, TaskSender, Via};

use crate::reply::Replies;
use crate::{Error, Receipt, Task};

/// Default deadline of [`Client::invoke`].
pub const DEFAULT_INVOKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds a [`Client`].
///
/// ```no_run
/// # async fn demo() -> Result<(), warren_client::Error> {
/// use std::time::Duration;
/// use warren_client::{AmqpConfig, Client, QueueType};
/// let client = Client::builder()
///     .amqp(AmqpConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f")?.with_queue_type(QueueType::Classic))
///     .invoke_timeout(Duration::from_secs(5))
///     .connect()
///     .await?;
/// # let _ = client; Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct ClientBuilder {
    amqp: Option<AmqpConfig>,
    invoke_timeout: Duration,
    publisher_channels: usize,
    store: Option<Arc<dyn StatusStore>>,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            amqp: None,
            invoke_timeout: DEFAULT_INVOKE_TIMEOUT,
            publisher_channels: 2,
            store: None,
        }
    }
}

impl ClientBuilder {
    /// Broker settings (default: [`AmqpConfig::from_env`]).
    pub fn amqp(mut self, config: AmqpConfig) -> Self {
        self.amqp = Some(config);
        self
    }

    /// Default deadline for invokes (default 30 s); a [`Task`] can set its own.
    pub fn invoke_timeout(mut self, timeout: Duration) -> Self {
        self.invoke_timeout = timeout;
        self
    }

    /// How many confirm channels publishes pipeline over (default 2).
    pub fn publisher_channels(mut self, n: usize) -> Self {
        self.publisher_channels = n.max(1);
        self
    }

    /// Where task statuses are recorded and read ([`Client::status`]); a worker given the
    /// same store records every task it runs. Without one, results reach only waiting
    /// callers and status calls return [`Error::NoStatusStore`].
    pub fn status_store(mut self, store: Arc<dyn StatusStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Connects to the broker.
    pub async fn connect(self) -> Result<Client, Error> {
        let amqp = match self.amqp.clone() {
            Some(c) => c,
            None => AmqpConfig::from_env()?,
        };
        let broker = Broker::connect(amqp).await?;
        Ok(self.with_broker(broker))
    }

    /// Builds the client over an existing broker connection (workers share theirs).
    pub fn with_broker(self, broker: Broker) -> Client {
        let publisher = Publisher::new(broker.clone(), self.publisher_channels);
        Client {
            inner: Arc::new(Inner {
                id: Uuid::now_v7(),
                sender: TaskSender::new(&broker, publisher),
                broker,
                invoke_timeout: self.invoke_timeout,
                replies: OnceCell::new(),
                shutdown: CancellationToken::new(),
                recorder: self.store.map(Recorder::new),
            }),
        }
    }
}

/// A connection to warren: enqueue tasks and invoke services. Cheap to clone; clones share
/// the connection, the publisher and the reply queue.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    id: Uuid,
    broker: Broker,
    sender: TaskSender,
    invoke_timeout: Duration,
    replies: OnceCell<Replies>,
    shutdown: CancellationToken,
    recorder: Option<Recorder>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.inner.id)
            .field("broker", &self.inner.broker)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A builder with default settings.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Connects with `WARREN_AMQP_URL` (or the local default) and default settings.
    pub async fn connect() -> Result<Self, Error> {
        Self::builder().connect().await
    }

    /// The broker connection (for tools that inspect queues).
    #[must_use]
    pub fn broker(&self) -> &Broker {
        &self.inner.broker
    }

    /// Enqueues `task` and returns once the broker has confirmed it. Fire and forget: the
    /// result is not awaited (see [`Client::invoke`] for that).
    ///
    /// ```no_run
    /// # async fn demo(client: warren_client::Client) -> Result<(), warren_client::Error> {
    /// use warren_client::Task;
    /// let receipt = client.enqueue(Task::new("images.resize", &serde_json::json!({"w": 64}))).await?;
    /// println!("queued {} (cid {})", receipt.id, receipt.cid);
    /// # Ok(()) }
    /// ```
    ///
    /// Errors: an invalid name, cid or payload before anything is sent; broker errors
    /// ([`Error::maybe_stored`] says whether the task may run anyway).
    pub async fn enqueue(&self, task: Task) -> Result<Receipt, Error> {
        task.check()?;
        let delay = task.send_delay()?;
        let unique_ttl = task.unique_ttl();
        let (env, _) = task.into_envelope()?;
        self.inner.sender.check_priority(&env)?;
        if let Some(ttl) = unique_ttl {
            // The first task's receipt while it is pending or running (docs/cancellation.md).
            if let Some(first) = Box::pin(self.claim_unique(&env, ttl)).await? {
                tracing::debug!(id = %first.id, "unique key held; returning the first task's receipt");
                return Ok(first);
            }
        }
        match self.publish_enqueued(&env, delay).await {
            Ok(()) => Ok(Receipt {
                id: env.id,
                cid: env.cid,
            }),
            Err(e) => {
                // Surely not stored: the key is free again. Maybe stored: it stays claimed.
                if env.unique.is_some() && e.maybe_stored() == Some(false) {
                    self.unclaim_unique(&env).await;
                }
                Err(e)
            }
        }
    }

    /// Declares a hand-attached part's queue, records `pending` and publishes (now or
    /// after `delay`).
    async fn publish_enqueued(&self, env: &Envelope, delay: Option<Duration>) -> Result<(), Error> {
        if let Some(p) = &env.part {
            // A part the caller attached by hand: its job's part queue exists from the first
            // part's send (results never create it: a result whose part queue is gone
            // belongs to a finished job).
            let spec = QueueSpec::part(&p.part_queue, crate::parallel::FANIN_QUEUE_EXPIRY_MS)?;
            let specs = [spec];
            let declared = self
                .inner
                .sender
                .publisher()
                .declare_cached(&p.part_queue, &specs);
            match Box::pin(declared).await {
                // Declared by its job's creator with another expiry: it exists.
                Err(warren_core::Error::Refused { .. }) => {}
                other => other?,
            }
        }
        self.record_pending(env).await;
        match delay {
            // Boxed, like every rare branch here: an enqueue future stays small.
            Some(d) => Box::pin(self.send_later(env, d, None, self.publish_deadline())).await?,
            None => self.send_envelope(env, None).await?,
        }
        Ok(())
    }

    /// Invokes `task` and waits for its typed result (deadline: the task's, else the
    /// client's invoke timeout). A failure on the worker comes back as [`Error::Failed`] with its kind and
    /// message; no answer in time is [`Error::Timeout`].
    ///
    /// The deadline bounds the whole call from its start: opening the reply queue, the
    /// publish (with its retries through nacks and reconnects) and the wait. At the deadline
    /// the call returns [`Error::Timeout`] if the task was confirmed (it may still run), or
    /// the publish error ([`warren_core::Error::Unconfirmed`], whose `maybe_stored` says
    /// whether the task may run anyway).
    ///
    /// ```no_run
    /// # async fn demo(client: warren_client::Client) -> Result<(), warren_client::Error> {
    /// use warren_client::Task;
    /// let sum: i64 = client.invoke(Task::new("math.add", &serde_json::json!({"a": 1, "b": 2}))).await?;
    /// # let _ = sum; Ok(()) }
    /// ```
    pub async fn invoke<R: DeserializeOwned>(&self, task: Task) -> Result<R, Error> {
        let started = Instant::now();
        task.check()?;
        if task.unique.is_some() {
            return Err(crate::UniqueError::Invoke.into());
        }
        let delay = task.send_delay()?;
        let (mut env, timeout) = task.into_envelope()?;
        self.inner.sender.check_priority(&env)?;
        env.channel = Via::Invoke;
        let timeout = timeout.unwrap_or(self.inner.invoke_timeout);
        let deadline = started + timeout;
        let timed_out = |env: &Envelope| Error::Timeout {
            id: env.id,
            cid: env.cid.clone(),
            after: timeout,
        };
        let Ok(replies) = tokio::time::timeout_at(deadline, self.replies()).await else {
            return Err(timed_out(&env));
        };
        let replies = replies?;
        // The status store has its own 2 s bound; the invoke's deadline still comes first.
        let _ = tokio::time::timeout_at(deadline, self.record_pending(&env)).await;
        let rx = replies
            .register(env.id)
            .ok_or_else(|| Error::ReplyListener(replies.stop_reason()))?;
        let forget = ForgetOnDrop {
            replies,
            id: env.id,
        };
        match delay {
            Some(d) => {
                self.send_later(&env, d, Some(&replies.queue), deadline)
                    .await?;
            }
            None => {
                self.send_envelope_by(&env, Some(&replies.queue), deadline)
                    .await?;
            }
        }
        let reply = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => return Err(Error::ReplyListener(replies.stop_reason())),
            Err(_) => return Err(timed_out(&env)),
        };
        drop(forget);
        warren_core::metrics::invoke_answered(
            &env.svc,
            &env.method,
            matches!(reply.outcome, ReplyOutcome::Ok(_)),
            started.elapsed(),
        );
        match reply.outcome {
            ReplyOutcome::Ok(v) => {
                serde_json::from_value(v).map_err(|source| Error::Decode { id: env.id, source })
            }
            ReplyOutcome::Error(failure) => Err(Error::Failed {
                id: env.id,
                cid: env.cid,
                failure,
            }),
        }
    }

    /// The status of task `id` from the status store: `Ok(None)` when the store does not
    /// know it (never sent with a store, or expired). [`Error::NoStatusStore`] without a
    /// store; [`Error::Store`] when the store is unreachable (never hangs: 2 s deadline).
    pub async fn status(&self, id: Uuid) -> Result<Option<TaskStatus>, Error> {
        Ok(self.store()?.get(id).await?)
    }

    /// Every known task of correlation id `cid`, oldest first (a parallel invoke's targets,
    /// a split job's parts, children enqueued by handlers).
    pub async fn statuses(&self, cid: &str) -> Result<Vec<TaskStatus>, Error> {
        Ok(self.store()?.by_cid(cid).await?)
    }

    fn store(&self) -> Result<&Arc<dyn StatusStore>, Error> {
        self.inner
            .recorder
            .as_ref()
            .map(Recorder::store)
            .ok_or(Error::NoStatusStore)
    }

    /// The status recorder, when a store is configured.
    pub(crate) fn recorder(&self) -> Option<&Recorder> {
        self.inner.recorder.as_ref()
    }

    async fn record_pending(&self, env: &Envelope) {
        if let Some(r) = &self.inner.recorder {
            r.record_linked(
                &TaskStatus {
                    id: env.id,
                    cid: env.cid.clone(),
                    target: format!("{}.{}", env.svc, env.method),
                    state: TaskState::Pending,
                    attempts: 0,
                    result: None,
                    error: None,
                    created_ms: env.created_ms,
                    updated_ms: warren_core::envelope::now_ms(),
                },
                env,
            )
            .await;
        }
    }

    /// Publishes a prepared envelope to its service queue (declaring the queue on first use),
    /// with an optional reply queue, within the publish timeout: what a producer that builds
    /// envelopes itself (docs/wire-format.md) would publish. Most callers want
    /// [`Client::send`].
    pub async fn send_envelope(&self, env: &Envelope, reply_to: Option<&str>) -> Result<(), Error> {
        let deadline = self.inner.sender.deadline();
        self.send_envelope_by(env, reply_to, deadline).await
    }

    /// Like [`Client::send_envelope`], giving up at `deadline`.
    pub(crate) async fn send_envelope_by(
        &self,
        env: &Envelope,
        reply_to: Option<&str>,
        deadline: Instant,
    ) -> Result<(), Error> {
        Ok(self.inner.sender.send(env, reply_to, deadline).await?)
    }

    /// Sends a prepared envelope through the delay levels (`delay` rounded up to 100 ms; at
    /// once when it is zero). An over-long delay is [`Error::DelayTooLong`].
    pub(crate) async fn send_later(
        &self,
        env: &Envelope,
        delay: Duration,
        reply_to: Option<&str>,
        deadline: Instant,
    ) -> Result<(), Error> {
        match self
            .inner
            .sender
            .send_later(env, delay, reply_to, deadline)
            .await
        {
            Err(warren_core::Error::DelayTooLong(e)) => Err(Error::DelayTooLong(e)),
            other => Ok(other?),
        }
    }

    /// The task sender this client publishes through ([`TaskSender`]: warren-core's one
    /// path to service queues, delay queues and the publisher). Workers share their
    /// client's sender, so hooks, retries and parts go through the same publisher.
    #[must_use]
    pub fn sender(&self) -> &TaskSender {
        &self.inner.sender
    }

    /// When a publish started now gives up.
    pub(crate) fn publish_deadline(&self) -> Instant {
        self.inner.sender.deadline()
    }

    /// Declares a service's queue (and dead-letter queue) so tasks can wait in it before any
    /// worker exists. Done automatically before the first publish to each service.
    pub async fn ensure_service(&self, svc: &str) -> Result<(), Error> {
        Ok(self.inner.sender.ensure_service(svc).await?)
    }

    /// Stops waiting for a reply to `id` (a dropped handle).
    pub(crate) fn forget_reply(&self, id: &Uuid) {
        if let Some(r) = self.inner.replies.get() {
            r.forget(id);
        }
    }

    pub(crate) async fn replies(&self) -> Result<&Replies, Error> {
        self.inner
            .replies
            .get_or_try_init(|| {
                Replies::start(
                    self.inner.broker.clone(),
                    self.inner.id,
                    self.inner.shutdown.clone(),
                )
            })
            .await
            .map_err(Error::from)
    }

    /// Stops the reply listener, deletes the client's reply queue (a crashed client's queue
    /// expires by itself after 60 s) and closes the connection.
    pub async fn close(&self) {
        self.inner.shutdown.cancel();
        if let Some(replies) = self.inner.replies.get() {
            let _ = self.inner.broker.delete_queue(&replies.queue).await;
        }
        self.inner.broker.close().await;
    }
}

struct ForgetOnDrop<'a> {
    replies: &'a Replies,
    id: Uuid,
}

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        self.replies.forget(&self.id);
    }
}
