//! `jobs`: many small split jobs at once, and what they leave on the broker.
//!
//! - `jobs10_throughput`: [`JOBS`] split jobs of [`PARTS`] no-op parts, [`CAP`] jobs in
//!   flight, jobs/s from the first enqueue to the last `oncomplete` hook handled. `--rounds`
//!   rounds (default 3), each a raw round then a warren round, both sides set up once before
//!   the first; the figure is the round whose warren/raw ratio is the median (the broker's
//!   speed at declares and deletes drifts by ±25 % within a minute, so the two sides of a
//!   ratio are measured next to each other).
//!
//!   warren: one service with a splitter `job_part` (returns `PARTS` numbers), a no-op `job`
//!   and the hook `done` (gets the `Vec` of results). Each job is one `Client::send` of a
//!   task for `job` with `on_complete(done)`; a job counts as done when its hook handler
//!   runs. The worker is the bench's in-process worker (same settings as every group).
//!
//!   raw lapin, the floor, per job: the driver declares the job's queue (durable, classic,
//!   `x-expires` like a part queue; on one of [`POOL`] plain channels, as warren's broker
//!   handle has a pool of channels for declares) and publishes `PARTS` persistent messages
//!   (confirmed, mandatory, on one confirm channel) to a shared work queue (the run's queue
//!   type, like a service queue), each carrying the job's queue name as correlation id. A
//!   raw consumer (prefetch `--prefetch`, deliveries handled concurrently) publishes a
//!   confirmed persistent result into that job queue, counts the job's results in memory
//!   and, for the job's last result, publishes a confirmed persistent hook to a hook queue
//!   (the run's queue type) and deletes the job queue (one of `POOL` channels); then it
//!   acks the part. The driver consumes the hook queue (acking each hook); a job counts as
//!   done when its hook arrives. Results are never read back: the job queue is deleted
//!   with them. Bodies are 300 bytes, as in the `split` group.
//!
//!   So per job the raw floor is 1 declare, `PARTS` parts, `PARTS` results, 1 hook and
//!   1 delete, with the join reduced to an in-memory counter in one process. warren also
//!   sends the split task and runs its exactly-once join on the broker (docs/joins.md):
//!   the part queue is checked after each result, the joiner holds it (exclusive consumer),
//!   reads the results back and fires the hook with its markers (`BCC`).
//!
//! - `jobs_queues_left` (`queues`, no raw counterpart): once every warren round is over, the
//!   per-job queues of every warren job ([`job_queues`]: its part queue, as
//!   `warren_core::topology::job_queues` names them) that still exist once the
//!   joins' completion window has passed; the bench worker runs with
//!   `completion_window(`[`WINDOW`]`)`. Should be 0. The worker keeps running while they
//!   are counted (a worker may remove them itself). Counted by passive declares, polled from
//!   the last hook until none is left or [`LEFT_DEADLINE`] has passed; each round checks
//!   only the queues the previous round found. A passive declare counts as a use of a
//!   classic queue and restarts its `x-expires` timer (RabbitMQ's `stat`; checked on
//!   3.10: a 1.5 s queue polled every 300 ms never expires), so a round starts
//!   [`PROBE_GAP`] (longer than the window) after the previous one ended: polling faster
//!   would keep alive the very queues it counts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::stream::{self, FuturesUnordered, StreamExt};
use lapin::options::{BasicAckOptions, BasicQosOptions, QueueDeleteOptions};
use lapin::{Channel, Connection};
use tokio::sync::oneshot;
use warren_client::{Client, Task};
use warren_core::topology::{self, part_queue};
use warren_core::{Broker, QueueType, Target};

use super::raw::{self, short};
use super::split::split_service;
use super::stats::{median_ratio, per_sec};
use super::{note, Bench, Figure, Group, GroupRun, WorkerGuard};

/// The group.
pub const GROUP: Group = Group {
    name: "jobs",
    about: "1,000 split jobs of 10 no-op parts, 64 in flight, enqueue to hook; per-job queues \
            left after the completion window",
    run,
};

