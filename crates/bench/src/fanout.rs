//! `fanout`: a fan-out/fan-in of 100 targets (`fanout100_ms`), from the call to
//! `Client::parallel` to the start of the final callback's handler, beside the same raw-lapin
//! floor as `fanin100_ms` (see [`super::split`]): 100 part publishes, 100 result publishes
//! (each by the consumer of a part, confirmed, before that part's ack) and 1 hook publish,
//! 201 persistent, confirmed messages, timed from the first publish to the hook's receipt.
//!
//! warren: one service with a no-op target method (`u32` in, `u32` out) and a final callback
//! that receives the [`FanInOutcome`] and tells the bench (by cid) when it started. Each run
//! is one `Parallel` of 100 targets with one `on_final`, built before the clock starts; the
//! figure is the median of [`RUNS`] runs after [`WARMUP`] unmeasured ones (the raw floor is
//! measured the same way). Each job's part queue and its lease and done-marker queues are
//! deleted at the end of the run (the join itself already deletes the part queue). The worker
//! keeps the default part-queue expiry: the client declares a fan-in's part queue with 24 h,
//! and a worker that redeclares it with another `x-expires` is refused by the broker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use tokio::sync::oneshot;
use warren_client::Parallel;
use warren_core::topology::{fanout_queue, QueueSpec};
use warren_core::FanInOutcome;
use warren_worker::{Context, Service, TaskError};

use super::split::raw_floor;
use super::stats::median;
use super::{note, Bench, Figure, Group, GroupRun};

/// The group.
pub const GROUP: Group = Group {
    name: "fanout",
    about: "fan-out/fan-in of 100 targets, parallel() to the final callback, vs the raw floor",
    run,
};

/// Targets per parallel invoke.
const TARGETS: u32 = 100;
/// Measured runs (the figure is their median).
const RUNS: usize = 10;
/// Unmeasured runs before them.
const WARMUP: usize = 2;
const DEADLINE: Duration = Duration::from_secs(120);

/// Final callbacks awaited, by cid: when the handler started, and what it received.
type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<(Instant, FanInOutcome)>>>>;

fn run(b: &Bench) -> GroupRun<'_> {
    Box::pin(async move {
        note(format!(
            "fanout: raw lapin floor, {TARGETS} parts, {WARMUP} warm-up + {RUNS} runs"
        ));
        let raw = raw_floor(b, TARGETS as usize, WARMUP + RUNS)
            .await
            .context("raw floor")?;
        let raw = median(raw.into_iter().skip(WARMUP).collect());
        note(format!("fanout: raw floor {TARGETS} parts {raw:.1} ms"));
        note(format!(
            "fanout: warren parallel invokes of {TARGETS} targets, {WARMUP} warm-up + {RUNS} runs"
        ));
        let (warren, sent) = warren_fanout(b).await.context("warren side")?;
        note(format!(
            "fanout: warren medians: parallel() returned (100 targets confirmed) after {:.1} ms, \
             final callback started after {:.1} ms",
            median(sent),
            median(warren.clone())
        ));
        Ok(vec![Figure {
            name: "fanout100_ms",
            value: median(warren),
            unit: "ms",
            raw: Some(raw),
            decimals: 1,
        }])
    })
}

/// warren: a service with no-op targets and a final callback; returns, per measured run, ms
/// until the final callback started and ms until `parallel()` returned.
async fn warren_fanout(b: &Bench) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let svc = b.service("fanout")?;
    let waiters: Waiters = Arc::default();
    let w = waiters.clone();
    let service = Service::new(&svc)
        .method("target", |_: Context, i: u32| async move {
            Ok::<_, TaskError>(i)
        })
        .method("final", move |ctx: Context, outcome: FanInOutcome| {
            let started = Instant::now();
            let tx = w.lock().ok().and_then(|mut m| m.remove(ctx.cid()));
            async move {
                if let Some(tx) = tx {
                    let _ = tx.send((started, outcome));
                }
                Ok::<_, TaskError>(())
            }
        });
    let guard = b
        .start_worker(
            b.worker_builder("warren bench fanout worker")?
                .service(service),
        )
        .await?;
    let client = b.client("warren bench fanout client").await?;
    b.track(QueueSpec::done_markers(&svc, super::split::done_window_ms())?.name);
    let result = async {
        let (target, fin) = (format!("{svc}.target"), format!("{svc}.final"));
        let (mut out, mut sent) = (Vec::with_capacity(RUNS), Vec::with_capacity(RUNS));
        for k in 0..WARMUP + RUNS {
            let cid = format!("bench-fanout-{}-{k}", b.run_id);
            let mut p = Parallel::new();
            for i in 0..TARGETS {
                p = p.target(&target, &i);
            }
            let p = p.on_final(&fin).with_cid(&cid);
            let (tx, rx) = oneshot::channel();
            waiters
                .lock()
                .map_err(|_| anyhow!("poisoned"))?
                .insert(cid.clone(), tx);
            let started = Instant::now();
            let receipt = client.parallel(p).await?;
            let sent_ms = started.elapsed().as_secs_f64() * 1e3;
            let part_queue = fanout_queue(&receipt.job);
            b.track(part_queue.clone());
            let Ok(fired) = tokio::time::timeout(DEADLINE, rx).await else {
                let left = client.broker().queue_stats(&part_queue).await;
                bail!(
                    "fan-in {cid} (job {}) did not call back within {DEADLINE:?}; part queue \
                     {part_queue}: {left:?}",
                    receipt.job
                );
            };
            let (fired, outcome) = fired.context("final callback channel closed")?;
            let ms = fired.duration_since(started).as_secs_f64() * 1e3;
            let failed = outcome.outcomes.iter().filter(|o| !o.ok).count();
            if outcome.cid != cid || !outcome.ok || outcome.outcomes.len() != TARGETS as usize {
                bail!(
                    "unexpected fan-in for {cid}: cid {}, ok {}, {} outcomes ({failed} failed)",
                    outcome.cid,
                    outcome.ok,
                    outcome.outcomes.len()
                );
            }
            if k >= WARMUP {
                out.push(ms);
                sent.push(sent_ms);
            }
        }
        Ok::<_, anyhow::Error>((out, sent))
    }
    .await;
    client.close().await;
    guard.stop().await;
    result
}
