//! `warren bench`: the same workloads through raw lapin and through warren, against the same
//! broker, in one process and one run, one line per figure: `name value unit ratio_to_raw`.
//!
//! An unpublished crate of its own, so that the `warren` command needs warren-worker, raw
//! lapin and redis only for this: warren-cli reaches it through its `bench` feature (on by
//! default). The command line hands over its options ([`BenchArgs`]) and how it connects
//! ([`Host`]) to [`run`]; the worker process the bench starts is the same executable run as
//! `warren bench-worker` ([`BenchWorkerArgs`], [`run_worker`]).
//!
//! # Adding a group
//! A group is a [`Group`] in [`GROUPS`]: a name for `--only`, a one-line description, and an
//! async function that runs both sides of its workload and returns its [`Figure`]s. Name
//! queues and services through [`Bench::raw_queue`] and [`Bench::service`] (unique per run,
//! deleted at the end, also on error or Ctrl-C) and start in-process workers with
//! [`Bench::start_worker`] (stopped before the queues are deleted).
//!
//! # Rounds
//! `noop`, `drain`, `invoke` and `jobs` run [`BenchArgs::rounds`] rounds (default 3), raw then
//! warren in each, and report the round whose ratio is the median ([`Bench::median_rounds`];
//! `jobs` keeps both sides set up across its rounds); every round is printed as a `#` note.
//! The other groups run once.
//!
//! # Layout
//! - `noop`: `noop_throughput` and `worker_rss_peak`.
//! - `invoke`: `invoke_seq_p50`, `invoke_seq_p99`, `invoke_c64_throughput`, `invoke_c64_p99`.
//! - `split`: `split1000_ms`, `fanin100_ms` (split jobs, enqueue to oncomplete).
//! - `fanout`: `fanout100_ms` (a fan-out/fan-in of 100 targets, `parallel()` to the final
//!   callback, beside the same raw floor as `fanin100_ms`).
//! - `retry`: `retry_overhead_ms` (an invoke that fails twice with zero-delay retries, minus
//!   a plain invoke; raw: two extra confirmed publish + consume round trips).
//! - `pubsub`: `pubsub_2sub_throughput` (publish to a topic with two subscribers, first
//!   publish to the last delivery handled by both; raw: a fanout exchange bound to two
//!   queues), `status_p50`, `status_p99` (`Client::status` with a Redis store; raw: bare
//!   Redis `GET`s; skipped when Redis is unreachable).
//! - `chain`: `chain10_ms` (a chain of 10 no-op steps, enqueue to result; raw: 10 sequential
//!   RPCs), `chains_cap64_throughput` (1,000 chains of 2 steps, 64 in flight; raw: 1,000
//!   pairs of sequential RPCs, 64 pairs in flight).
//! - `jobs`: `jobs10_throughput` (1,000 split jobs of 10 no-op parts, 64 in flight,
//!   enqueue to hook; raw: per job a queue declare, 10 parts, 10 results into the job's
//!   queue, a hook and a queue delete), `jobs_queues_left` (per-job queues still on the
//!   broker once the joins' completion window has passed; should be 0).
//! - `drain`: `noop_drain_throughput` (20,000 no-op tasks queued before the worker starts,
//!   tasks/s from the first completion to the last; raw: a consumer with the same prefetch
//!   draining as many pre-published persistent messages).
//! - `time`: `eta_lateness_p99` (1,000 tasks due at instants spread over 30 s, sent up
//!   front with `Task::at`: p99 of handler start − due, ms), `eta_throughput` (delayed
//!   enqueues/s through the delay levels; its ratio is to plain enqueue in the same run).
//! - `raw`: the raw-lapin building blocks the groups share (connections, declares, confirmed
//!   publishes, acking consumers).
//! - `stats`: percentiles, medians, rates.
//! - `procfs`: CPU time and peak memory from `/proc`.
//! - `worker_proc`: the worker process the bench starts (`warren bench-worker`) and how its
//!   peak memory is read.

mod chain;
mod drain;
mod fanout;
mod flow;
mod invoke;
mod jobs;
mod noop;
mod procfs;
mod pubsub;
mod raw;
mod retry;
mod split;
mod stats;
mod time;
mod worker_proc;

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use clap::builder::{PossibleValue, PossibleValuesParser};
use clap::Args;
use serde::Serialize;
use tokio::sync::{oneshot, watch};
use warren_client::{Client, ClientBuilder};
use warren_core::topology::{dead_queue, service_queue};
use warren_core::{AmqpConfig, Broker, QueueType};
use warren_worker::Worker;