/// Jobs per round.
const JOBS: usize = 1_000;
/// Parts per job.
const PARTS: u32 = 10;
/// Jobs in flight at once.
const CAP: usize = 64;
/// Deadline of one job, enqueue to hook.
const JOB_DEADLINE: Duration = Duration::from_secs(60);
/// Channels for the raw side's declares (driver) and deletes (consumer).
const POOL: usize = 8;
/// `x-expires` of the raw job queues (like the bench worker's part queues).
const PART_EXPIRY: Duration = Duration::from_secs(120);
/// The joins' completion window the bench worker runs with.
const WINDOW: Duration = Duration::from_secs(2);
/// Least time between two checks of the same queue: longer than [`WINDOW`] (see the module
/// docs).
const PROBE_GAP: Duration = WINDOW.saturating_add(Duration::from_millis(500));
/// How long after the last hook queues are polled before the rest count as left.
const LEFT_DEADLINE: Duration = WINDOW.saturating_add(Duration::from_secs(8));
/// Passive declares in flight while counting.
const PROBES_IN_FLIGHT: usize = 8;
/// Passive declares on one connection. Each one that finds no queue gets its channel
/// closed by the broker; after 2,047 of those on one connection (the channel-id space),
/// lapin 4.12's `create_channel` fails with the error of an old closed channel, and
/// warren's broker handle then drops the connection. Found by this group; checked with
/// bare lapin.
const PROBES_PER_CONNECTION: usize = 1_000;
/// Raw message bodies (as in the `split` group).
const BODY_LEN: usize = 300;

fn run(b: &Bench) -> GroupRun<'_> {
    Box::pin(async move {
        let rounds = usize::try_from(b.args.rounds.max(1))?;
        note(format!(
            "jobs: {rounds} rounds, each raw lapin floor then warren: {JOBS} jobs x {PARTS} \
             parts, {CAP} in flight"
        ));
        let mut raw = RawJobs::start(b).await.context("raw lapin side")?;
        let measured = async {
            let mut warren = WarrenJobs::start(b).await.context("warren side")?;
            let ran = async {
                let mut pairs = Vec::with_capacity(rounds);
                for round in 0..rounds {
                    let r = raw.round(b, round).await.context("raw lapin side")?;
                    let w = warren.round(b, round).await.context("warren side")?;
                    note(format!(
                        "jobs: round {round}: raw {r:.0}, warren {w:.0} jobs/s ({:.2})",
                        w / r.max(1e-9)
                    ));
                    pairs.push((r, w));
                }
                let left = warren.left(b).await?;
                Ok::<_, anyhow::Error>((pairs, left))
            }
            .await;
            warren.stop().await;
            ran
        }
        .await;
        raw.close().await;
        let (pairs, left) = measured?;
        let (raw, warren) = median_ratio(pairs).context("jobs: no round ran")?;
        Ok(vec![
            Figure {
                name: "jobs10_throughput",
                value: warren,
                unit: "jobs/s",
                raw: Some(raw),
                decimals: 0,
            },
            Figure {
                name: "jobs_queues_left",
                #[allow(clippy::cast_precision_loss)]
                value: left as f64,
                unit: "queues",
                raw: None,
                decimals: 0,
            },
        ])
    })
}

/// Who waits for which job's hook: job → sender.
type Waiting<T> = Arc<Mutex<HashMap<String, oneshot::Sender<T>>>>;

fn wake<T>(waiting: &Waiting<T>, job: &str, value: T) -> bool {
    let tx = waiting.lock().ok().and_then(|mut w| w.remove(job));
    tx.is_some_and(|tx| tx.send(value).is_ok())
}

// ---- raw lapin ----------------------------------------------------------------------

/// The raw floor's connections, consumer and hook listener, kept across rounds.
struct RawJobs {
    conns: [Connection; 3],
    work_q: String,
    /// The driver's confirm channel (parts).
    pch: Channel,
    /// The driver's channels for the job queues' declares.
    declare: Vec<Channel>,
    worker: tokio::task::JoinHandle<anyhow::Result<()>>,
    listener: tokio::task::JoinHandle<anyhow::Result<()>>,
    waiting: Waiting<()>,
    body: Vec<u8>,
}

