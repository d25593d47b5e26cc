//! The `noop` group: persistent, confirmed, acked no-op tasks, end to end.
//!
//! - raw lapin: one confirm channel pipelines persistent mandatory publishes (at most
//!   `--in-flight` unconfirmed) into a durable queue of the run's queue type, while a consumer
//!   on its own connection, with the same prefetch, acks each delivery (acks in flight
//!   concurrently, not one frame write at a time).
//! - warren: `--in-flight` tasks call `Client::enqueue` concurrently while a `Worker` in the
//!   same process runs a no-op handler.
//!
//! Both are timed from the first publish to the last delivery handled (acked, for raw). The
//! bodies weigh the same: raw messages are padded to the size of warren's envelope.
//!
//! `worker_rss_peak` runs the warren side again with the worker in its own process
//! (`warren bench-worker`), and reads that process's peak resident memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use warren_client::Task;

use anyhow::{bail, Context as _};
use futures_util::stream::{FuturesUnordered, StreamExt};
use lapin::options::BasicQosOptions;
use serde_json::{json, Value};
use tokio::sync::Notify;
use warren_client::Client;
use warren_core::{Envelope, Target};
use warren_worker::{Context, Service, TaskError};

use super::raw;
use super::stats::per_sec;
use super::{note, procfs, worker_proc, Bench, Figure, Group, GroupRun};

/// The group.
pub const GROUP: Group = Group {
    name: "noop",
    about: "no-op task throughput (persistent, confirmed, acked) and worker peak memory",
    run,
};

/// How long one side of the workload may take before the bench gives up.
const DEADLINE: Duration = Duration::from_secs(600);

fn run(b: &Bench) -> GroupRun<'_> {
    Box::pin(async move {
        let n = b.args.count;
        let (raw, warren) = b
            .median_rounds(
                "noop",
                || {
                    note(format!("noop: raw lapin, {n} messages"));
                    raw_noop(b)
                },
                || {
                    note(format!("noop: warren, {n} tasks"));
                    warren_noop(b)
                },
                |tput: &f64| *tput,
            )
            .await?;
        note(format!(
            "noop: warren with the worker in its own process, {n} tasks (memory)"
        ));
        let rss = worker_proc::rss_run(b)
            .await
            .context("worker process run")?;
        note(format!(
            "noop: worker process handled {n} tasks at {:.0} tasks/s, {} CPU per task",
            rss.throughput,
            cpu_text(rss.cpu_us_per_task)
        ));
        let mut figures = vec![Figure {
            name: "noop_throughput",
            value: warren,
            unit: "tasks/s",
            raw: Some(raw),
            decimals: 0,
        }];
        if let Some(mib) = rss.peak_mib {
            figures.push(Figure {
                name: "worker_rss_peak",
                value: mib,
                unit: "MiB",
                raw: None,
                decimals: 1,
            });
        }
        Ok(figures)
    })
}

/// The payload of task `i`.
pub fn payload(i: u64) -> Value {
    json!({ "i": i })
}

/// The size of a warren envelope carrying a no-op payload to `target`.
pub fn envelope_len(target: &str) -> anyhow::Result<usize> {
    let target: Target = target.parse()?;
    Ok(Envelope::new(&target, payload(12345), None)
        .to_bytes()?
        .len())
}

