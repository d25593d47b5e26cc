//! The `pubsub` group: durable publish/subscribe with two subscribers, and status lookups.
//!
//! `pubsub_2sub_throughput` (deliveries/s = 2 × `--count` / seconds, from the first publish
//! to the last delivery handled by both subscribers):
//! - raw lapin: one confirm channel pipelines persistent mandatory publishes (at most
//!   `--in-flight` unconfirmed) to a fanout exchange bound to two durable queues of the run's
//!   queue type; two consumers (one channel each, on their own connection, prefetch
//!   `--prefetch`) ack each delivery, concurrently as in `noop`.
//! - warren: `Client::publish` (returns once confirmed) with `--in-flight` in flight, to a topic
//!   two services subscribe to (`Service::subscribe(topic, "got")`), both hosted by one
//!   `Worker` in this process. Each publish is also routed to the topic's recent-messages
//!   queue (part of warren's cost). The handlers count; the clock stops when both have seen
//!   every message.
//!
//! The bodies weigh the same: raw messages are padded to the size of warren's envelope.
//!
//! `status_p50`, `status_p99` (us): with a `RedisStore` (`WARREN_REDIS_URL`, a key prefix
//! unique to the run) given to the worker and the client, [`STATUS_TASKS`] no-op tasks run
//! until each is recorded as succeeded; then, after [`STATUS_WARMUP`] unmeasured lookups,
//! [`STATUS_LOOKUPS`] sequential `Client::status(id)` calls (round-robin over the tasks) are
//! timed. raw: as many sequential `GET`s through the `redis` crate (one multiplexed
//! connection) of keys holding the same status JSON. When Redis is unreachable these two
//! figures are skipped with a note. Every key the run wrote is deleted at the end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use warren_client::{Message, Task};

use anyhow::{bail, Context as _};
use futures_util::stream;
use futures_util::StreamExt;
use lapin::options::{
    BasicQosOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
};
use lapin::types::FieldTable;
use lapin::ExchangeKind;
use redis::aio::MultiplexedConnection;
use serde_json::Value;
use tokio::sync::Notify;
use uuid::Uuid;
use warren_client::Client;
use warren_core::status::{RedisStore, StatusStore, TaskState};
use warren_core::topology::{recent_queue, subscription_queue};
use warren_core::{Envelope, Target, Via};
use warren_worker::{Context, Service, TaskError};

use super::noop::{noop_service, payload, Tally};
use super::raw::{self, short};
use super::stats::percentile_us;
use super::{note, Bench, Figure, Group, GroupRun};

/// The group.
pub const GROUP: Group = Group {
    name: "pubsub",
    about: "publish to a topic with 2 subscribers (deliveries/s); status lookup p50/p99 (Redis)",
    run,
};

/// The subscribing method of both services.
const METHOD: &str = "got";
/// Subscribers of the topic (raw: queues bound to the fanout exchange).
const SUBSCRIBERS: u64 = 2;
/// Tasks run to have statuses to look up.
const STATUS_TASKS: u64 = 200;
/// Unmeasured lookups before the measured ones (each side).
const STATUS_WARMUP: usize = 200;
/// Sequential lookups measured (each side).
const STATUS_LOOKUPS: usize = 2_000;
/// How long one side of the workload may take before the bench gives up.
const DEADLINE: Duration = Duration::from_secs(600);
/// How long the status tasks may take to run and be recorded.
const STATUS_DEADLINE: Duration = Duration::from_secs(60);

fn run(b: &Bench) -> GroupRun<'_> {
    Box::pin(async move {
        let n = b.args.count.max(1);
        let in_flight = b.args.in_flight.max(1);
        note(format!(
            "pubsub: raw lapin, {n} messages to a fanout exchange bound to {SUBSCRIBERS} queues, \
             {in_flight} in flight"
        ));
        let raw = raw_pubsub(b).await.context("raw lapin side")?;
        note(format!(
            "pubsub: warren, {n} publishes to a topic with {SUBSCRIBERS} subscribers, \
             {in_flight} in flight"
        ));
        let warren = warren_pubsub(b).await.context("warren side")?;
        let mut figures = vec![Figure {
            name: "pubsub_2sub_throughput",
            value: warren,
            unit: "deliveries/s",
            raw: Some(raw),
            decimals: 0,
        }];
        if let Some((mut warren, mut raw)) = status_lookups(b).await.context("status lookups")? {
            figures.push(Figure {
                name: "status_p50",
                value: percentile_us(&mut warren, 50.0),
                unit: "us",
                raw: Some(percentile_us(&mut raw, 50.0)),
                decimals: 0,
            });
            figures.push(Figure {
                name: "status_p99",
                value: percentile_us(&mut warren, 99.0),
                unit: "us",
                raw: Some(percentile_us(&mut raw, 99.0)),
                decimals: 0,
            });
        }
        Ok(figures)
    })
}

