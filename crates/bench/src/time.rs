//! `time`: delayed tasks through the delay levels (docs/time.md).
//!
//! - `eta_lateness_p99`: [`ETA_TASKS`] tasks sent up front with `Task::at`, due at instants
//!   spread evenly over [`SPREAD`] (the first [`LEAD`] after the sends start); the p99 of
//!   (handler start − due time), in ms, both read from this machine's clock. No raw
//!   counterpart (the delayed-message plugin is not available; the cascade is the floor).
//! - `eta_throughput`: [`THROUGHPUT_TASKS`] tasks sent with a 1 s delay, [`IN_FLIGHT`] at
//!   once, in tasks/s from the first send to the last confirm, checked to all arrive. Its
//!   ratio is to **plain enqueue** of as many tasks in the same run (the `raw` column holds
//!   that rate here, not raw lapin's).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use futures_util::{StreamExt, TryStreamExt};
use warren_client::{Client, Task};
use warren_core::envelope::now_ms;
use warren_worker::{Context, Service, TaskError};

use super::stats::per_sec;
use super::{note, Bench, Figure, Group, GroupRun};

/// The group.
pub const GROUP: Group = Group {
    name: "time",
    about: "delayed tasks: p99 lateness of 1,000 due over 30 s, delayed enqueue rate vs plain",
    run,
};

/// Tasks of the lateness run.
const ETA_TASKS: usize = 1_000;
/// Over how long their due times are spread.
const SPREAD: Duration = Duration::from_secs(30);
/// When the first is due, after the sends start.
const LEAD: Duration = Duration::from_secs(10);
/// Tasks of each throughput run.
const THROUGHPUT_TASKS: usize = 5_000;
/// Sends in flight in the runs.
const IN_FLIGHT: usize = 256;

fn run(b: &Bench) -> GroupRun<'_> {
    Box::pin(async move {
        let mut figures = Vec::new();
        let svc = b.service("time")?;
        let late: Arc<Mutex<Vec<i64>>> = Arc::default();
        let plain_done: Arc<Mutex<usize>> = Arc::default();
        let (l, p) = (late.clone(), plain_done.clone());
        let guard = b
            .start_worker(
                b.worker_builder("warren bench time worker")?.service(
                    Service::new(&svc)
                        .method("due", move |_: Context, due_ms: u64| {
                            let late = l.clone();
                            async move {
                                let now = i64::try_from(now_ms()).unwrap_or(i64::MAX);
                                let due = i64::try_from(due_ms).unwrap_or(i64::MAX);
                                if let Ok(mut v) = late.lock() {
                                    v.push(now - due);
                                }
                                Ok::<_, TaskError>(())
                            }
                        })
                        .method("count", move |_: Context, _: u64| {
                            let done = p.clone();
                            async move {
                                if let Ok(mut n) = done.lock() {
                                    *n += 1;
                                }
                                Ok::<_, TaskError>(())
                            }
                        }),
                ),
            )
            .await?;
        let client = b.client("warren bench time client").await?;
        let result = async {
            figures.push(lateness(&client, &svc, &late).await?);
            figures.push(throughput(&client, &svc, &late, &plain_done).await?);
            anyhow::Ok(())
        }
        .await;
        client.close().await;
        guard.stop().await;
        result?;
        Ok(figures)
    })
}

async fn lateness(client: &Client, svc: &str, late: &Mutex<Vec<i64>>) -> anyhow::Result<Figure> {
    note(format!(
        "time: {ETA_TASKS} tasks due over {} s, the first {} s after the sends start",
        SPREAD.as_secs(),
        LEAD.as_secs()
    ));
    let start = SystemTime::now() + LEAD;
    let target = format!("{svc}.due");
    let step = SPREAD / u32::try_from(ETA_TASKS).unwrap_or(u32::MAX);
    let sending = Instant::now();
    futures_util::stream::iter(0..ETA_TASKS)
        .map(|i| {
            let due = start + step * u32::try_from(i).unwrap_or(u32::MAX);
            let due_ms = due
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0);
            let task = Task::new(target.as_str(), &due_ms).at(due);
            async move { client.enqueue(task).await }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<_>>()
        .await
        .context("sending the delayed tasks")?;
    let sent_in = sending.elapsed();
    if sent_in >= LEAD {
        note(format!(
            "time: sending took {sent_in:.1?}, longer than the lead: the first tasks were sent late"
        ));
    }
    let deadline = Instant::now() + LEAD + SPREAD + Duration::from_secs(60);
    loop {
        let n = late.lock().map(|v| v.len()).unwrap_or(0);
        if n >= ETA_TASKS {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {n} of {ETA_TASKS} delayed tasks ran in time");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut v = late.lock().map(|v| v.clone()).unwrap_or_default();
    v.sort_unstable();
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    note(format!(
        "time: lateness ms: min {} p50 {} p90 {} p99 {} max {} (sent in {sent_in:.1?})",
        v[0],
        at(0.5),
        at(0.9),
        at(0.99),
        v[v.len() - 1]
    ));
    Ok(Figure {
        name: "eta_lateness_p99",
        value: at(0.99) as f64,
        unit: "ms",
        raw: None,
        decimals: 0,
    })
}

async fn throughput(
    client: &Client,
    svc: &str,
    late: &Mutex<Vec<i64>>,
    plain_done: &Mutex<usize>,
) -> anyhow::Result<Figure> {
    let send = |target: String, delay: Option<Duration>| async move {
        let t = Instant::now();
        futures_util::stream::iter(0..THROUGHPUT_TASKS)
            .map(|i| {
                let mut task = Task::new(target.as_str(), &(i as u64));
                if let Some(d) = delay {
                    task = task.delay(d);
                }
                async move { client.enqueue(task).await }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await?;
        anyhow::Ok(t.elapsed())
    };
    note(format!(
        "time: {THROUGHPUT_TASKS} plain enqueues, then {THROUGHPUT_TASKS} delayed by 1 s, {IN_FLIGHT} in flight"
    ));
    let plain = per_sec(
        THROUGHPUT_TASKS as u64,
        send(format!("{svc}.count"), None).await?,
    );
    if let Ok(mut v) = late.lock() {
        v.clear();
    }
    let before = Instant::now();
    let delayed_took = send(format!("{svc}.due"), Some(Duration::from_secs(1))).await?;
    let delayed = per_sec(THROUGHPUT_TASKS as u64, delayed_took);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = late.lock().map(|v| v.len()).unwrap_or(0);
        let p = plain_done.lock().map(|n| *n).unwrap_or(0);
        if n >= THROUGHPUT_TASKS && p >= THROUGHPUT_TASKS {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {n} delayed and {p} plain of {THROUGHPUT_TASKS} tasks each ran");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    note(format!(
        "time: plain enqueue {plain:.0}/s, delayed {delayed:.0}/s; all delayed ran within {:.1?} of the first send (the `raw` column of eta_throughput is plain enqueue)",
        before.elapsed()
    ));
    Ok(Figure {
        name: "eta_throughput",
        value: delayed,
        unit: "tasks/s",
        raw: Some(plain),
        decimals: 0,
    })
}
