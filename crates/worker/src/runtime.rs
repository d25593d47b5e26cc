//! [`Worker`]: consume every hosted service's queue, run tasks with bounded concurrency,
//! and drain gracefully.
//!
//! Concurrency comes from RAII: a semaphore permit is taken *before* a delivery is pulled
//! from the consumer, and released when its task has been acked. Deliveries the broker
//! prefetched but the worker has not pulled stay unacked on the channel and return to the
//! queue when the channel closes. Handler tasks are tracked so shutdown can wait for them.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warren_client::{Client, ClientBuilder};
use warren_core::amqp::DelayMover;
use warren_core::topology::QueueSpec;
use warren_core::{AmqpConfig, Broker, ConsumerEvent, Incoming, Subscription, SubscriptionSpec};

use crate::process::{handle, HostedService, JoinSettings, Route, Shared};
use crate::state::StateBuilder;
use crate::{Service, WorkerError};
use warren_core::status::{Recorder, StatusStore, ADVERTISE_TTL};
use warren_core::RetryPolicy;

/// Builds a [`Worker`]. Defaults: 32 concurrent tasks, prefetch twice that, 3 attempts with
/// exponential backoff ([`RetryPolicy::default`]), 30 s drain on shutdown.
#[must_use]
pub struct WorkerBuilder {
    amqp: Option<AmqpConfig>,
    services: Vec<Service>,
    concurrency: usize,
    prefetch: Option<u16>,
    retry: RetryPolicy,
    drain_timeout: Duration,
    joins: JoinSettings,
    store: Option<Arc<dyn StatusStore>>,
    state: StateBuilder,
    metrics_listen: Option<std::net::SocketAddr>,
    consumer_timeout: Duration,
    schedules: Vec<Result<crate::schedule::Registered, WorkerError>>,
    flow_store: Option<Arc<dyn warren_core::flow::FlowStore>>,
    key_lease: Duration,
    cancel_grace: Duration,
}

/// Default of [`WorkerBuilder::consumer_timeout`]: RabbitMQ's default `consumer_timeout`.
pub const DEFAULT_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// How long before the broker's consumer timeout a delivery is acked early (or requeued
/// if it never started): a minute, or a third of the timeout when that is shorter.
fn ack_early_after(consumer_timeout: Duration) -> Option<Duration> {
    if consumer_timeout == Duration::MAX {
        return None;
    }
    let margin = Duration::from_secs(60).min(consumer_timeout / 3);
    Some(consumer_timeout.saturating_sub(margin))
}

/// Default of [`WorkerBuilder::completion_window`].
pub const DEFAULT_COMPLETION_WINDOW: Duration = Duration::from_secs(300);

impl Default for WorkerBuilder {
    fn default() -> Self {
        Self {
            amqp: None,
            services: Vec::new(),
            concurrency: 32,
            prefetch: None,
            retry: RetryPolicy::default(),
            drain_timeout: Duration::from_secs(30),
            joins: JoinSettings {
                completion_window: DEFAULT_COMPLETION_WINDOW,
                expiry: Duration::from_secs(24 * 3600),
            },
            store: None,
            state: StateBuilder::default(),
            metrics_listen: None,
            consumer_timeout: DEFAULT_CONSUMER_TIMEOUT,
            schedules: Vec::new(),
            flow_store: None,
            key_lease: warren_core::flow::DEFAULT_KEY_LEASE,
            cancel_grace: crate::cancel::DEFAULT_CANCEL_GRACE,
        }
    }
}

