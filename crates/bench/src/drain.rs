//! The `drain` group: a backlog of no-op tasks, queued before any worker runs, then drained.
//!
//! `noop_drain_throughput` (tasks/s): [`TASKS`] persistent tasks wait in their queue; the
//! clock runs from the first completion to the last, so neither the enqueueing nor the
//! consumer's start-up counts, only how fast a consumer empties a full queue (rate =
//! ([`TASKS`] − 1) / (last − first)).
//! - warren: `Client::enqueue` of [`TASKS`] no-op tasks (`--in-flight` at once) with no
//!   worker running, then a `Worker` in this process (the bench's settings: `--prefetch`,
//!   `--concurrency`) starts on the service; a completion is a handler returning.
//! - raw lapin: [`TASKS`] persistent, mandatory, confirmed publishes (`--in-flight`
//!   unconfirmed at most) of bodies as heavy as warren's envelopes into a durable queue of
//!   the run's queue type, then a consumer on a connection of its own, prefetch
//!   `--prefetch`, acks each delivery (acks in flight concurrently, as in `noop`); a
//!   completion is an ack written.
//!
//! Both backlogs are counted on the broker before their consumer starts (a note).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use lapin::options::BasicQosOptions;
use warren_core::topology::service_queue;
use warren_core::Broker;

use super::noop::{enqueue_all, envelope_len, noop_service, Tally};
use super::raw;
use super::stats::per_sec;
use super::{note, Bench, Figure, Group, GroupRun};

/// The group.
pub const GROUP: Group = Group {
    name: "drain",
    about: "20,000 no-op tasks queued before the worker starts, drained: first to last completion",
    run,
};

/// Tasks in the backlog.
const TASKS: u64 = 20_000;
/// How long one side (fill and drain) may take before the bench gives up.
const DEADLINE: Duration = Duration::from_secs(240);
/// How long a backlog may take to show in the queue's ready count.
const COUNT_WAIT: Duration = Duration::from_secs(10);

fn run(b: &Bench) -> GroupRun<'_> {
    Box::pin(async move {
        let (raw, warren) = b
            .median_rounds(
                "drain",
                || {
                    note(format!(
                        "drain: raw lapin, {TASKS} messages published, then drained by a \
                         consumer with prefetch {}",
                        b.args.prefetch
                    ));
                    raw_drain(b)
                },
                || {
                    note(format!(
                        "drain: warren, {TASKS} tasks enqueued, then drained by a worker with \
                         prefetch {}, concurrency {}",
                        b.args.prefetch, b.args.concurrency
                    ));
                    warren_drain(b)
                },
                |tput: &f64| *tput,
            )
            .await?;
        Ok(vec![Figure {
            name: "noop_drain_throughput",
            value: warren,
            unit: "tasks/s",
            raw: Some(raw),
            decimals: 0,
        }])
    })
}

/// Tasks per second between the first and the last of [`TASKS`] completions.
fn drain_rate(first: Instant, last: Instant) -> f64 {
    per_sec(TASKS - 1, last.saturating_duration_since(first))
}

/// Waits (up to [`COUNT_WAIT`]) until `queue` holds the whole backlog ready, and says what
/// it found.
async fn note_backlog(side: &str, broker: &Broker, queue: &str) {
    let until = Instant::now() + COUNT_WAIT;
    let found = loop {
        let r = broker.queue_stats(queue).await;
        match r {
            Ok(Some(s)) if u64::from(s.ready) < TASKS && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => break r,
        }
    };
    match found {
        Ok(Some(s)) => note(format!(
            "drain: {side} backlog: {} ready in the queue",
            s.ready
        )),
        Ok(None) => note(format!("drain: {side} backlog: the queue is missing")),
        Err(e) => note(format!("drain: {side} backlog not counted ({e})")),
    }
}

/// Raw lapin: returns messages per second.
async fn raw_drain(b: &Bench) -> anyhow::Result<f64> {
    let queue = b.raw_queue("drain");
    let pub_conn = raw::connect(b.raw_url(), "warren bench raw drain publisher").await?;
    let con_conn = raw::connect(b.raw_url(), "warren bench raw drain consumer").await?;
    let result = tokio::time::timeout(DEADLINE, async {
        let pch = raw::confirm_channel(&pub_conn).await?;
        raw::declare_queue(&pch, &queue, b.queue_type).await?;
        // Same length as this run's service name.
        let body = raw::body_of_len(envelope_len("bench-0123456789-drain.noop")?);
        let started = Instant::now();
        raw::publish_confirmed(
            &pch,
            "",
            &queue,
            &body,
            &raw::persistent_json(),
            TASKS,
            b.args.in_flight,
        )
        .await?;
        note(format!(
            "drain: raw published {TASKS} in {:.2} s",
            started.elapsed().as_secs_f64()
        ));
        let broker = Broker::connect(b.amqp("warren bench drain probe")?).await?;
        note_backlog("raw", &broker, &queue).await;
        broker.close().await;
        let cch = con_conn.create_channel().await?;
        cch.basic_qos(b.args.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = raw::consume(&cch, &queue, "raw-drain", false).await?;
        let span = raw::ack_n(consumer, TASKS, Arc::new(AtomicU64::new(0))).await??;
        Ok(drain_rate(span.first, span.last))
    })
    .await;
    raw::close_all(&[pub_conn, con_conn]).await;
    result.context("timed out")?
}

/// warren: returns tasks per second.
async fn warren_drain(b: &Bench) -> anyhow::Result<f64> {
    let svc = b.service("drain")?;
    let client = b.client("warren bench drain client").await?;
    let filled = tokio::time::timeout(DEADLINE, async {
        client.ensure_service(&svc).await?;
        let started = Instant::now();
        enqueue_all(&client, &format!("{svc}.noop"), TASKS, b.args.in_flight).await?;
        note(format!(
            "drain: warren enqueued {TASKS} in {:.2} s",
            started.elapsed().as_secs_f64()
        ));
        note_backlog("warren", client.broker(), &service_queue(&svc)?).await;
        Ok::<_, anyhow::Error>(())
    })
    .await;
    client.close().await;
    filled.context("enqueueing timed out")??;
    let tally = Tally::new(TASKS);
    let guard = b
        .start_worker(
            b.worker_builder("warren bench drain worker")?
                .service(noop_service(&svc, tally.clone())?),
        )
        .await?;
    let drained = tokio::time::timeout(DEADLINE, tally.done()).await;
    guard.stop().await;
    match (drained, tally.span()) {
        (Ok(()), Some((first, last))) => Ok(drain_rate(first, last)),
        _ => bail!("timed out: {} of {TASKS} tasks handled", tally.handled()),
    }
}