pub use worker_proc::{run as run_worker, BenchWorkerArgs};

/// warren's configuration for a connection of the given name.
pub type AmqpFor = Arc<dyn Fn(&str) -> anyhow::Result<AmqpConfig> + Send + Sync>;

/// How the bench reaches the broker: the connection options of the command line it runs in.
#[derive(Clone)]
pub struct Host {
    /// The broker URL list as given, with secrets: for connections and, through the
    /// environment, for the worker process; never printed.
    pub urls: String,
    /// The queue type raw lapin and warren both declare.
    pub queue_type: QueueType,
    /// How long a connection may take (handed on to the worker process).
    pub connect_timeout: Duration,
    /// warren's configuration for a connection of this name, by the command line's rules
    /// (TLS settings, reconnect policy, the queue type above).
    pub amqp: AmqpFor,
    /// An error and its causes on one line, as the command line prints them.
    pub describe: fn(&anyhow::Error) -> String,
}

impl Host {
    /// Each URL of the list on its own (with secrets).
    fn each_url(&self) -> impl Iterator<Item = &str> {
        self.urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
    }
}

/// A figure of the bench: warren's value and, when raw lapin has a counterpart, raw's.
#[derive(Debug, Clone)]
pub struct Figure {
    /// `noop_throughput`, ...
    pub name: &'static str,
    /// warren's value.
    pub value: f64,
    /// `tasks/s`, `us`, `MiB`, ...
    pub unit: &'static str,
    /// raw lapin's value for the same workload, if there is one.
    pub raw: Option<f64>,
    /// Decimals to print.
    pub decimals: usize,
}

impl Figure {
    /// warren's value divided by raw's (above 1 is better for throughputs, worse for
    /// latencies and sizes).
    pub fn ratio(&self) -> Option<f64> {
        self.raw.filter(|r| *r > 0.0).map(|r| self.value / r)
    }

    fn line(&self) -> String {
        let ratio = self
            .ratio()
            .map_or_else(|| String::from("-"), |r| format!("{r:.2}"));
        format!(
            "{:<22} {:>10.*} {:<8} {ratio}",
            self.name, self.decimals, self.value, self.unit
        )
    }
}

#[derive(Serialize)]
struct JsonFigure {
    name: &'static str,
    value: f64,
    unit: &'static str,
    ratio: Option<f64>,
    raw: Option<f64>,
}

fn round(v: f64, decimals: usize) -> f64 {
    let scale = 10f64.powi(i32::try_from(decimals).unwrap_or(0));
    (v * scale).round() / scale
}

/// The future a group's run function returns.
pub type GroupRun<'a> = Pin<Box<dyn Future<Output = anyhow::Result<Vec<Figure>>> + Send + 'a>>;

/// A bench group: one workload, run through raw lapin and through warren.
pub struct Group {
    /// The name `--only` takes.
    pub name: &'static str,
    /// What it measures (shown in `--help`).
    pub about: &'static str,
    /// Runs it.
    pub run: for<'a> fn(&'a Bench) -> GroupRun<'a>,
}

/// How long one group (one round of it, see [`BenchArgs::rounds`]) may run before it counts
/// as failed.
const GROUP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

/// Every group, in the order they run.
pub const GROUPS: &[Group] = &[
    noop::GROUP,
    drain::GROUP,
    invoke::GROUP,
    split::GROUP,
    fanout::GROUP,
    retry::GROUP,
    pubsub::GROUP,
    chain::GROUP,
    jobs::GROUP,
    time::GROUP,
    flow::GROUP,
];

fn group_parser() -> PossibleValuesParser {
    PossibleValuesParser::new(
        GROUPS
            .iter()
            .map(|g| PossibleValue::new(g.name).help(g.about)),
    )
}