impl WorkerBuilder {
    /// Where rate limits (`Service::rate_limit`) and per-key slots
    /// (`Service::key_concurrency`) are kept. A Redis store (`warren_core::status::RedisStore`,
    /// which is also a status store) makes them hold across every worker using the same
    /// Redis and key prefix; without one they hold per worker, in memory. Only methods with
    /// a limit ever ask it. See docs/flow.md.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::{sync::Arc, time::Duration};
    /// use warren_core::status::RedisStore;
    /// use warren_worker::{Context, Service, TaskError, Worker};
    /// async fn sync(_: Context, account: String) -> Result<(), TaskError> { Ok(()) }
    /// let worker = Worker::builder()
    ///     .flow_store(Arc::new(RedisStore::from_env()?))
    ///     .service(Service::new("crm").method("sync", sync).rate_limit("sync", 50, Duration::from_secs(1)))
    ///     .build()
    ///     .await?;
    /// # let _ = worker; Ok(()) }
    /// ```
    pub fn flow_store(mut self, store: Arc<dyn warren_core::flow::FlowStore>) -> Self {
        self.flow_store = Some(store);
        self
    }

    /// The lease of a per-key slot (default [`warren_core::flow::DEFAULT_KEY_LEASE`], 30 s):
    /// a running handler renews it every third of it; a worker that dies holding a slot
    /// frees it this long after its last renewal at the latest. Zero is taken as 1 s.
    pub fn key_lease(mut self, lease: Duration) -> Self {
        self.key_lease = lease.max(Duration::from_secs(1));
        self
    }

    /// Broker settings (default: [`AmqpConfig::from_env`]).
    pub fn amqp(mut self, config: AmqpConfig) -> Self {
        self.amqp = Some(config);
        self
    }

