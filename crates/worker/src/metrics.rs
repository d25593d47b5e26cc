//! The worker's metrics: per service and method handles resolved once at `build()`, so a
//! delivery costs a few atomic operations and no allocation; and warren's own Prometheus
//! recorder with a small `/metrics` HTTP endpoint ([`Prometheus`],
//! `WorkerBuilder::metrics_listen`).
//!
//! The names and labels are in [`warren_core::metrics`]. Handles are bound to the recorder
//! installed when the worker is built: an application that installs its own recorder does
//! so before `WorkerBuilder::build`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Label};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use warren_core::envelope::now_ms;
use warren_core::metrics as names;
use warren_core::{Envelope, FailureKind};

/// The metric handles of one hosted `service.method` (or of its service's
/// [`names::OTHER_METHOD`]).
pub(crate) struct MethodMetrics {
    svc: String,
    method: String,
    received: Counter,
    succeeded: Counter,
    retried: Counter,
    requeued: Counter,
    parts: Counter,
    replies_dropped: Counter,
    duration: Histogram,
    wait: Histogram,
    in_flight: Gauge,
}

impl MethodMetrics {
    fn new(svc: &str, method: &str) -> Self {
        let labels = vec![
            Label::new(names::L_SERVICE, svc.to_owned()),
            Label::new(names::L_METHOD, method.to_owned()),
        ];
        Self {
            svc: svc.to_owned(),
            method: method.to_owned(),
            received: metrics::counter!(names::TASKS_RECEIVED, labels.clone()),
            succeeded: metrics::counter!(names::TASKS_SUCCEEDED, labels.clone()),
            retried: metrics::counter!(names::TASKS_RETRIED, labels.clone()),
            requeued: metrics::counter!(names::TASKS_REQUEUED, labels.clone()),
            parts: metrics::counter!(names::PARTS_RECEIVED, labels.clone()),
            replies_dropped: metrics::counter!(names::REPLIES_DROPPED, labels.clone()),
            duration: metrics::histogram!(names::TASK_DURATION, labels.clone()),
            wait: metrics::histogram!(names::TASK_QUEUE_WAIT, labels.clone()),
            in_flight: metrics::gauge!(names::TASKS_IN_FLIGHT, labels),
        }
    }

    /// A delivery of a task arrived (a part too, when `part`); its queue wait is recorded
    /// for a first attempt. The returned guard counts it in flight until dropped.
    pub(crate) fn received(&self, env: Option<&Envelope>, part: bool) -> InFlight<'_> {
        self.received.increment(1);
        if part {
            self.parts.increment(1);
        }
        if let Some(env) = env.filter(|e| e.attempt == 1 && e.created_ms > 0) {
            let waited_ms = now_ms().saturating_sub(env.created_ms);
            #[allow(clippy::cast_precision_loss)] // ms below 2^52: exact
            self.wait.record(waited_ms as f64 / 1000.0);
        }
        self.in_flight.increment(1.0);
        InFlight(&self.in_flight)
    }

    /// The handler (and payload decoding) took `took`.
    pub(crate) fn ran(&self, took: Duration) {
        self.duration.record(took.as_secs_f64());
    }

    /// The task's outcome was published and the delivery settled.
    pub(crate) fn settled(&self, outcome: Outcome, settled: Settled) {
        match (settled, outcome) {
            (Settled::Requeued, _) => self.requeued.increment(1),
            (Settled::DeadLettered(kind), _) => self.failed(kind),
            (Settled::Acked, Outcome::Succeeded) => self.succeeded.increment(1),
            (Settled::Acked, Outcome::Retried) => self.retried.increment(1),
            (Settled::Acked, Outcome::Failed(kind)) => self.failed(kind),
        }
    }

    fn failed(&self, kind: FailureKind) {
        metrics::counter!(
            names::TASKS_FAILED,
            names::L_SERVICE => self.svc.clone(),
            names::L_METHOD => self.method.clone(),
            names::L_KIND => names::kind_label(kind),
        )
        .increment(1);
    }

    /// Flow control deferred a task (docs/flow.md) and its delivery was settled so.
    pub(crate) fn deferred(&self, reason: crate::flow::Reason, settled: Settled) {
        match settled {
            Settled::Acked => {}
            Settled::Requeued => return self.requeued.increment(1),
            Settled::DeadLettered(kind) => return self.failed(kind),
        }
        metrics::counter!(
            names::TASKS_DEFERRED,
            names::L_SERVICE => self.svc.clone(),
            names::L_METHOD => self.method.clone(),
            names::L_REASON => reason.as_str(),
        )
        .increment(1);
    }

    /// An answer was dropped: the caller's reply queue was gone.
    pub(crate) fn reply_dropped(&self) {
        self.replies_dropped.increment(1);
    }

    /// A dead letter was published.
    pub(crate) fn dead_lettered(&self, kind: FailureKind) {
        metrics::counter!(
            names::TASKS_DEAD_LETTERED,
            names::L_SERVICE => self.svc.clone(),
            names::L_METHOD => self.method.clone(),
            names::L_KIND => names::kind_label(kind),
        )
        .increment(1);
    }
}