impl RawJobs {
    async fn start(b: &Bench) -> anyhow::Result<Self> {
        let (work_q, hook_q) = (b.raw_queue("jobs-work"), b.raw_queue("jobs-hook"));
        let driver = raw::connect(b.raw_url(), "warren bench raw jobs driver").await?;
        let worker_in = raw::connect(b.raw_url(), "warren bench raw jobs worker (consume)").await?;
        let worker_out =
            raw::connect(b.raw_url(), "warren bench raw jobs worker (publish)").await?;
        let conns = [driver, worker_in, worker_out];
        let parts = async {
            let [driver, worker_in, worker_out] = &conns;
            let pch = raw::confirm_channel(driver).await?;
            raw::declare_queue(&pch, &work_q, b.queue_type).await?;
            raw::declare_queue(&pch, &hook_q, b.queue_type).await?;
            let worker = start_raw_worker(b, &work_q, &hook_q, worker_in, worker_out).await?;
            let waiting: Waiting<()> = Arc::default();
            let listener = start_hook_listener(driver, &hook_q, waiting.clone()).await?;
            let declare = pool(driver).await?;
            Ok::<_, anyhow::Error>((pch, worker, listener, waiting, declare))
        }
        .await;
        match parts {
            Ok((pch, worker, listener, waiting, declare)) => Ok(Self {
                conns,
                work_q,
                pch,
                declare,
                worker,
                listener,
                waiting,
                body: raw::body_of_len(BODY_LEN),
            }),
            Err(e) => {
                raw::close_all(&conns).await;
                Err(e)
            }
        }
    }

    /// One round of [`JOBS`] jobs; returns jobs/s.
    async fn round(&mut self, b: &Bench, round: usize) -> anyhow::Result<f64> {
        let jobs: Vec<String> = (0..JOBS)
            .map(|i| b.raw_queue(&format!("job{round}-{i}")))
            .collect();
        let props = raw::persistent_json();
        let (jobs, pch, declare, body, props, waiting, work_q) = (
            &jobs,
            &self.pch,
            &self.declare,
            &self.body,
            &props,
            &self.waiting,
            &self.work_q,
        );
        let started = Instant::now();
        let all = stream::iter(0..JOBS)
            .map(|i| async move {
                let job = &jobs[i];
                let (tx, rx) = oneshot::channel();
                if let Ok(mut w) = waiting.lock() {
                    w.insert(job.clone(), tx);
                }
                // Durable, classic, expiring when unused, like a part queue.
                raw::declare_expiring(
                    &declare[i % POOL],
                    job,
                    QueueType::Classic,
                    Some(PART_EXPIRY),
                )
                .await?;
                let props = props.clone().with_correlation_id(short(job));
                let mut confirms = Vec::with_capacity(PARTS as usize);
                for _ in 0..PARTS {
                    confirms.push(
                        pch.basic_publish(
                            short(""),
                            short(work_q),
                            raw::mandatory(),
                            body,
                            props.clone(),
                        )
                        .await?,
                    );
                }
                for c in confirms {
                    raw::check_confirm(c.await)?;
                }
                tokio::time::timeout(JOB_DEADLINE, rx)
                    .await
                    .with_context(|| format!("raw job {job} timed out"))?
                    .context("the hook listener stopped")?;
                Ok::<_, anyhow::Error>(())
            })
            .buffer_unordered(CAP)
            .collect::<Vec<_>>();
        let results = tokio::select! {
            r = all => r,
            w = &mut self.worker => bail!("the raw consumer stopped: {}", stopped(w)),
            l = &mut self.listener => bail!("the raw hook listener stopped: {}", stopped(l)),
        };
        let took = started.elapsed();
        let failed = results.iter().filter(|r| r.is_err()).count();
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            return Err(e.context(format!("{failed} of {JOBS} raw jobs failed")));
        }
        Ok(per_sec(JOBS as u64, took))
    }

    async fn close(self) {
        self.worker.abort();
        self.listener.abort();
        raw::close_all(&self.conns).await;
    }
}

fn stopped(r: Result<anyhow::Result<()>, tokio::task::JoinError>) -> String {
    match r {
        Ok(Ok(())) => String::from("its stream ended"),
        Ok(Err(e)) => format!("{e:#}"),
        Err(e) => e.to_string(),
    }
}

/// [`POOL`] plain channels.
async fn pool(conn: &Connection) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(POOL);
    for _ in 0..POOL {
        out.push(conn.create_channel().await?);
    }
    Ok(out)
}