    /// Shares `value` with every handler, which reads it with `ctx.state::<T>()`: a database
    /// pool, an HTTP client, settings. One value per type; a type given twice fails
    /// `build()`. See the `state` module docs for why a type map (like apalis's `Data<T>`)
    /// rather than axum's compile-time `State<S>`.
    ///
    /// ```no_run
    /// use warren_worker::{Context, Service, TaskError, Worker};
    /// struct Greeting(String);
    /// async fn greet(ctx: Context, name: String) -> Result<String, TaskError> {
    ///     Ok(format!("{} {name}", ctx.state::<Greeting>()?.0))
    /// }
    /// # async fn demo() -> Result<(), warren_worker::WorkerError> {
    /// let worker = Worker::builder()
    ///     .state(Greeting("hello".into()))
    ///     .service(Service::new("greeter").method("greet", greet))
    ///     .build()
    ///     .await?;
    /// # let _ = worker; Ok(()) }
    /// ```
    pub fn state<T: Send + Sync + 'static>(mut self, value: T) -> Self {
        self.state.add(value);
        self
    }

    /// The broker settings given to [`WorkerBuilder::amqp`], if any.
    #[must_use]
    pub fn amqp_config(&self) -> Option<&AmqpConfig> {
        self.amqp.as_ref()
    }

    /// Hosts a service.
    pub fn service(mut self, service: Service) -> Self {
        self.services.push(service);
        self
    }

    /// Most tasks running at once, over all services (default 32).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Unacked deliveries the broker may send each service's consumer ahead of time
    /// (default: twice the concurrency, at most 65535).
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = Some(n.max(1));
        self
    }

    /// Records every task's status (running, then succeeded / failed / waiting for a retry)
    /// in `store`, so any process with the same store can read it
    /// (`Client::status`). Store failures never stop tasks: see
    /// [`warren_core::status::Recorder`].
    pub fn status_store(mut self, store: Arc<dyn StatusStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Default retry policy of every service that sets none.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// How long shutdown waits for running handlers before abandoning them (their tasks are
    /// then not acked and will run again elsewhere).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// How long a split job's (or fan-in's) part queue may stay unused before RabbitMQ
    /// deletes it (default 24 h): the window after which an **abandoned** job (its splitter
    /// or every worker gone for good) is cleaned up. A running job's part queue is used by
    /// every result that arrives; a job that joins removes its part queue at once.
    pub fn part_queue_expiry(mut self, expiry: Duration) -> Self {
        self.joins.expiry = expiry.max(Duration::from_secs(1));
        self
    }

    /// How long a job's done marker (`warren.done.<job>`) lives after the join (default
    /// 5 min, at least 1 s). Within it, a split task redelivered after its job joined does
    /// nothing and a joiner that died after firing does not fire again; after it, nothing
    /// of the job is left on the broker. A part result arriving later still never fires a
    /// hook again (its part queue is gone, and results never re-create it): it is dropped.
    pub fn completion_window(mut self, window: Duration) -> Self {
        self.joins.completion_window = window.max(Duration::from_secs(1));
        self
    }

    /// Serves the process's metrics in the Prometheus text format at
    /// `http://<addr>/metrics` while the worker runs (port 0 picks a free port:
    /// [`Worker::metrics_addr`]). `build()` installs warren's Prometheus recorder as the
    /// process's global `metrics` recorder ([`crate::Prometheus::install`]); it fails with
    /// [`crate::MetricsError::RecorderInstalled`] when the application installed another one
    /// (serve that one yourself), and with [`crate::MetricsError::Listen`] when the address
    /// cannot be bound. Without this, warren records into whatever recorder the application
    /// installs (before `build()`), or nowhere. Names and labels: docs/operations.md.
    pub fn metrics_listen(mut self, addr: std::net::SocketAddr) -> Self {
        self.metrics_listen = Some(addr);
        self
    }

    /// The broker's `consumer_timeout` (default 30 min, RabbitMQ's default; **set it to the
    /// broker's value** when the node's `rabbitmq.conf` changes it; `Duration::MAX` when the
    /// broker's timeout is off). RabbitMQ closes a channel whose delivery stays unacked
    /// longer than this and requeues all its deliveries, so a worker acks a delivery whose
    /// handler still runs this long minus a margin (a minute, or a third of the timeout if
    /// less) after it arrived, and tracks the task itself from then on: it completes once,
    /// and its outcome is published as usual, but a crash of this worker after that early
    /// ack loses the run (see docs/time.md). A delivery that waited that long for a
    /// concurrency slot without starting is requeued instead.
    pub fn consumer_timeout(mut self, timeout: Duration) -> Self {
        self.consumer_timeout = timeout;
        self
    }

    /// How long a handler may still run after its task was cancelled (default
    /// [`crate::DEFAULT_CANCEL_GRACE`], 10 s): it sees the cancellation at once
    /// (`ctx.cancelled()`), and its future is dropped when the grace ends. Zero drops it at
    /// once. See docs/cancellation.md.
    pub fn cancel_grace(mut self, grace: Duration) -> Self {
        self.cancel_grace = grace;
        self
    }

    /// Carries the schedule `name`: each tick of `schedule` becomes one task for `target`
    /// (`"svc.method"`) with `payload`, however many workers carry the same schedule and
    /// whichever of them die (one of them holds the schedule's lease and fires the ticks;
    /// docs/time.md). An invalid name, cron expression, time zone, interval, target or
    /// payload fails `build()` with [`WorkerError::Schedule`] (or [`WorkerError::Name`] for
    /// the target), before anything is published.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use warren_worker::{Missed, Schedule, Service, Worker};
    /// # async fn demo(svc: Service) -> Result<(), warren_worker::WorkerError> {
    /// let worker = Worker::builder()
    ///     .service(svc)
    ///     .schedule("nightly-report", Schedule::cron("0 30 2 * * *").tz("Europe/Paris"),
    ///               "reports.build", &"daily")
    ///     .schedule("heartbeat", Schedule::every(Duration::from_secs(10)).missed(Missed::RunOnce),
    ///               "ops.ping", &())
    ///     .build()
    ///     .await?;
    /// # let _ = worker; Ok(()) }
    /// ```
    pub fn schedule(
        mut self,
        name: &str,
        schedule: crate::Schedule,
        target: impl warren_core::IntoTarget,
        payload: &impl serde::Serialize,
    ) -> Self {
        self.schedules
            .push(crate::schedule::register(name, &schedule, target, payload));
        self
    }

    /// Connects (one connection to consume, one to publish, one for schedules if any), declares every service's
    /// queues and subscribes. Fails fast when the broker refuses a declaration (a service
    /// queue that exists with another queue type, say).
    pub async fn build(mut self) -> Result<Worker, WorkerError> {
        // Everything that can be wrong with the registrations is reported before connecting.
        if self.services.is_empty() && self.schedules.is_empty() {
            return Err(WorkerError::NoServices);
        }
        let mut names = std::collections::HashSet::new();
        let mut errors = Vec::new();
        for s in &mut self.services {
            errors.append(&mut s.errors);
            if !names.insert(s.name.clone()) {
                errors.push(WorkerError::Duplicate(format!("service {}", s.name)));
            }
            for (topic, method) in &s.subscriptions {
                if !s.methods.contains_key(method) {
                    errors.push(WorkerError::UnknownMethod(
                        format!("{}.{method}", s.name),
                        topic.clone(),
                    ));
                }
            }
            for m in s.method_retry.keys() {
                if !s.methods.contains_key(m) {
                    errors.push(WorkerError::UnknownRetryMethod(format!("{}.{m}", s.name)));
                }
            }
            for m in s.limits.rates.keys().chain(s.limits.keyed.keys()) {
                if !s.methods.contains_key(m) {
                    errors.push(WorkerError::UnknownFlowMethod(format!("{}.{m}", s.name)));
                }
            }
            for m in s.time_limits.keys() {
                if !s.methods.contains_key(m) {
                    errors.push(WorkerError::UnknownTimeLimitMethod(format!(
                        "{}.{m}",
                        s.name
                    )));
                }
            }
        }
        let mut schedules: Vec<crate::schedule::Registered> = Vec::new();
        for s in std::mem::take(&mut self.schedules) {
            match s {
                Ok(s) if schedules.iter().any(|o| o.name == s.name) => {
                    errors.push(warren_core::schedule::ScheduleError::Duplicate(s.name).into());
                }
                Ok(s) => schedules.push(s),
                Err(e) => errors.push(e),
            }
        }
        let state = match std::mem::take(&mut self.state).build() {
            Ok(state) => state,
            Err(name) => {
                errors.push(WorkerError::DuplicateState(name));
                crate::state::State::default()
            }
        };
        match errors.len() {
            0 => {}
            1 => return Err(errors.remove(0)),
            _ => return Err(WorkerError::Registration(errors)),
        }
        tracing::debug!(types = ?state.type_names(), "shared state");
        // Before any metric handle is taken, so they are bound to this recorder.
        let metrics_server = match self.metrics_listen {
            Some(addr) => Some(crate::Prometheus::install()?.serve(addr).await?),
            None => None,
        };
        let metrics = crate::metrics::Registry::new(self.services.iter().map(|s| {
            (
                s.name.as_str(),
                s.methods.keys().map(String::as_str).collect::<Vec<_>>(),
            )
        }));
        let mut amqp = match self.amqp.take() {
            Some(c) => c,
            None => AmqpConfig::from_env()?,
        };
        // A service's priority range: the worker's own sender declares its queue too.
        for s in &self.services {
            let Some(max) = s.max_priority else { continue };
            if amqp.queue_type == warren_core::QueueType::Quorum {
                return Err(warren_core::Error::PrioritiesNeedClassic {
                    svc: s.name.clone(),
                }
                .into());
            }
            match amqp.max_priority(&s.name) {
                Some(config) if config != max => {
                    return Err(WorkerError::PriorityMismatch {
                        svc: s.name.clone(),
                        service: max,
                        config,
                    })
                }
                _ => amqp = amqp.with_priorities(&s.name, max)?,
            }
        }
        let consume =
            Broker::connect(amqp.clone().with_connection_name("warren worker (consume)")).await?;
        let publish =
            Broker::connect(amqp.clone().with_connection_name("warren worker (publish)")).await?;
        // Schedule leases live on their own connection: it is what the broker watches.
        let schedule_broker = if schedules.is_empty() {
            None
        } else {
            Some(
                Broker::connect(
                    amqp.clone()
                        .with_connection_name("warren worker (schedules)"),
                )
                .await?,
            )
        };
        let tickers = crate::schedule::Tickers::new(schedules, schedule_broker);
        // The worker's own cancel queue, bound before any task is consumed.
        let cancel_sub = crate::cancel::subscribe(consume.clone(), uuid::Uuid::now_v7()).await?;
        let mut client = ClientBuilder::default();
        if let Some(store) = &self.store {
            client = client.status_store(store.clone());
        }
        let client = client.with_broker(publish.clone());
        let recorder = self.store.map(Recorder::new);
        let prefetch = self.prefetch.unwrap_or_else(|| {
            u16::try_from(self.concurrency.saturating_mul(2)).unwrap_or(u16::MAX)
        });
        let mut services = HashMap::new();
        let mut subs = Vec::new();
        for s in self.services {
            let spec = SubscriptionSpec {
                queue: QueueSpec::service_with_priorities(
                    &s.name,
                    amqp.queue_type,
                    amqp.max_priority(&s.name),
                )?,
                also_declare: vec![QueueSpec::dead(&s.name, amqp.queue_type)?],
                prefetch,
                no_ack: false,
                max_pause: SubscriptionSpec::PAUSE,
            };
            let route = Route {
                svc: s.name.clone(),
                queue: spec.queue.name.clone(),
                method: None,
            };
            subs.push((
                Arc::new(route),
                Subscription::start(consume.clone(), spec).await?,
            ));
            for (topic, method) in &s.subscriptions {
                let spec = SubscriptionSpec {
                    queue: QueueSpec::subscription(topic, &s.name, method, amqp.queue_type)?,
                    also_declare: vec![QueueSpec::recent(topic)?],
                    prefetch,
                    no_ack: false,
                    max_pause: SubscriptionSpec::PAUSE,
                };
                let route = Route {
                    svc: s.name.clone(),
                    queue: spec.queue.name.clone(),
                    method: Some(method.clone()),
                };
                tracing::debug!(queue = %route.queue, "subscribing");
                subs.push((
                    Arc::new(route),
                    Subscription::start(consume.clone(), spec).await?,
                ));
            }
            let splitters = s
                .methods
                .keys()
                .filter_map(|m| {
                    let splitter = s.methods.get(&crate::split::splitter_name(m))?;
                    Some((m.clone(), splitter.clone()))
                })
                .collect();
            services.insert(
                s.name.clone(),
                HostedService {
                    methods: s.methods.into_iter().collect(),
                    splitters,
                    retry: s.retry.unwrap_or_else(|| self.retry.clone()),
                    method_retry: s.method_retry,
                    time_limits: s.time_limits,
                    limits: s.limits,
                },
            );
        }
        let mover = DelayMover::new(consume.clone(), client.sender().clone());
        // Flow control defers through the delay levels: declared now, not at the first
        // deferral.
        if services
            .values()
            .any(|s| !s.limits.rates.is_empty() || !s.limits.keyed.is_empty())
        {
            client.sender().ensure_delay_levels().await?;
        }
        Ok(Worker {
            shared: Arc::new(Shared {
                services,
                sender: client.sender().clone(),
                client,
                broker: publish,
                recorder,
                joins: self.joins,
                checking: std::sync::Mutex::default(),
                requeues: crate::process::Requeues::default(),
                state,
                metrics,
                ack_early_after: ack_early_after(self.consumer_timeout),
                early: crate::early::EarlyAcks::default(),
                flow: crate::flow::Flow {
                    store: self
                        .flow_store
                        .unwrap_or_else(|| Arc::new(warren_core::flow::LocalFlow::new())),
                    lease: self.key_lease,
                },
                cancels: crate::cancel::Cancels::default(),
                cancel_grace: self.cancel_grace,
            }),
            cancel_sub,
            consume,
            subs,
            concurrency: self.concurrency,
            drain_timeout: self.drain_timeout,
            metrics_server,
            tickers,
            mover,
        })
    }
}