/// `warren bench` options.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Prints `# ...` comment lines (broker, queue type, counts, raw lapin's \
    own values) and one line per figure: `name value unit ratio_to_raw`, where the ratio is \
    warren's value over raw lapin's for the same workload in the same run (`-` when raw has no \
    counterpart). Build with --release: a debug build measures the compiler, not warren."
)]
pub struct BenchArgs {
    /// Run only these groups (repeatable or comma-separated)
    #[arg(long, value_delimiter = ',', value_parser = group_parser(), value_name = "GROUP")]
    only: Vec<String>,
    /// Print a JSON array of {name, value, unit, ratio, raw} instead of lines
    #[arg(long)]
    json: bool,
    /// Tasks in the no-op throughput runs
    #[arg(long, default_value_t = 50_000, value_name = "N")]
    count: u64,
    /// Enqueues (and raw publishes) in flight at once in the no-op runs
    #[arg(long, default_value_t = 256, value_name = "N")]
    in_flight: usize,
    /// Prefetch of every consumer, raw and warren
    #[arg(long, default_value_t = 200, value_name = "N")]
    prefetch: u16,
    /// Concurrency of the warren workers
    #[arg(long, default_value_t = 100, value_name = "N")]
    concurrency: usize,
    /// Sequential invokes measured (after the warm-up)
    #[arg(long, default_value_t = 2_000, value_name = "N")]
    calls: u64,
    /// Invokes made with 64 in flight
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    c64_calls: u64,
    /// Warm-up invokes before the sequential ones (not measured)
    #[arg(long, default_value_t = 200, value_name = "N")]
    warmup: u64,
    /// Rounds of the noop, drain and invoke groups: raw and warren run back to back in each,
    /// and the figures come from the round whose throughput ratio is the median
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
}

/// What every group gets: options, naming, and the list of things to clean up.
pub struct Bench {
    /// How to reach the broker.
    pub host: Host,
    /// The bench options.
    pub args: BenchArgs,
    /// The queue type raw and warren both use.
    pub queue_type: QueueType,
    /// A short id unique to this run, in every name the run creates.
    pub run_id: String,
    /// The first URL of the list, with its password: for raw lapin connections only.
    raw_url: String,
    queues: Mutex<Vec<String>>,
    workers: Mutex<Vec<watch::Receiver<bool>>>,
}

/// Stops an in-process worker when told to, or when dropped.
pub struct WorkerGuard {
    stop: Option<oneshot::Sender<()>>,
    stopped: watch::Receiver<bool>,
}

impl WorkerGuard {
    /// Stops the worker and waits until it has drained.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.stopped.wait_for(|done| *done))
            .await;
    }
}

impl Bench {
    /// warren's configuration (the run's queue type), with a connection name.
    pub fn amqp(&self, name: &str) -> anyhow::Result<AmqpConfig> {
        (self.host.amqp)(name)
    }

    /// A client builder for a connection of this name (the run's settings).
    pub fn client_builder(&self, name: &str) -> anyhow::Result<ClientBuilder> {
        Ok(Client::builder().amqp(self.amqp(name)?))
    }

    /// A client connected with the run's settings, with a connection name.
    pub async fn client(&self, name: &str) -> anyhow::Result<Client> {
        Ok(self.client_builder(name)?.connect().await?)
    }

    /// The URL raw lapin connects to.
    pub fn raw_url(&self) -> &str {
        &self.raw_url
    }

    /// A queue name for a raw-lapin workload, deleted at the end of the run.
    pub fn raw_queue(&self, what: &str) -> String {
        let q = format!("warren.bench.{}.raw-{what}", self.run_id);
        self.track(q.clone());
        q
    }

    /// A service name for a warren workload; its queues are deleted at the end of the run.
    pub fn service(&self, what: &str) -> anyhow::Result<String> {
        let svc = format!("bench-{}-{what}", self.run_id);
        self.track(service_queue(&svc)?);
        self.track(dead_queue(&svc)?);
        Ok(svc)
    }

    /// Deletes `queue` at the end of the run too (once, however often it is tracked).
    pub fn track(&self, queue: String) {
        if let Ok(mut q) = self.queues.lock() {
            if !q.contains(&queue) {
                q.push(queue);
            }
        }
    }

    /// Runs `raw` and `warren` in turn, [`BenchArgs::rounds`] times, and returns the round
    /// whose ratio (warren's `score` over raw's) is the median, both sides of it. A round's
    /// two sides run back to back, so they meet the same neighbours on a shared machine; the
    /// median drops a round one side of which was slowed by them, or ran unusually fast (a
    /// raw invoke round once ran 45 % above its other two). One round each gave ratios from
    /// 0.63 to 0.92 for the same build on this project's VM. Every round is printed.
    pub async fn median_rounds<T, R, W, RF, WF>(
        &self,
        group: &str,
        mut raw: R,
        mut warren: W,
        score: impl Fn(&T) -> f64,
    ) -> anyhow::Result<(T, T)>
    where
        R: FnMut() -> RF,
        RF: Future<Output = anyhow::Result<T>>,
        W: FnMut() -> WF,
        WF: Future<Output = anyhow::Result<T>>,
    {
        let rounds = self.args.rounds.max(1);
        let mut rounds_run = Vec::new();
        for round in 1..=rounds {
            if rounds > 1 {
                note(format!("{group}: round {round} of {rounds}"));
            }
            let r = raw().await.context("raw lapin side")?;
            let w = warren().await.context("warren side")?;
            note(format!(
                "{group}: round {round}: raw {:.0}, warren {:.0} ({:.2})",
                score(&r),
                score(&w),
                score(&w) / score(&r).max(1e-9)
            ));
            rounds_run.push((score(&w) / score(&r).max(1e-9), r, w));
        }
        stats::median_by(rounds_run, |run| run.0)
            .map(|(_, r, w)| (r, w))
            .ok_or_else(|| anyhow!("{group}: no round ran"))
    }