/// Raw lapin: returns messages per second.
async fn raw_noop(b: &Bench) -> anyhow::Result<f64> {
    let n = b.args.count;
    let queue = b.raw_queue("noop");
    let pub_conn = raw::connect(b.raw_url(), "warren bench raw publisher").await?;
    let con_conn = raw::connect(b.raw_url(), "warren bench raw consumer").await?;
    let result = async {
        let pch = raw::confirm_channel(&pub_conn).await?;
        raw::declare_queue(&pch, &queue, b.queue_type).await?;
        let cch = con_conn.create_channel().await?;
        cch.basic_qos(b.args.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = raw::consume(&cch, &queue, "", false).await?;
        // Same length as this run's service name.
        let body = raw::body_of_len(envelope_len("bench-0123456789-noop.noop")?);
        let props = raw::persistent_json();
        let acked = Arc::new(AtomicU64::new(0));
        let cpu_before = procfs::cpu_time(None);
        let started = Instant::now();
        let consume = raw::ack_n(consumer, n, acked.clone());
        // Up to `in_flight` publishes pipelined: each sends its frames and awaits its confirm.
        let publish = raw::publish_confirmed(&pch, "", &queue, &body, &props, n, b.args.in_flight);
        let finished = tokio::time::timeout(DEADLINE, async {
            publish.await?;
            let sent = started.elapsed();
            note(format!(
                "noop: raw published {n} in {:.2} s ({:.0}/s), {} acked by then",
                sent.as_secs_f64(),
                per_sec(n, sent),
                acked.load(Ordering::Relaxed)
            ));
            consume.await?
        })
        .await;
        match finished {
            Ok(end) => {
                let took = end?.last - started;
                note(format!(
                    "noop: raw lapin used {} CPU per message (publisher and consumer)",
                    cpu_text(procfs::us_per(cpu_before, procfs::cpu_time(None), n))
                ));
                Ok(per_sec(n, took))
            }
            Err(_) => bail!("timed out: {} of {n} acked", acked.load(Ordering::Relaxed)),
        }
    }
    .await;
    raw::close_all(&[pub_conn, con_conn]).await;
    result
}

/// `12.3 us` or `? us`.
pub fn cpu_text(us: Option<f64>) -> String {
    us.map_or_else(|| String::from("? us"), |u| format!("{u:.1} us"))
}

/// What a no-op service saw: how many calls it handled, and when the first and the
/// `count`-th of them ended.
pub struct Tally {
    count: u64,
    handled: AtomicU64,
    first: OnceLock<Instant>,
    last: OnceLock<Instant>,
    done: Notify,
}

impl Tally {
    /// A tally that is done after `count` calls.
    pub fn new(count: u64) -> Arc<Self> {
        Arc::new(Self {
            count,
            handled: AtomicU64::new(0),
            first: OnceLock::new(),
            last: OnceLock::new(),
            done: Notify::new(),
        })
    }

    fn record(&self) {
        let k = self.handled.fetch_add(1, Ordering::Relaxed) + 1;
        if k == 1 {
            let _ = self.first.set(Instant::now());
        }
        if k == self.count {
            let _ = self.last.set(Instant::now());
            self.done.notify_one();
        }
    }

    /// Calls handled so far.
    pub fn handled(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }

    /// Returns once `count` calls were handled (at once if they already were).
    pub async fn done(&self) {
        self.done.notified().await;
    }

    /// When the first call ended and when the `count`-th did, once it has.
    pub fn span(&self) -> Option<(Instant, Instant)> {
        Some((*self.first.get()?, *self.last.get()?))
    }
}

/// A no-op service named `name` whose method `noop` counts its calls in `tally`.
pub fn noop_service(name: &str, tally: Arc<Tally>) -> anyhow::Result<Service> {
    Ok(
        Service::new(name).method("noop", move |_ctx: Context, _p: Value| {
            tally.record();
            async { Ok::<(), TaskError>(()) }
        }),
    )
}

/// warren, worker in this process: returns tasks per second.
async fn warren_noop(b: &Bench) -> anyhow::Result<f64> {
    let n = b.args.count;
    let svc = b.service("noop")?;
    let tally = Tally::new(n);
    let guard = b
        .start_worker(
            b.worker_builder("warren bench worker")?
                .service(noop_service(&svc, tally.clone())?),
        )
        .await?;
    let client = b.client("warren bench client").await?;
    let result = async {
        client.ensure_service(&svc).await?;
        let cpu_before = procfs::cpu_time(None);
        let started = Instant::now();
        let run = async {
            enqueue_all(&client, &format!("{svc}.noop"), n, b.args.in_flight).await?;
            let sent = started.elapsed();
            note(format!(
                "noop: warren enqueued {n} in {:.2} s ({:.0}/s), {} handled by then",
                sent.as_secs_f64(),
                per_sec(n, sent),
                tally.handled()
            ));
            tally.done().await;
            Ok::<_, anyhow::Error>(())
        };
        match tokio::time::timeout(DEADLINE, run).await {
            Ok(r) => r.map(|()| {
                let took = started.elapsed();
                note(format!(
                    "noop: warren used {} CPU per task (client and worker)",
                    cpu_text(procfs::us_per(cpu_before, procfs::cpu_time(None), n))
                ));
                per_sec(n, took)
            }),
            Err(_) => bail!("timed out: {} of {n} handled", tally.handled()),
        }
    }
    .await;
    client.close().await;
    guard.stop().await;
    result
}

/// Enqueues `n` no-op tasks to `target`, up to `in_flight` at once, the way the raw side
/// publishes (`raw::publish_confirmed`): one task keeps `in_flight` enqueue futures going.
pub async fn enqueue_all(
    client: &Client,
    target: &str,
    n: u64,
    in_flight: usize,
) -> anyhow::Result<()> {
    let one = |i: u64| client.enqueue(Task::new(target, &payload(i)));
    let mut pending = FuturesUnordered::new();
    for i in 0..n {
        pending.push(one(i));
        while pending.len() >= in_flight.max(1) {
            if let Some(r) = pending.next().await {
                r?;
            }
        }
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    Ok(())
}