/// The topic of this run.
fn topic(b: &Bench) -> String {
    format!("bench-{}-pubsub", b.run_id)
}

/// The size of the envelope `Client::publish` sends to `topic` with a no-op payload.
fn envelope_len(topic: &str) -> anyhow::Result<usize> {
    let target = Target::new("topic", topic)?;
    let mut env = Envelope::new(&target, payload(12345), None);
    env.channel = Via::Publish;
    env.topic = Some(topic.to_owned());
    Ok(env.to_bytes()?.len())
}

#[allow(clippy::cast_precision_loss)]
fn deliveries_per_s(n: u64, took: Duration) -> f64 {
    (SUBSCRIBERS * n) as f64 / took.as_secs_f64().max(1e-9)
}

// ---- raw lapin ----------------------------------------------------------------------

/// Raw lapin: returns deliveries per second.
async fn raw_pubsub(b: &Bench) -> anyhow::Result<f64> {
    let n = b.args.count.max(1);
    let queues = [b.raw_queue("sub-a"), b.raw_queue("sub-b")];
    // Auto-delete: also gone with the queues' bindings if the run is interrupted.
    let exchange = format!("warren.bench.{}.raw-pubsub", b.run_id);
    let pub_conn = raw::connect(b.raw_url(), "warren bench raw publisher").await?;
    let con_conn = raw::connect(b.raw_url(), "warren bench raw consumers").await?;
    let result = async {
        let pch = raw::confirm_channel(&pub_conn).await?;
        pch.exchange_declare(
            short(&exchange),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                auto_delete: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring {exchange}"))?;
        for q in &queues {
            raw::declare_queue(&pch, q, b.queue_type).await?;
            pch.queue_bind(
                short(q),
                short(&exchange),
                short(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("binding {q}"))?;
        }
        let mut channels = Vec::new();
        for _ in &queues {
            let ch = con_conn.create_channel().await?;
            ch.basic_qos(b.args.prefetch, BasicQosOptions::default())
                .await?;
            channels.push(ch);
        }
        let body = raw::body_of_len(envelope_len(&topic(b))?);
        let props = raw::persistent_json();
        let acked = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut consumers = Vec::new();
        for (ch, q) in channels.iter().zip(&queues) {
            let consumer = raw::consume(ch, q, "", false).await?;
            consumers.push(raw::ack_n(consumer, n, acked.clone()));
        }
        // Up to `in_flight` publishes pipelined: each sends its frames and awaits its confirm.
        let publish =
            raw::publish_confirmed(&pch, &exchange, "", &body, &props, n, b.args.in_flight);
        let finished = tokio::time::timeout(DEADLINE, async {
            publish.await?;
            note(format!(
                "pubsub: raw published {n} in {:.2} s, {} of {} deliveries acked by then",
                started.elapsed().as_secs_f64(),
                acked.load(Ordering::Relaxed),
                SUBSCRIBERS * n
            ));
            let mut last = started;
            for c in consumers {
                last = last.max(c.await??.last);
            }
            Ok::<_, anyhow::Error>(last)
        })
        .await;
        match finished {
            Ok(end) => Ok(deliveries_per_s(n, end? - started)),
            Err(_) => bail!(
                "timed out: {} of {} deliveries acked",
                acked.load(Ordering::Relaxed),
                SUBSCRIBERS * n
            ),
        }
    }
    .await;
    if let Ok(ch) = pub_conn.create_channel().await {
        let _ = ch
            .exchange_delete(short(&exchange), ExchangeDeleteOptions::default())
            .await;
    }
    raw::close_all(&[pub_conn, con_conn]).await;
    result
}

// ---- warren -------------------------------------------------------------------------

/// A service whose method [`METHOD`] subscribes to `topic` and counts its deliveries; when
/// it has seen `n`, it takes one off `left`, and the last to do so notifies `done`.
fn subscriber(
    svc: &str,
    topic: &str,
    n: u64,
    handled: Arc<AtomicU64>,
    left: Arc<AtomicU64>,
    done: Arc<Notify>,
) -> anyhow::Result<Service> {
    Ok(Service::new(svc)
        .method(METHOD, move |_ctx: Context, _p: Value| {
            let (handled, left, done) = (handled.clone(), left.clone(), done.clone());
            async move {
                if handled.fetch_add(1, Ordering::Relaxed) + 1 == n
                    && left.fetch_sub(1, Ordering::Relaxed) == 1
                {
                    done.notify_one();
                }
                Ok::<(), TaskError>(())
            }
        })
        .subscribe(topic, METHOD))
}

/// warren, both subscribers in one in-process worker: returns deliveries per second.
async fn warren_pubsub(b: &Bench) -> anyhow::Result<f64> {
    let n = b.args.count.max(1);
    let topic = topic(b);
    let svcs = [b.service("sub-a")?, b.service("sub-b")?];
    for svc in &svcs {
        b.track(subscription_queue(&topic, svc, METHOD));
    }
    b.track(recent_queue(&topic));
    let handled: Vec<Arc<AtomicU64>> = svcs.iter().map(|_| Arc::default()).collect();
    let left = Arc::new(AtomicU64::new(SUBSCRIBERS));
    let done = Arc::new(Notify::new());
    let mut builder = b.worker_builder("warren bench worker")?;
    for (svc, h) in svcs.iter().zip(&handled) {
        builder = builder.service(subscriber(
            svc,
            &topic,
            n,
            h.clone(),
            left.clone(),
            done.clone(),
        )?);
    }
    // Declares both subscription queues (and the topic's recent queue) before any publish.
    let guard = b.start_worker(builder).await?;
    let client = b.client("warren bench client").await?;
    let total = || {
        handled
            .iter()
            .map(|h| h.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let result = async {
        let started = Instant::now();
        let run = async {
            let (client, topic) = (&client, topic.as_str());
            let mut publishes = stream::iter(0..n)
                .map(|i| async move { client.publish(Message::new(topic, &payload(i))).await })
                .buffer_unordered(b.args.in_flight.max(1));
            while let Some(r) = publishes.next().await {
                r?;
            }
            note(format!(
                "pubsub: warren published {n} in {:.2} s, {} of {} deliveries handled by then",
                started.elapsed().as_secs_f64(),
                total(),
                SUBSCRIBERS * n
            ));
            done.notified().await;
            Ok::<_, anyhow::Error>(started.elapsed())
        };
        match tokio::time::timeout(DEADLINE, run).await {
            Ok(took) => Ok(deliveries_per_s(n, took?)),
            Err(_) => bail!(
                "timed out: {} of {} deliveries handled",
                total(),
                SUBSCRIBERS * n
            ),
        }
    }
    .await;
    client.close().await;
    guard.stop().await;
    result
}

// ---- status lookups -----------------------------------------------------------------

/// The Redis URL `RedisStore::from_env` uses.
fn redis_url() -> String {
    std::env::var("WARREN_REDIS_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379/".to_owned())
}

/// A raw connection to the store's Redis, or why there is none.
async fn raw_redis() -> anyhow::Result<MultiplexedConnection> {
    let client = redis::Client::open(redis_url()).context("invalid Redis URL")?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(3),
        client.get_multiplexed_async_connection(),
    )
    .await
    .context("no connection within 3 s")??;
    let _: String = tokio::time::timeout(
        Duration::from_secs(3),
        redis::cmd("PING").query_async(&mut conn),
    )
    .await
    .context("no PONG within 3 s")??;
    Ok(conn)
}

/// Per-lookup latencies, (warren, raw); `None` when Redis is unreachable.
async fn status_lookups(b: &Bench) -> anyhow::Result<Option<(Vec<Duration>, Vec<Duration>)>> {
    let mut conn = match raw_redis().await {
        Ok(c) => c,
        Err(e) => {
            note(format!(
                "pubsub: Redis unreachable ({e:#}); skipping status_p50 and status_p99"
            ));
            return Ok(None);
        }
    };
    let prefix = format!("warren:bench:{}:", b.run_id);
    let store: Arc<dyn StatusStore> = Arc::new(
        RedisStore::from_env()
            .context("status store")?
            .with_prefix(prefix.clone()),
    );
    note(format!(
        "pubsub: status store {store:?}, {STATUS_TASKS} tasks, then {STATUS_WARMUP} warm-up + \
         {STATUS_LOOKUPS} sequential lookups each side"
    ));
    let result = measure_status(b, store, &mut conn, &prefix).await;
    if let Err(e) = delete_keys(&mut conn, &prefix).await {
        note(format!(
            "pubsub: could not delete the Redis keys {prefix}* ({e:#})"
        ));
    }
    result.map(Some)
}

async fn measure_status(
    b: &Bench,
    store: Arc<dyn StatusStore>,
    conn: &mut MultiplexedConnection,
    prefix: &str,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let svc = b.service("status")?;
    let tally = Tally::new(STATUS_TASKS);
    let guard = b
        .start_worker(
            b.worker_builder("warren bench worker")?
                .service(noop_service(&svc, tally.clone())?)
                .status_store(store.clone()),
        )
        .await?;
    let client = b
        .client_builder("warren bench client")?
        .status_store(store)
        .connect()
        .await?;
    let result = async {
        client.ensure_service(&svc).await?;
        let jsons = tokio::time::timeout(STATUS_DEADLINE, async {
            let ids = run_tasks(&client, &format!("{svc}.noop"), b.args.in_flight).await?;
            tally.done().await;
            recorded(&client, &ids).await
        })
        .await
        .context("the status tasks did not all run and get recorded in time")??;
        let ids: Vec<Uuid> = jsons.iter().map(|(id, _)| *id).collect();

        // raw: the same JSON values under keys of our own, read back with bare GETs.
        let keys: Vec<String> = (0..jsons.len())
            .map(|i| format!("{prefix}raw:{i}"))
            .collect();
        for (key, (_, json)) in keys.iter().zip(&jsons) {
            redis::cmd("SET")
                .arg(key)
                .arg(json)
                .arg("EX")
                .arg(3600)
                .query_async::<()>(&mut *conn)
                .await?;
        }
        let mut raw = Vec::with_capacity(STATUS_LOOKUPS);
        for i in 0..STATUS_WARMUP + STATUS_LOOKUPS {
            let key = &keys[i % keys.len()];
            let t = Instant::now();
            let v: Option<String> = redis::cmd("GET").arg(key).query_async(&mut *conn).await?;
            let took = t.elapsed();
            if v.is_none() {
                bail!("raw GET {key} found nothing");
            }
            if i >= STATUS_WARMUP {
                raw.push(took);
            }
        }

        // warren: Client::status over the tasks' ids.
        let mut warren = Vec::with_capacity(STATUS_LOOKUPS);
        for i in 0..STATUS_WARMUP + STATUS_LOOKUPS {
            let id = ids[i % ids.len()];
            let t = Instant::now();
            let st = client.status(id).await?;
            let took = t.elapsed();
            if st.is_none_or(|s| s.id != id) {
                bail!("no status for task {id}");
            }
            if i >= STATUS_WARMUP {
                warren.push(took);
            }
        }
        Ok::<_, anyhow::Error>((warren, raw))
    }
    .await;
    client.close().await;
    guard.stop().await;
    result
}

/// Enqueues [`STATUS_TASKS`] no-op tasks for `target`, `in_flight` at a time; their ids.
async fn run_tasks(client: &Client, target: &str, in_flight: usize) -> anyhow::Result<Vec<Uuid>> {
    let mut sends = stream::iter(0..STATUS_TASKS)
        .map(|i| async move { client.enqueue(Task::new(target, &payload(i))).await })
        .buffer_unordered(in_flight.max(1));
    let mut ids = Vec::new();
    while let Some(r) = sends.next().await {
        ids.push(r?.id);
    }
    Ok(ids)
}

/// Waits until every task of `ids` is recorded as succeeded (the worker writes that after
/// the handler returns); each id with its status JSON.
async fn recorded(client: &Client, ids: &[Uuid]) -> anyhow::Result<Vec<(Uuid, String)>> {
    let mut out = Vec::with_capacity(ids.len());
    for &id in ids {
        loop {
            match client.status(id).await? {
                Some(st) if st.state == TaskState::Succeeded => {
                    out.push((id, serde_json::to_string(&st)?));
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
    Ok(out)
}

/// Deletes every key under `prefix` (the statuses, cid sets and raw copies of this run).
async fn delete_keys(conn: &mut MultiplexedConnection, prefix: &str) -> anyhow::Result<()> {
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut *conn)
            .await?;
        if !keys.is_empty() {
            redis::cmd("DEL")
                .arg(&keys)
                .query_async::<()>(&mut *conn)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}