    /// A worker builder with the bench's settings (URL, queue type, concurrency, prefetch,
    /// a short drain), so every group's warren worker is configured alike.
    pub fn worker_builder(&self, name: &str) -> anyhow::Result<warren_worker::WorkerBuilder> {
        Ok(Worker::builder()
            .amqp(self.amqp(name)?)
            .concurrency(self.args.concurrency)
            .prefetch(self.args.prefetch)
            .drain_timeout(Duration::from_secs(5)))
    }

    /// Builds the worker (declaring its queues) and runs it in the background until the
    /// guard is stopped or dropped.
    pub async fn start_worker(
        &self,
        builder: warren_worker::WorkerBuilder,
    ) -> anyhow::Result<WorkerGuard> {
        Ok(self.spawn_worker(builder.build().await?))
    }

    /// Runs `worker` in the background until the guard is stopped or dropped.
    pub fn spawn_worker(&self, worker: Worker) -> WorkerGuard {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = watch::channel(false);
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop_rx.await;
            };
            if let Err(e) = worker.run_until(shutdown).await {
                tracing::error!(error = %e, "bench worker failed");
            }
            let _ = done_tx.send(true);
        });
        if let Ok(mut w) = self.workers.lock() {
            w.push(done_rx.clone());
        }
        WorkerGuard {
            stop: Some(stop_tx),
            stopped: done_rx,
        }
    }

    /// Waits for in-process workers to stop (so none re-declares a queue), then deletes
    /// every queue the run created.
    async fn cleanup(&self, broker: Option<&Broker>) {
        let workers = self.workers.lock().map(|w| w.clone()).unwrap_or_default();
        for mut w in workers {
            let _ = tokio::time::timeout(Duration::from_secs(30), w.wait_for(|d| *d)).await;
        }
        let queues = self.queues.lock().map(|q| q.clone()).unwrap_or_default();
        let fresh;
        let broker = match broker {
            Some(b) => b,
            None => match self.amqp("warren bench cleanup") {
                Ok(cfg) => match Broker::connect(cfg).await {
                    Ok(b) => {
                        fresh = b;
                        &fresh
                    }
                    Err(e) => {
                        eprintln!("# cleanup: cannot connect ({e}); left behind: {queues:?}");
                        return;
                    }
                },
                Err(e) => {
                    eprintln!("# cleanup: {e:#}; left behind: {queues:?}");
                    return;
                }
            },
        };
        let mut failed = Vec::new();
        for q in &queues {
            if let Err(e) = broker.delete_queue(q).await {
                failed.push(format!("{q} ({e})"));
            }
        }
        if !failed.is_empty() {
            eprintln!("# cleanup: could not delete {}", failed.join(", "));
        }
    }
}

/// Prints a group's figure lines, then the raw baselines they compare with.
fn print_figures(fs: &[Figure]) {
    for f in fs {
        println!("{}", f.line());
    }
    for f in fs.iter().filter(|f| f.raw.is_some()) {
        println!(
            "# raw lapin {} {:.*} {}",
            f.name,
            f.decimals,
            f.raw.unwrap_or_default(),
            f.unit
        );
    }
}

/// The run's progress bar over its groups (drawn on stderr when it is a terminal).
static PROGRESS: std::sync::OnceLock<indicatif::ProgressBar> = std::sync::OnceLock::new();

/// A progress note on stderr (stdout stays for figures), printed above the progress bar
/// when one is drawn.
pub fn note(msg: impl std::fmt::Display) {
    match PROGRESS.get() {
        Some(bar) if !bar.is_hidden() => bar.println(format!("# {msg}")),
        _ => eprintln!("# {msg}"),
    }
}