/// A running set of services. Build with [`Worker::builder`], then [`Worker::run_until`].
pub struct Worker {
    shared: Arc<Shared>,
    consume: Broker,
    subs: Vec<(Arc<Route>, Subscription)>,
    concurrency: usize,
    drain_timeout: Duration,
    metrics_server: Option<crate::MetricsServer>,
    tickers: crate::schedule::Tickers,
    /// Moves due delayed messages into their service queues (warren_core::delay).
    mover: DelayMover,
    /// The worker's cancel queue (exclusive: deleted with the consuming connection).
    cancel_sub: Subscription,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field(
                "services",
                &self.subs.iter().map(|(s, _)| s).collect::<Vec<_>>(),
            )
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A builder with default settings.
    pub fn builder() -> WorkerBuilder {
        WorkerBuilder::default()
    }

    /// Every durable queue this worker declared or will declare by a name known up front:
    /// each service's queue and dead-letter queue, its subscription queues and its
    /// done-marker queue. (Delay queues and part queues are per delay step and per job;
    /// they expire by themselves.) For tools and tests that clean up after a worker, such
    /// as [`warren::testing`](../warren/testing/index.html).
    #[must_use]
    pub fn queue_names(&self) -> Vec<String> {
        let window =
            u64::try_from(self.shared.joins.completion_window.as_millis()).unwrap_or(u64::MAX);
        let mut names: Vec<String> = self.subs.iter().map(|(r, _)| r.queue.clone()).collect();
        for svc in self.shared.services.keys() {
            names.extend(warren_core::topology::dead_queue(svc).ok());
            names.extend(QueueSpec::done_markers(svc, window).ok().map(|q| q.name));
        }
        names.extend(self.tickers.queue_names());
        names.sort();
        names.dedup();
        names
    }

