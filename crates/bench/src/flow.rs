//! `flow`: flow control (docs/flow.md, docs/cancellation.md).
//!
//! - `cancel_latency_p99`: [`CANCEL_ROUNDS`] rounds, one at a time, on a worker with
//!   concurrency 1. Each round runs a task that waits for its cancellation and queues a
//!   second task of the same cid behind it (its enqueue confirmed while the first runs), then
//!   cancels the cid. Measured: ms from `cancel_cid` returning to the queued task's
//!   `onerror` hook (kind `cancelled`) starting, i.e. the broadcast reaching the running
//!   handler, the slot freeing, the queued task being reached and settled. No raw
//!   counterpart.
//! - `ratelimit_error_pct`: [`RATE_TASKS`] tasks sent at once to a method limited to
//!   [`RATE`] per second through a Redis flow store; the largest count of handler starts in
//!   any 1 s window (sliding, from each start), as a percentage over [`RATE`] (0 when
//!   within it). No raw counterpart.
//! - `keyed_throughput`: [`KEYED_TASKS`] no-op tasks over [`KEYS`] keys with per-key
//!   concurrency 1 (Redis flow store), sent at once, in tasks/s from the first send to the
//!   last completion. Its ratio is to the same tasks on a method without keys in the same
//!   run (the `raw` column holds that rate here, not raw lapin's).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::Value;
use tokio::sync::Notify;
use warren_client::{Client, Task};
use warren_worker::{Context, Service, TaskError};

use super::{note, Bench, Figure, Group, GroupRun};

/// The group.
pub const GROUP: Group = Group {
    name: "flow",
    about: "flow control: cancel latency, rate-limit excess over 1 s windows, keyed vs unkeyed throughput",
    run,
};

/// Rounds of the cancellation run.
const CANCEL_ROUNDS: usize = 200;
/// The rate limit of the rate run, per second.
const RATE: u32 = 50;
/// Tasks of the rate run (about ten seconds at [`RATE`]).
const RATE_TASKS: usize = 500;
/// Tasks of each keyed-throughput run.
const KEYED_TASKS: usize = 2_000;
/// Keys in the keyed run.
const KEYS: usize = 100;
/// Sends in flight.
const IN_FLIGHT: usize = 256;

/// When each cid's `onerror` hook started.
type Hooks = Arc<Mutex<HashMap<String, Instant>>>;

fn run(b: &Bench) -> GroupRun<'_> {
    Box::pin(async move {
        let mut figures = vec![cancel_latency(b).await?];
        figures.extend(limits(b).await?);
        Ok(figures)
    })
}

async fn cancel_latency(b: &Bench) -> anyhow::Result<Figure> {
    let svc = b.service("cancel")?;
    let started = Arc::new(Notify::new());
    let hooks: Hooks = Arc::default();
    let (s, h) = (started.clone(), hooks.clone());
    let guard = b
        .start_worker(
            b.worker_builder("warren bench flow worker")?
                .concurrency(1)
                .service(
                    Service::new(&svc)
                        .method("block", move |ctx: Context, _: u64| {
                            let started = s.clone();
                            async move {
                                started.notify_one();
                                ctx.cancelled().await;
                                Ok::<_, TaskError>(())
                            }
                        })
                        .method("queued", |_: Context, _: u64| async {
                            Ok::<_, TaskError>(())
                        })
                        .method("failed", move |ctx: Context, _: Value| {
                            let hooks = h.clone();
                            async move {
                                if let Ok(mut m) = hooks.lock() {
                                    m.insert(ctx.cid().to_owned(), Instant::now());
                                }
                                Ok::<_, TaskError>(())
                            }
                        }),
                ),
        )
        .await?;
    let client = b.client("warren bench flow client").await?;
    let result = rounds(b, &client, &svc, &started, &hooks).await;
    client.close().await;
    guard.stop().await;
    let mut ms = result?;
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    note(format!(
        "flow: cancel latency ms over {CANCEL_ROUNDS} rounds: p50 {:.1} p90 {:.1} p99 {:.1} max {:.1}",
        at(0.5),
        at(0.9),
        at(0.99),
        ms[ms.len() - 1]
    ));
    Ok(Figure {
        name: "cancel_latency_p99",
        value: at(0.99),
        unit: "ms",
        raw: None,
        decimals: 1,
    })
}