/// The raw consumer: per part, a confirmed result into the job's queue; for a job's last
/// result, a confirmed hook and the job queue's delete; then the part's ack.
async fn start_raw_worker(
    b: &Bench,
    work_q: &str,
    hook_q: &str,
    conn_in: &Connection,
    conn_out: &Connection,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let cch = conn_in.create_channel().await?;
    cch.basic_qos(b.args.prefetch, BasicQosOptions::default())
        .await?;
    let mut parts = raw::consume(&cch, work_q, "raw-jobs-worker", false).await?;
    let pch = raw::confirm_channel(conn_out).await?;
    let delete = Arc::new(pool(conn_out).await?);
    let next_delete = Arc::new(AtomicUsize::new(0));
    let counts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let props = raw::persistent_json();
    let hook_q = hook_q.to_owned();
    Ok(tokio::spawn(async move {
        let mut inflight = FuturesUnordered::new();
        loop {
            tokio::select! {
                d = parts.next() => {
                    let Some(d) = d else { return Ok(()) };
                    let d = d?;
                    let (pch, delete, next_delete, counts, props, hook_q) = (
                        pch.clone(),
                        delete.clone(),
                        next_delete.clone(),
                        counts.clone(),
                        props.clone(),
                        hook_q.clone(),
                    );
                    inflight.push(async move {
                        let job = d
                            .properties
                            .correlation_id()
                            .as_ref()
                            .context("a part without its job")?
                            .as_str()
                            .to_owned();
                        let props = props.with_correlation_id(short(&job));
                        raw::publish_one(&pch, "", &job, &d.data, props.clone()).await?;
                        let last = counts.lock().is_ok_and(|mut c| {
                            let n = c.entry(job.clone()).or_insert(0);
                            *n += 1;
                            let last = *n == PARTS;
                            if last {
                                c.remove(&job);
                            }
                            last
                        });
                        if last {
                            raw::publish_one(&pch, "", &hook_q, &d.data, props).await?;
                            let i = next_delete.fetch_add(1, Ordering::Relaxed) % POOL;
                            delete[i]
                                .queue_delete(short(&job), QueueDeleteOptions::default())
                                .await
                                .with_context(|| format!("deleting {job}"))?;
                        }
                        if !d.acker.ack(BasicAckOptions::default()).await? {
                            bail!("ack not delivered");
                        }
                        Ok::<_, anyhow::Error>(())
                    });
                }
                Some(r) = inflight.next() => r?,
            }
        }
    }))
}

/// Consumes the hook queue (acking each hook) and wakes the job a hook names.
async fn start_hook_listener(
    conn: &Connection,
    hook_q: &str,
    waiting: Waiting<()>,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut hooks = raw::consume(&ch, hook_q, "raw-jobs-hooks", false).await?;
    Ok(tokio::spawn(async move {
        while let Some(d) = hooks.next().await {
            let d = d?;
            if let Some(job) = d.properties.correlation_id() {
                wake(&waiting, job.as_str(), ());
            }
            d.acker.ack(BasicAckOptions::default()).await?;
        }
        Ok(())
    }))
}

// ---- warren -------------------------------------------------------------------------

/// The per-job broker queues of the job split from task `id` of `svc.job`
/// (`warren_core::topology::job_queues`: its part queue).
fn job_queues(svc: &str, id: &uuid::Uuid) -> anyhow::Result<Vec<String>> {
    Ok(topology::job_queues(&part_queue(svc, "job", id)?))
}

/// warren's side: the bench worker, a client, and every job's per-job queue names.
struct WarrenJobs {
    guard: WorkerGuard,
    client: Client,
    svc: String,
    waiting: Waiting<usize>,
    /// Hooks that found no job waiting for them (a second hook for one job).
    extra_hooks: Arc<AtomicUsize>,
    /// The per-job queues of every job run so far.
    queues: Vec<String>,
}

impl WarrenJobs {
    async fn start(b: &Bench) -> anyhow::Result<Self> {
        let svc = b.service("jobs")?;
        let waiting: Waiting<usize> = Arc::default();
        let extra_hooks = Arc::new(AtomicUsize::new(0));
        let (w, extra) = (waiting.clone(), extra_hooks.clone());
        let service = split_service(&svc, move |ctx, results| {
            if !wake(&w, ctx.cid(), results.len()) {
                extra.fetch_add(1, Ordering::Relaxed);
            }
        })?;
        let guard = b
            .start_worker(
                b.worker_builder("warren bench jobs worker")?
                    .service(service)
                    .part_queue_expiry(PART_EXPIRY)
                    .completion_window(WINDOW),
            )
            .await?;
        b.track(topology::QueueSpec::done_markers(&svc, u64::try_from(WINDOW.as_millis())?)?.name);
        let client = match b.client("warren bench jobs client").await {
            Ok(c) => c,
            Err(e) => {
                guard.stop().await;
                return Err(e);
            }
        };
        if let Err(e) = client.ensure_service(&svc).await {
            client.close().await;
            guard.stop().await;
            return Err(e.into());
        }
        Ok(Self {
            guard,
            client,
            svc,
            waiting,
            extra_hooks,
            queues: Vec::new(),
        })
    }