    /// The name of this worker's cancel queue (`warren.cancel.<worker id>`: exclusive to its
    /// consuming connection, so the broker deletes it when the worker stops or dies).
    #[must_use]
    pub fn cancel_queue(&self) -> &str {
        self.cancel_sub.queue()
    }

    /// The schedules whose lease this worker holds (it fires their ticks), updated as
    /// leases are taken and given up while the worker runs. Take it before
    /// [`Worker::run_until`].
    #[must_use]
    pub fn schedule_leases(
        &self,
    ) -> tokio::sync::watch::Receiver<std::collections::BTreeSet<String>> {
        self.tickers.leases()
    }

    /// The address `/metrics` is served on, with [`WorkerBuilder::metrics_listen`].
    #[must_use]
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_server
            .as_ref()
            .map(crate::MetricsServer::local_addr)
    }

    /// A client sharing the worker's publishing connection.
    #[must_use]
    pub fn client(&self) -> Client {
        self.shared.client.clone()
    }

    /// Runs until `shutdown` completes, then drains: stops taking deliveries, waits up to
    /// the drain timeout for running handlers (their outcomes are published and acked), and
    /// closes the channels so deliveries never started return to their queues.
    ///
    /// Returns `Err` only if consuming fails in a way retrying cannot fix; connection losses
    /// are handled inside (the worker reconnects and resumes by itself).
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
        let Worker {
            shared,
            consume,
            subs,
            concurrency,
            drain_timeout,
            metrics_server,
            tickers,
            mover,
            cancel_sub,
        } = self;
        let permits = Arc::new(Semaphore::new(concurrency));
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let mut pumps = JoinSet::new();
        for (svc, sub) in subs {
            pumps.spawn(pump(
                svc,
                sub,
                permits.clone(),
                tracker.clone(),
                shared.clone(),
                stop.clone(),
            ));
        }
        let mut ticking = tickers.start(&stop);
        let moving = tokio::spawn(mover.run(stop.clone()));
        let advertising = tokio::spawn(advertise(shared.clone(), stop.clone()));
        // Cancellations are heard until the drain ends (handlers still running hear them).
        let stop_hearing = CancellationToken::new();
        let hearing = tokio::spawn(crate::cancel::listen(
            shared.clone(),
            cancel_sub,
            stop_hearing.clone(),
        ));
        tracing::info!(concurrency, "worker running");
        tokio::pin!(shutdown);
        let mut result = Ok(());
        let mut stopped = Vec::new();
        tokio::select! {
            () = &mut shutdown => tracing::info!("shutdown requested; draining"),
            Some(done) = pumps.join_next() => {
                if let Ok((sub, r)) = done {
                    if let Err(e) = r {
                        tracing::error!(error = %e, queue = sub.queue(), "consumer failed; stopping the worker");
                        result = Err(WorkerError::Broker(e));
                    }
                    stopped.push(sub);
                }
            }
        }
        stop.cancel();
        // Tickers give their leases up at once, so another worker takes over.
        while ticking.join_next().await.is_some() {}
        tickers.close().await;
        if let Err(e) = moving.await {
            tracing::warn!(error = %e, "the delay mover ended abnormally");
        }
        let _ = advertising.await;
        while let Some(done) = pumps.join_next().await {
            if let Ok((sub, _)) = done {
                stopped.push(sub);
            }
        }
        for sub in &mut stopped {
            sub.stop_consuming().await;
        }
        tracker.close();
        if tokio::time::timeout(drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = tracker.len(),
                "drain timeout: abandoning running tasks (they will be redelivered)"
            );
            // Tasks acked early are no longer the broker's: publish them again.
            if shared.early.len() > 0 {
                let n = shared.early.republish_all(shared.sender.publisher()).await;
                tracing::warn!(
                    republished = n,
                    "abandoned tasks acked early were published again"
                );
            }
        }
        for sub in stopped {
            sub.close().await;
        }
        stop_hearing.cancel();
        if let Ok(sub) = hearing.await {
            sub.close().await;
        }
        shared.client.close().await;
        consume.close().await;
        // The endpoint answers until the worker has stopped.
        drop(metrics_server);
        tracing::info!("worker stopped");
        result
    }
}

