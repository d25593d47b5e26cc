//! `split`: a split job from enqueue to oncomplete (`split1000_ms`, `fanin100_ms`), beside
//! the raw-lapin floor for the same message count: N part publishes, N result publishes (each
//! published by the consumer of a part, confirmed, before that part's ack) and 1 hook
//! publish, all persistent and confirmed, timed from the first publish to the hook's receipt.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::stream::{FuturesUnordered, StreamExt};
use lapin::options::{BasicAckOptions, BasicQosOptions};
use tokio::sync::mpsc;
use warren_client::Task;
use warren_core::topology::QueueSpec;
use warren_core::Target;
use warren_worker::{Context, Service, TaskError};

use super::raw;
use super::stats::median;
use super::{note, Bench, Figure, Group, GroupRun};

/// The group.
pub const GROUP: Group = Group {
    name: "split",
    about: "split job of 1,000 parts and fan-in of 100, enqueue to oncomplete, vs the raw floor",
    run,
};

const RUNS_1000: usize = 5;
const RUNS_100: usize = 9;
const DEADLINE: Duration = Duration::from_secs(120);

fn run(b: &Bench) -> GroupRun<'_> {
    Box::pin(async move {
        note("split: raw lapin floor, 1000 and 100 parts");
        let raw1000 = median(
            raw_floor(b, 1000, RUNS_1000)
                .await
                .context("raw floor 1000")?,
        );
        let raw100 = median(raw_floor(b, 100, RUNS_100).await.context("raw floor 100")?);
        note(format!(
            "split: raw floor 1000 parts {raw1000:.1} ms, 100 parts {raw100:.1} ms"
        ));
        note("split: warren split jobs");
        let (w1000, w100) = warren_split(b).await.context("warren side")?;
        Ok(vec![
            Figure {
                name: "split1000_ms",
                value: median(w1000),
                unit: "ms",
                raw: Some(raw1000),
                decimals: 1,
            },
            Figure {
                name: "fanin100_ms",
                value: median(w100),
                unit: "ms",
                raw: Some(raw100),
                decimals: 1,
            },
        ])
    })
}

/// Raw lapin: parts queue → a consumer that publishes each result (confirmed) then acks →
/// results queue → when all are in, one hook publish → hook queue. Returns ms per run.
pub(super) async fn raw_floor(b: &Bench, n: usize, runs: usize) -> anyhow::Result<Vec<f64>> {
    let (parts_q, results_q, hook_q) = (
        b.raw_queue(&format!("split{n}-parts")),
        b.raw_queue(&format!("split{n}-results")),
        b.raw_queue(&format!("split{n}-hook")),
    );
    let driver = raw::connect(b.raw_url(), "warren bench raw split driver").await?;
    let worker = raw::connect(b.raw_url(), "warren bench raw split worker").await?;
    let pch = raw::confirm_channel(&driver).await?;
    for q in [&parts_q, &results_q, &hook_q] {
        raw::declare_queue(&pch, q, b.queue_type).await?;
    }
    let props = raw::persistent_json();
    // The worker: consume parts, publish a result per part (confirmed), then ack.
    let wch = raw::confirm_channel(&worker).await?;
    wch.basic_qos(b.args.prefetch, BasicQosOptions::default())
        .await?;
    let mut parts = raw::consume(&wch, &parts_q, "raw-split-worker", false).await?;
    let (wres, wprops) = (results_q.clone(), props.clone());
    let worker_task = tokio::spawn(async move {
        let mut inflight = FuturesUnordered::new();
        loop {
            tokio::select! {
                d = parts.next() => {
                    let Some(d) = d else { break };
                    let d = d?;
                    let (ch, q, p) = (wch.clone(), wres.clone(), wprops.clone());
                    inflight.push(async move {
                        raw::publish_one(&ch, "", &q, &d.data, p).await?;
                        if !d.acker.ack(BasicAckOptions::default()).await? {
                            bail!("ack not delivered");
                        }
                        Ok::<_, anyhow::Error>(())
                    });
                }
                Some(r) = inflight.next() => r?,
            }
        }
        Ok::<_, anyhow::Error>(())
    });
    let cch = driver.create_channel().await?;
    cch.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut results = raw::consume(&cch, &results_q, "raw-split-results", false).await?;
    let mut hooks = raw::consume(&cch, &hook_q, "raw-split-hook", true).await?;
    let body = raw::body_of_len(300);
    let mut times = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let round = async {
            let mut confirms = FuturesUnordered::new();
            for _ in 0..n {
                confirms.push(
                    pch.basic_publish(
                        raw::short(""),
                        raw::short(&parts_q),
                        raw::mandatory(),
                        &body,
                        props.clone(),
                    )
                    .await?,
                );
            }
            while let Some(c) = confirms.next().await {
                raw::check_confirm(c)?;
            }
            for _ in 0..n {
                let d = results.next().await.context("results stream ended")??;
                d.acker.ack(BasicAckOptions::default()).await?;
            }
            raw::publish_one(&pch, "", &hook_q, &body, props.clone()).await?;
            hooks.next().await.context("hook stream ended")??;
            Ok::<_, anyhow::Error>(())
        };
        tokio::time::timeout(DEADLINE, round)
            .await
            .context("raw split timed out")??;
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    worker_task.abort();
    raw::close_all(&[driver, worker]).await;
    Ok(times)
}