/// A task counted in [`names::TASKS_IN_FLIGHT`] until dropped.
pub(crate) struct InFlight<'a>(&'a Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// What a task's run decided, for the counters (recorded once its delivery is settled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Done (a result, a chain step, a split).
    Succeeded,
    /// Another attempt is published.
    Retried,
    /// Failed for good.
    Failed(FailureKind),
}

/// How a delivery was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Acked after its outcome was published.
    Acked,
    /// Requeued (its outcome could not be published yet).
    Requeued,
    /// Dead-lettered because its outcome cannot be published.
    DeadLettered(FailureKind),
}

/// Every hosted method's handles, looked up by the delivery's queue service and method.
pub(crate) struct Registry {
    services: HashMap<String, (HashMap<String, MethodMetrics>, MethodMetrics)>,
    fallback: MethodMetrics,
}

impl Registry {
    /// Handles for every `service.method` (and each service's [`names::OTHER_METHOD`]).
    pub(crate) fn new<'a>(hosted: impl IntoIterator<Item = (&'a str, Vec<&'a str>)>) -> Self {
        let services = hosted
            .into_iter()
            .map(|(svc, methods)| {
                let by_method = methods
                    .into_iter()
                    .map(|m| (m.to_owned(), MethodMetrics::new(svc, m)))
                    .collect();
                (
                    svc.to_owned(),
                    (by_method, MethodMetrics::new(svc, names::OTHER_METHOD)),
                )
            })
            .collect();
        Self {
            services,
            fallback: MethodMetrics::new(names::OTHER_METHOD, names::OTHER_METHOD),
        }
    }

    /// The handles of `method` on the queue of `svc` (its "other" bucket for a method it
    /// does not host, or no method at all).
    pub(crate) fn of(&self, svc: &str, method: Option<&str>) -> &MethodMetrics {
        match self.services.get(svc) {
            Some((methods, other)) => method.and_then(|m| methods.get(m)).unwrap_or(other),
            None => &self.fallback,
        }
    }
}

/// Counts a fired join of a job of service `svc`.
pub(crate) fn join_fired(svc: &str) {
    let (svc, _) = names::target_labels(svc, "");
    metrics::counter!(names::JOINS_FIRED, names::L_SERVICE => svc).increment(1);
}

/// Why warren's Prometheus recorder could not be installed or served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// The process already has a global metrics recorder that warren did not install (the
    /// application's own): serve that one instead of `metrics_listen`.
    #[error("another metrics recorder is already installed in this process; serve its metrics yourself instead of WorkerBuilder::metrics_listen")]
    RecorderInstalled,
    /// The Prometheus recorder could not be built.
    #[error("cannot build the Prometheus recorder: {0}")]
    Build(String),
    /// The `/metrics` address could not be bound.
    #[error("cannot listen for /metrics on {addr}: {source}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed.
        #[source]
        source: std::io::Error,
    },
}