async fn pump(
    svc: Arc<Route>,
    sub: Subscription,
    permits: Arc<Semaphore>,
    tracker: TaskTracker,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> (Subscription, Result<(), warren_core::Error>) {
    // Deliveries are taken from the consumer as they arrive, stamped with their arrival
    // (when the broker's consumer timeout starts counting). The forwarder starts one at once
    // when a slot is free and none waits here; the others wait here for a permit.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let forwarding = stop.child_token();
    let starter = Starter {
        svc: svc.clone(),
        shared: shared.clone(),
        tracker: tracker.clone(),
        permits: permits.clone(),
        queued: Arc::new(AtomicUsize::new(0)),
    };
    let queued = starter.queued.clone();
    let forwarder = tokio::spawn(forward(sub, tx, starter, forwarding.clone()));
    while let Some((event, arrived)) = rx.recv().await {
        // Counted by the forwarder before it sent the event: while any waits here, the
        // forwarder does not start deliveries past it.
        let _queued = Dequeued(&queued);
        match event {
            ConsumerEvent::Delivery(d) => {
                // The permit is taken once a delivery is here, not before waiting for one:
                // an idle queue must not hold a permit the worker's other queues need. The
                // deliveries waiting for a permit are at most the prefetch.
                // On shutdown a waiting delivery is dropped unacked: the broker redelivers it.
                // One that waits until the broker's consumer timeout nears is requeued (it
                // never started), so the timeout never closes the channel.
                if stop.is_cancelled() {
                    break;
                }
                let too_late = shared.ack_early_after.and_then(|a| arrived.checked_add(a));
                // A free slot is taken at once, without arming the timer below.
                let free = permits.clone().try_acquire_owned().ok();
                let permit = if let Some(p) = free {
                    p
                } else {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                        () = sleep_until(too_late) => {
                            tracing::info!(queue = %svc.queue, "a delivery waited for a free slot until the consumer timeout neared; requeued");
                            if !matches!(d.reject(true).await, Ok(true)) {
                                tracing::warn!("requeue not delivered; the broker will redeliver when the channel closes");
                            }
                            continue;
                        }
                    }
                };
                start(&tracker, &shared, &svc, d, arrived, permit);
            }
            ConsumerEvent::Resubscribed => {
                tracing::info!(queue = %svc.queue, "consuming again after a reconnect");
            }
        }
    }
    drop(rx);
    forwarding.cancel();
    match forwarder.await {
        Ok(done) => done,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Sleeps until `at`, or forever when `None`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs a delivery's handler task, holding its permit until it ends.
fn start(
    tracker: &TaskTracker,
    shared: &Arc<Shared>,
    svc: &Arc<Route>,
    d: Incoming,
    arrived: tokio::time::Instant,
    permit: OwnedSemaphorePermit,
) {
    let (shared, svc) = (shared.clone(), svc.clone());
    tracker.spawn(async move {
        handle(shared, svc, d, arrived).await;
        drop(permit);
    });
}

/// What the forwarder needs to start a delivery itself, and the count of events waiting in
/// the pump.
struct Starter {
    svc: Arc<Route>,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    permits: Arc<Semaphore>,
    queued: Arc<AtomicUsize>,
}

/// Uncounts an event the pump took (whatever the pump then does with it).
struct Dequeued<'a>(&'a AtomicUsize);

impl Drop for Dequeued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Takes every event from `sub` as it comes, with the instant it came, until `stop` (or
/// the pump is gone, or consuming fails for good); hands the subscription back. A delivery
/// that finds a free slot while none waits in the pump is started here (one task hop less
/// per delivery); every other event goes to the pump, in order.
async fn forward(
    mut sub: Subscription,
    tx: tokio::sync::mpsc::UnboundedSender<(ConsumerEvent, tokio::time::Instant)>,
    starter: Starter,
    stop: CancellationToken,
) -> (Subscription, Result<(), warren_core::Error>) {
    loop {
        // The event first: one that is ready is taken without registering with `stop`.
        if stop.is_cancelled() {
            break;
        }
        let event = tokio::select! {
            biased;
            ev = sub.next() => ev,
            () = stop.cancelled() => break,
        };
        match event {
            Ok(Some(ev)) => {
                let now = tokio::time::Instant::now();
                let ev = match ev {
                    // On shutdown a delivery is dropped unacked: the broker redelivers it.
                    ConsumerEvent::Delivery(_) if stop.is_cancelled() => break,
                    ConsumerEvent::Delivery(d) if starter.queued.load(Ordering::Acquire) == 0 => {
                        match starter.permits.clone().try_acquire_owned() {
                            Ok(permit) => {
                                let s = &starter;
                                start(&s.tracker, &s.shared, &s.svc, d, now, permit);
                                continue;
                            }
                            Err(_) => ConsumerEvent::Delivery(d),
                        }
                    }
                    other => other,
                };
                starter.queued.fetch_add(1, Ordering::AcqRel);
                if tx.send((ev, now)).is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => return (sub, Err(e)),
        }
    }
    (sub, Ok(()))
}

/// With a status store, advertises the worker's methods per service (for the web admin's
/// service page, which otherwise knows only methods that failed): at start, then every
/// third of [`ADVERTISE_TTL`] until `stop`. Best effort, like every status write.
async fn advertise(shared: Arc<Shared>, stop: CancellationToken) {
    let Some(recorder) = shared.recorder.as_ref() else {
        return;
    };
    let mut hosted: Vec<(&String, Vec<String>)> = shared
        .services
        .iter()
        .map(|(svc, s)| {
            let mut methods: Vec<String> = s.methods.keys().cloned().collect();
            methods.sort();
            (svc, methods)
        })
        .collect();
    hosted.sort();
    let mut every = tokio::time::interval(ADVERTISE_TTL / 3);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        for (svc, methods) in &hosted {
            recorder.advertise(svc, methods, ADVERTISE_TTL).await;
        }
    }
}