/// warren: a service with a splitter, parts and a hook; returns ms per job for 1000 and 100.
async fn warren_split(b: &Bench) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let svc = b.service("split")?;
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let service = split_service(&svc, move |ctx, results| {
        let _ = tx.send(format!("{} {}", ctx.cid(), results.len()));
    })?;
    let guard = b
        .start_worker(
            b.worker_builder("warren bench split worker")?
                .service(service)
                .part_queue_expiry(Duration::from_secs(120)),
        )
        .await?;
    let client = b.client("warren bench split client").await?;
    let hook = Target::new(&svc, "done")?;
    let one = |n: u32, k: usize| {
        let (client, hook, svc) = (client.clone(), hook.clone(), svc.clone());
        let cid = format!("bench-split-{n}-{k}");
        async move {
            let started = Instant::now();
            let r = client
                .enqueue(
                    Task::new(format!("{svc}.job"), &n)
                        .with_cid(&cid)
                        .on_complete(&hook),
                )
                .await?;
            Ok::<_, anyhow::Error>((started, cid, r.id))
        }
    };
    let mut out = (Vec::new(), Vec::new());
    b.track(QueueSpec::done_markers(&svc, done_window_ms())?.name);
    for (n, runs) in [(1000u32, RUNS_1000), (100, RUNS_100)] {
        for k in 0..runs {
            let (started, cid, id) = one(n, k).await?;
            b.track(format!("part.{svc}-job-{id}"));
            let line = tokio::time::timeout(DEADLINE, rx.recv())
                .await
                .context("split job timed out")?
                .context("hook channel closed")?;
            let ms = started.elapsed().as_secs_f64() * 1e3;
            if line != format!("{cid} {n}") {
                bail!("unexpected hook {line:?} for {cid}");
            }
            if n == 1000 {
                out.0.push(ms)
            } else {
                out.1.push(ms)
            }
        }
    }
    client.close().await;
    guard.stop().await;
    Ok(out)
}

/// The service of a split job: `job` takes a number `n` and is split by `job_part` into the
/// parts `0..n`, each part's `job` returns its number, and the oncomplete hook `done` hands
/// the job's results to `done`.
pub(super) fn split_service<F>(svc: &str, done: F) -> anyhow::Result<Service>
where
    F: Fn(&Context, Vec<u32>) + Send + Sync + 'static,
{
    Ok(Service::new(svc)
        .method("job_part", |_: Context, n: u32| async move {
            Ok::<_, TaskError>((0..n).collect::<Vec<u32>>())
        })
        .method(
            "job",
            |_: Context, i: u32| async move { Ok::<_, TaskError>(i) },
        )
        .method("done", move |ctx: Context, results: Vec<u32>| {
            done(&ctx, results);
            async { Ok::<_, TaskError>(()) }
        }))
}

/// The default completion window in ms: the bench workers' done-marker queues are named by it.
pub(crate) fn done_window_ms() -> u64 {
    u64::try_from(warren_worker::DEFAULT_COMPLETION_WINDOW.as_millis()).unwrap_or(u64::MAX)
}