/// `warren bench`: runs the groups `args` selects and prints their figures. `product` says
/// what the broker is for the header line (e.g. `RabbitMQ 3.10.8`); it is awaited once the
/// bench is connected.
pub async fn run(
    host: Host,
    args: BenchArgs,
    product: impl Future<Output = String>,
) -> anyhow::Result<ExitCode> {
    let groups: Vec<&Group> = if args.only.is_empty() {
        GROUPS.iter().collect()
    } else {
        GROUPS
            .iter()
            .filter(|g| args.only.iter().any(|o| o == g.name))
            .collect()
    };
    let raw_url = host
        .each_url()
        .next()
        .map(str::to_owned)
        .context("no URL given")?;
    let bench = Bench {
        queue_type: host.queue_type,
        host,
        run_id: uuid::Uuid::new_v4().simple().to_string()[..10].to_owned(),
        raw_url,
        args,
        queues: Mutex::default(),
        workers: Mutex::default(),
    };
    let broker = Broker::connect(bench.amqp("warren bench")?)
        .await
        .context("cannot connect to the broker")?;
    let header = header(&bench, &broker, product.await).await;
    if bench.args.json {
        eprintln!("{header}");
    } else {
        println!("{header}");
        println!("# name value unit ratio_to_raw");
    }

    let mut figures = Vec::new();
    let mut failed = Vec::new();
    let bar = PROGRESS.get_or_init(|| indicatif::ProgressBar::new(0));
    bar.set_length(groups.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "bench {bar:30} {pos}/{len} groups ({elapsed}) {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let all = async {
        for g in &groups {
            bar.set_message(g.name);
            // A group that hangs (a lost message on a raw side, a blocked broker) fails
            // with a clear error instead of holding up the run.
            // Groups that run rounds get the deadline once per round.
            let deadline = GROUP_DEADLINE * bench.args.rounds.max(1);
            let ran = tokio::time::timeout(deadline, (g.run)(&bench))
                .await
                .unwrap_or_else(|_| {
                    Err(anyhow::anyhow!(
                        "did not finish within {deadline:?} (its queues are removed below)"
                    ))
                });
            match ran {
                Ok(fs) => {
                    if !bench.args.json {
                        bar.suspend(|| print_figures(&fs));
                    }
                    figures.extend(fs);
                }
                Err(e) => {
                    bar.suspend(|| {
                        eprintln!(
                            "error: bench group {} failed: {}",
                            g.name,
                            (bench.host.describe)(&e)
                        );
                    });
                    failed.push(g.name);
                }
            }
            bar.inc(1);
        }
    };
    // Ctrl-C or SIGTERM (e.g. from `timeout`) stop the run; the queues are removed either way.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let interrupted = tokio::select! {
        () = all => false,
        _ = tokio::signal::ctrl_c() => true,
        _ = term.recv() => true,
    };
    bar.finish_and_clear();
    if interrupted {
        note("interrupted; cleaning up");
    }
    bench.cleanup(Some(&broker)).await;
    broker.close().await;
    if bench.args.json {
        let out: Vec<JsonFigure> = figures
            .iter()
            .map(|f| JsonFigure {
                name: f.name,
                value: round(f.value, f.decimals),
                unit: f.unit,
                ratio: f.ratio().map(|r| round(r, 3)),
                raw: f.raw.map(|r| round(r, f.decimals)),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    if interrupted {
        return Err(anyhow!("interrupted"));
    }
    if !failed.is_empty() {
        return Err(anyhow!("bench groups failed: {}", failed.join(", ")));
    }
    Ok(ExitCode::SUCCESS)
}

async fn header(bench: &Bench, broker: &Broker, product: String) -> String {
    let url = bench.amqp("warren bench").ok();
    let endpoint = url
        .as_ref()
        .and_then(|c| c.urls().first().map(|u| u.host_port()))
        .unwrap_or_default();
    let vhost = broker
        .identity()
        .await
        .map_or_else(|_| String::from("?"), |(v, _)| v);
    let a = &bench.args;
    let build = if cfg!(debug_assertions) {
        "DEBUG build: figures are meaningless, use --release"
    } else {
        "release build"
    };
    format!(
        "# warren bench: {product} at {endpoint} (vhost {vhost}); queue type {qt}; \
         noop {count} tasks, {in_flight} in flight, prefetch {prefetch}, worker concurrency \
         {conc}; invoke {calls} sequential after {warmup} warm-up, {c64} with 64 in flight; \
         noop, drain, invoke and jobs: the median-ratio round of {rounds}; run {run}; \
         {build}",
        qt = bench.queue_type.as_str(),
        count = a.count,
        in_flight = a.in_flight,
        prefetch = a.prefetch,
        conc = a.concurrency,
        calls = a.calls,
        warmup = a.warmup,
        c64 = a.c64_calls,
        rounds = a.rounds,
        run = bench.run_id,
    )
}