/// warren's Prometheus recorder: the process's global `metrics` recorder, installed once
/// (every [`Prometheus::install`] after the first returns the same one), with histogram
/// buckets from 1 ms to 5 min for warren's histograms ([`names::BUCKETS`]).
///
/// ```no_run
/// # async fn demo() -> Result<(), warren_worker::MetricsError> {
/// let prometheus = warren_worker::Prometheus::install()?;
/// let server = prometheus.serve("127.0.0.1:9464".parse().expect("an address")).await?;
/// println!("scrape http://{}/metrics", server.local_addr());
/// println!("{}", prometheus.render()); // the same text, in process
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Prometheus {
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Prometheus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prometheus").finish_non_exhaustive()
    }
}

static INSTALLED: OnceLock<Prometheus> = OnceLock::new();
static INSTALLING: Mutex<()> = Mutex::new(());

impl Prometheus {
    /// Installs warren's Prometheus recorder as the global recorder, or returns it when
    /// this process installed it before. [`MetricsError::RecorderInstalled`] when another
    /// recorder is installed.
    pub fn install() -> Result<Self, MetricsError> {
        if let Some(p) = INSTALLED.get() {
            return Ok(p.clone());
        }
        let _guard = INSTALLING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(p) = INSTALLED.get() {
            return Ok(p.clone());
        }
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Prefix("warren_".into()), names::BUCKETS)
            .map_err(|e| MetricsError::Build(e.to_string()))?
            .build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).map_err(|_| MetricsError::RecorderInstalled)?;
        names::describe();
        // Without an exporter task, histograms are drained by render() and by this upkeep
        // (so a process nobody scrapes does not grow).
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("warren-metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histograms are drained at each scrape only");
        }
        Ok(INSTALLED.get_or_init(|| Self { handle }).clone())
    }

    /// The current metrics in the Prometheus text format (what `/metrics` answers).
    #[must_use]
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Serves [`Prometheus::render`] over HTTP at `addr` (`GET /metrics`; any other path
    /// is 404), until the returned server is dropped. Port 0 picks a free port
    /// ([`MetricsServer::local_addr`]).
    pub async fn serve(&self, addr: SocketAddr) -> Result<MetricsServer, MetricsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Listen { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| MetricsError::Listen { addr, source })?;
        let this = self.clone();
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let this = this.clone();
                        tokio::spawn(async move {
                            if let Err(e) = this.answer(stream).await {
                                tracing::debug!(error = %e, "metrics request failed");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tracing::info!(addr = %local, "serving metrics at /metrics");
        Ok(MetricsServer { addr: local, task })
    }

    /// Answers one HTTP/1 request and closes the connection.
    async fn answer(&self, mut stream: TcpStream) -> std::io::Result<()> {
        let mut head = Vec::with_capacity(512);
        let mut buf = [0u8; 1024];
        let read = async {
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            Ok::<_, std::io::Error>(())
        };
        if tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .is_err()
        {
            return Ok(());
        }
        let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut words = line.split_whitespace();
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let path = path.split('?').next().unwrap_or("");
        let (status, kind, body) = match (method, path) {
            ("GET" | "HEAD", "/metrics") => (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                self.render(),
            ),
            ("GET" | "HEAD", _) => (
                "404 Not Found",
                "text/plain",
                "not found: see /metrics\n".into(),
            ),
            _ => (
                "405 Method Not Allowed",
                "text/plain",
                "GET /metrics\n".into(),
            ),
        };
        let mut out = format!(
            "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        if method != "HEAD" {
            out.extend_from_slice(body.as_bytes());
        }
        stream.write_all(&out).await?;
        stream.shutdown().await
    }
}

/// A running `/metrics` endpoint ([`Prometheus::serve`]); it stops when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// The address it listens on.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