async fn rounds(
    b: &Bench,
    client: &Client,
    svc: &str,
    started: &Notify,
    hooks: &Hooks,
) -> anyhow::Result<Vec<f64>> {
    let mut ms = Vec::with_capacity(CANCEL_ROUNDS);
    for round in 0..CANCEL_ROUNDS {
        let cid = format!("{}-cancel-{round}", b.run_id);
        client
            .enqueue(Task::new(format!("{svc}.block"), &0u64).with_cid(cid.as_str()))
            .await?;
        tokio::time::timeout(Duration::from_secs(30), started.notified()).await?;
        client
            .enqueue(
                Task::new(format!("{svc}.queued"), &0u64)
                    .with_cid(cid.as_str())
                    .on_error(format!("{svc}.failed").as_str()),
            )
            .await?;
        client.cancel_cid(&cid).await?;
        let cancelled_at = Instant::now();
        let deadline = cancelled_at + Duration::from_secs(30);
        loop {
            let hook = hooks.lock().ok().and_then(|m| m.get(&cid).copied());
            if let Some(at) = hook {
                ms.push(at.saturating_duration_since(cancelled_at).as_secs_f64() * 1e3);
                break;
            }
            if Instant::now() > deadline {
                bail!("round {round}: the queued task was not settled as cancelled in 30 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    Ok(ms)
}

/// Handler start (or end) times of the limited methods.
type Times = Arc<Mutex<Vec<Instant>>>;

fn push_now(times: &Times) {
    if let Ok(mut v) = times.lock() {
        v.push(Instant::now());
    }
}

fn count(times: &Times) -> usize {
    times.lock().map(|v| v.len()).unwrap_or(0)
}

async fn limits(b: &Bench) -> anyhow::Result<Vec<Figure>> {
    let svc = b.service("limits")?;
    let store = warren_core::status::RedisStore::from_env()?
        .with_prefix(format!("warren-bench-{}:", b.run_id));
    let (rate_starts, keyed_ends, plain_ends): (Times, Times, Times) =
        (Arc::default(), Arc::default(), Arc::default());
    let (r, k, p) = (rate_starts.clone(), keyed_ends.clone(), plain_ends.clone());
    let guard = b
        .start_worker(
            b.worker_builder("warren bench flow limits worker")?
                .flow_store(Arc::new(store))
                .service(
                    Service::new(&svc)
                        .method("limited", move |_: Context, _: u64| {
                            let r = r.clone();
                            async move {
                                push_now(&r);
                                Ok::<_, TaskError>(())
                            }
                        })
                        .method("keyed", move |_: Context, _: u64| {
                            let k = k.clone();
                            async move {
                                push_now(&k);
                                Ok::<_, TaskError>(())
                            }
                        })
                        .method("plain", move |_: Context, _: u64| {
                            let p = p.clone();
                            async move {
                                push_now(&p);
                                Ok::<_, TaskError>(())
                            }
                        })
                        .rate_limit("limited", RATE, Duration::from_secs(1))
                        .key_concurrency("keyed", 1),
                ),
        )
        .await?;
    let client = b.client("warren bench flow limits client").await?;
    let result = async {
        let rate = rate_excess(&client, &svc, &rate_starts).await?;
        let keyed = keyed_vs_plain(&client, &svc, &keyed_ends, &plain_ends).await?;
        anyhow::Ok(vec![rate, keyed])
    }
    .await;
    client.close().await;
    guard.stop().await;
    result
}

/// Sends `n` tasks built by `task`, [`IN_FLIGHT`] at once, and waits until `done` holds
/// `n` entries (within `wait`); returns the time from the first send to the last entry.
async fn send_and_wait(
    client: &Client,
    n: usize,
    task: impl Fn(usize) -> Task,
    done: &Times,
    wait: Duration,
) -> anyhow::Result<Duration> {
    use futures_util::{StreamExt, TryStreamExt};
    let t0 = Instant::now();
    futures_util::stream::iter(0..n)
        .map(|i| {
            let t = task(i);
            async move { client.enqueue(t).await }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<_>>()
        .await?;
    let deadline = Instant::now() + wait;
    while count(done) < n {
        if Instant::now() > deadline {
            bail!("only {} of {n} tasks ran within {wait:?}", count(done));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let last = done
        .lock()
        .ok()
        .and_then(|v| v.iter().max().copied())
        .unwrap_or(t0);
    Ok(last.saturating_duration_since(t0))
}

async fn rate_excess(client: &Client, svc: &str, starts: &Times) -> anyhow::Result<Figure> {
    let target = format!("{svc}.limited");
    let took = send_and_wait(
        client,
        RATE_TASKS,
        |i| Task::new(target.as_str(), &(i as u64)),
        starts,
        Duration::from_secs(120),
    )
    .await?;
    let mut t = starts.lock().map(|v| v.clone()).unwrap_or_default();
    t.sort_unstable();
    let window = Duration::from_secs(1);
    let most = (0..t.len())
        .map(|i| t[i..].iter().take_while(|s| **s < t[i] + window).count())
        .max()
        .unwrap_or(0);
    let excess = (most as f64 - f64::from(RATE)).max(0.0) / f64::from(RATE) * 100.0;
    note(format!(
        "flow: {RATE_TASKS} tasks limited to {RATE}/s ran in {took:.1?}; most starts in a 1 s window: {most}"
    ));
    Ok(Figure {
        name: "ratelimit_error_pct",
        value: excess,
        unit: "%",
        raw: None,
        decimals: 1,
    })
}

async fn keyed_vs_plain(
    client: &Client,
    svc: &str,
    keyed: &Times,
    plain: &Times,
) -> anyhow::Result<Figure> {
    let (k, p) = (format!("{svc}.keyed"), format!("{svc}.plain"));
    let wait = Duration::from_secs(240);
    let plain_took = send_and_wait(
        client,
        KEYED_TASKS,
        |i| Task::new(p.as_str(), &(i as u64)),
        plain,
        wait,
    )
    .await?;
    let keyed_took = send_and_wait(
        client,
        KEYED_TASKS,
        |i| Task::new(k.as_str(), &(i as u64)).key(format!("k{}", i % KEYS)),
        keyed,
        wait,
    )
    .await?;
    let rate = |took: Duration| KEYED_TASKS as f64 / took.as_secs_f64().max(1e-9);
    note(format!(
        "flow: {KEYED_TASKS} tasks over {KEYS} keys at 1 per key: {keyed_took:.1?}; without keys: {plain_took:.1?} (the `raw` column of keyed_throughput is the unkeyed rate)"
    ));
    Ok(Figure {
        name: "keyed_throughput",
        value: rate(keyed_took),
        unit: "tasks/s",
        raw: Some(rate(plain_took)),
        decimals: 0,
    })
}