    /// One round of [`JOBS`] split jobs; returns jobs/s.
    async fn round(&mut self, b: &Bench, round: usize) -> anyhow::Result<f64> {
        let (took, mut names) =
            warren_round(b, &self.client, &self.svc, &self.waiting, round).await?;
        self.queues.append(&mut names);
        Ok(per_sec(JOBS as u64, took))
    }

    /// Per-job queues left once the completion window has passed after the last hook.
    async fn left(&mut self, b: &Bench) -> anyhow::Result<usize> {
        let last_hook = Instant::now();
        let left = queues_left(b, std::mem::take(&mut self.queues), last_hook).await?;
        let extra = self.extra_hooks.load(Ordering::Relaxed);
        if extra > 0 {
            note(format!("jobs: {extra} hooks ran more than once"));
        }
        Ok(left)
    }

    async fn stop(self) {
        self.client.close().await;
        self.guard.stop().await;
    }
}

/// One round: returns its duration and the per-job queue names of its jobs.
async fn warren_round(
    b: &Bench,
    client: &Client,
    svc: &str,
    waiting: &Waiting<usize>,
    round: usize,
) -> anyhow::Result<(Duration, Vec<String>)> {
    let hook = Target::new(svc, "done")?;
    let target = format!("{svc}.job");
    let (hook, target) = (&hook, &target);
    let started = Instant::now();
    let results: Vec<anyhow::Result<Vec<String>>> = stream::iter(0..JOBS)
        .map(|k| async move {
            let cid = format!("bench-jobs-{round}-{k}");
            let (tx, rx) = oneshot::channel();
            if let Ok(mut w) = waiting.lock() {
                w.insert(cid.clone(), tx);
            }
            let sent = client
                .enqueue(Task::new(target, &PARTS).with_cid(&cid).on_complete(hook))
                .await?;
            let names = job_queues(svc, &sent.id)?;
            for q in &names {
                b.track(q.clone());
            }
            let n = tokio::time::timeout(JOB_DEADLINE, rx)
                .await
                .with_context(|| format!("job {cid} timed out"))?
                .context("the hook handler is gone")?;
            if n != PARTS as usize {
                bail!("job {cid}: the hook got {n} results, not {PARTS}");
            }
            Ok(names)
        })
        .buffer_unordered(CAP)
        .collect()
        .await;
    let took = started.elapsed();
    let failed = results.iter().filter(|r| r.is_err()).count();
    let mut names = Vec::with_capacity(JOBS * 2);
    for r in results {
        match r {
            Ok(mut n) => names.append(&mut n),
            Err(e) => return Err(e.context(format!("{failed} of {JOBS} jobs failed"))),
        }
    }
    Ok((took, names))
}

/// How many of `queues` still exist once the window has passed: polled from `since`, each
/// round [`PROBE_GAP`] after the previous one ended, until none is left or the next round
/// would start later than [`LEFT_DEADLINE`] after `since`.
async fn queues_left(b: &Bench, queues: Vec<String>, since: Instant) -> anyhow::Result<usize> {
    let total = queues.len();
    let mut present = queues;
    let mut at = since;
    loop {
        tokio::time::sleep_until(at.into()).await;
        present = existing(b, present).await?;
        note(format!(
            "jobs: {:.1} s after the last hook, {} of {total} per-job queues exist",
            since.elapsed().as_secs_f64(),
            present.len()
        ));
        // From the end of this round, so no queue is checked twice within the gap.
        at = Instant::now() + PROBE_GAP;
        if present.is_empty() || at > since + LEFT_DEADLINE {
            return Ok(present.len());
        }
    }
}

/// The ones of `queues` that exist (passive declares), at most [`PROBES_PER_CONNECTION`]
/// on one connection.
async fn existing(b: &Bench, queues: Vec<String>) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for chunk in queues.chunks(PROBES_PER_CONNECTION) {
        let broker = Broker::connect(b.amqp("warren bench jobs probe")?).await?;
        let broker = &broker;
        let found: Vec<anyhow::Result<Option<String>>> = stream::iter(0..chunk.len())
            .map(|i| async move {
                let q = &chunk[i];
                let stats = broker
                    .queue_stats(q)
                    .await
                    .with_context(|| format!("checking {q}"))?;
                Ok(stats.map(|_| q.clone()))
            })
            .buffer_unordered(PROBES_IN_FLIGHT)
            .collect()
            .await;
        broker.close().await;
        for f in found {
            if let Some(q) = f? {
                out.push(q);
            }
        }
    }
    Ok(out)
}
