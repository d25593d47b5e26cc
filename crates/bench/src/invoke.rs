//! The `invoke` group: request/response round trips to an echo service.
//!
//! Both sides do the same work per call: a persistent, mandatory, confirmed request into a
//! durable queue of the run's queue type; a consumer (prefetch `--prefetch`, on its own
//! connection) answers with a confirmed publish to the caller's reply queue and only then
//! acks; the caller waits for its request's confirm and for the reply.
//! - raw lapin: the classic lapin RPC: an exclusive server-named reply queue consumed
//!   without acks, replies matched by correlation id.
//! - warren: `Client::invoke` against a `Worker` with an echo handler, in this process.
//!
//! Figures: sequential latency p50/p99 (after a warm-up), and throughput and p99 latency
//! with 64 calls in flight.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use warren_client::Task;

use anyhow::{anyhow, bail, Context as _};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use warren_core::{Envelope, Target};
use warren_worker::{Context, Service, TaskError};

use super::noop::cpu_text;
use super::raw::{self, short};
use super::stats::percentile_us;
use super::{note, procfs, Bench, Figure, Group, GroupRun};

/// The group.
pub const GROUP: Group = Group {
    name: "invoke",
    about: "invoke round trips: sequential p50/p99, throughput and p99 with 64 in flight",
    run,
};

/// Calls in flight in the concurrent run.
const IN_FLIGHT: usize = 64;
/// Deadline of one call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The raw request header counting the republishes still to do (the `retry` group's raw
/// stand-in for a retry).
const RETRIES_LEFT: &str = "retries-left";

/// What one side measured.
struct Measured {
    seq: Vec<Duration>,
    c64: Vec<Duration>,
    c64_took: Duration,
    /// CPU used per call in the concurrent run (caller and server, this process).
    c64_cpu_us: Option<f64>,
}

fn run(b: &Bench) -> GroupRun<'_> {
    Box::pin(async move {
        #[allow(clippy::cast_precision_loss)]
        let tput = |m: &Measured| m.c64.len() as f64 / m.c64_took.as_secs_f64().max(1e-9);
        // Both sides' figures come from the round with the median throughput ratio.
        let (mut raw, mut warren) = b
            .median_rounds(
                "invoke",
                || {
                    note(format!(
                        "invoke: raw lapin, {} sequential + {} with {IN_FLIGHT} in flight",
                        b.args.calls, b.args.c64_calls
                    ));
                    raw_side(b)
                },
                || {
                    note(format!(
                        "invoke: warren, {} sequential + {} with {IN_FLIGHT} in flight",
                        b.args.calls, b.args.c64_calls
                    ));
                    warren_side(b)
                },
                tput,
            )
            .await?;
        note(format!(
            "invoke: CPU per call with {IN_FLIGHT} in flight (caller and server): raw lapin {}, \
             warren {}",
            cpu_text(raw.c64_cpu_us),
            cpu_text(warren.c64_cpu_us)
        ));
        Ok(vec![
            Figure {
                name: "invoke_seq_p50",
                value: percentile_us(&mut warren.seq, 50.0),
                unit: "us",
                raw: Some(percentile_us(&mut raw.seq, 50.0)),
                decimals: 0,
            },
            Figure {
                name: "invoke_seq_p99",
                value: percentile_us(&mut warren.seq, 99.0),
                unit: "us",
                raw: Some(percentile_us(&mut raw.seq, 99.0)),
                decimals: 0,
            },
            Figure {
                name: "invoke_c64_throughput",
                value: tput(&warren),
                unit: "calls/s",
                raw: Some(tput(&raw)),
                decimals: 0,
            },
            Figure {
                name: "invoke_c64_p99",
                value: percentile_us(&mut warren.c64, 99.0),
                unit: "us",
                raw: Some(percentile_us(&mut raw.c64, 99.0)),
                decimals: 0,
            },
        ])
    })
}

/// Warm-up, sequential calls, then `c64_calls` calls with 64 in flight.
async fn drive<F, Fut>(b: &Bench, call: F) -> anyhow::Result<Measured>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    for _ in 0..b.args.warmup {
        call().await?;
    }
    let mut seq = Vec::with_capacity(usize::try_from(b.args.calls).unwrap_or(0));
    for _ in 0..b.args.calls {
        let t = Instant::now();
        call().await?;
        seq.push(t.elapsed());
    }
    let total = b.args.c64_calls;
    let next = Arc::new(AtomicU64::new(0));
    let cpu_before = procfs::cpu_time(None);
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let (call, next) = (call.clone(), next.clone());
        tasks.spawn(async move {
            let mut lat = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let t = Instant::now();
                call().await?;
                lat.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(lat)
        });
    }
    let mut c64 = Vec::new();
    while let Some(r) = tasks.join_next().await {
        c64.extend(r??);
    }
    let c64_took = started.elapsed();
    Ok(Measured {
        seq,
        c64,
        c64_took,
        c64_cpu_us: procfs::us_per(cpu_before, procfs::cpu_time(None), total),
    })
}

/// The echo payload and its warren envelope size.
fn payload() -> Value {
    json!({ "n": 12345, "text": "hello" })
}

// ---- raw lapin ----------------------------------------------------------------------

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>;

/// The caller side of raw lapin RPC.
pub(super) struct RawCaller {
    channel: Channel,
    queue: ShortString,
    reply_to: ShortString,
    body: Vec<u8>,
    waiters: Waiters,
    next: AtomicU64,
}

impl RawCaller {
    /// Sends requests of exactly `len` bytes from now on (default: the echo envelope's size).
    pub(super) fn set_body_len(&mut self, len: usize) {
        self.body = raw::body_of_len(len);
    }

    /// One round trip: a confirmed request, then its reply.
    pub(super) async fn call(&self) -> anyhow::Result<()> {
        self.call_with(None).await
    }

    /// A round trip whose request the server republishes to its own queue `retries` times
    /// before answering (with `None`, the request carries no header).
    pub(super) async fn call_with(&self, retries: Option<i32>) -> anyhow::Result<()> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .insert(id, tx);
        let props = raw::persistent_json()
            .with_correlation_id(short(&id.to_string()))
            .with_reply_to(self.reply_to.clone());
        let props = match retries {
            Some(n) => with_retries_left(props, n),
            None => props,
        };
        raw::publish_one(&self.channel, "", self.queue.as_str(), &self.body, props).await?;
        tokio::time::timeout(CALL_TIMEOUT, rx)
            .await
            .map_err(|_| anyhow!("no reply within {CALL_TIMEOUT:?}"))?
            .map_err(|_| anyhow!("reply listener stopped"))
    }
}

/// The connections of a raw RPC: a server's (one to consume, one to publish) and a
/// caller's.
pub(super) struct RawRpc {
    conns: [Connection; 3],
}

impl RawRpc {
    /// Starts a raw server on a queue of the run named for `what`, and a caller for it.
    pub(super) async fn start(b: &Bench, what: &str) -> anyhow::Result<(Self, RawCaller)> {
        let queue = b.raw_queue(what);
        let name = |role: &str| format!("warren bench raw {what} {role}");
        let conns = [
            raw::connect(b.raw_url(), &name("server (consume)")).await?,
            raw::connect(b.raw_url(), &name("server (publish)")).await?,
            raw::connect(b.raw_url(), &name("caller")).await?,
        ];
        let started = async {
            let [server_in, server_out, caller_conn] = &conns;
            start_raw_server(b, &queue, server_in, server_out).await?;
            start_raw_caller(&queue, caller_conn).await
        }
        .await;
        let rpc = Self { conns };
        match started {
            Ok(caller) => Ok((rpc, caller)),
            Err(e) => {
                rpc.close().await;
                Err(e)
            }
        }
    }

    /// Closes its connections.
    pub(super) async fn close(self) {
        raw::close_all(&self.conns).await;
    }
}

async fn raw_side(b: &Bench) -> anyhow::Result<Measured> {
    let (rpc, caller) = RawRpc::start(b, "rpc").await?;
    let caller = Arc::new(caller);
    let result = drive(b, move || {
        let caller = caller.clone();
        async move { caller.call().await }
    })
    .await;
    rpc.close().await;
    result
}

fn retries_left(props: &BasicProperties) -> i32 {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(RETRIES_LEFT))
        .and_then(AMQPValue::as_long_int)
        .unwrap_or(0)
}

fn with_retries_left(props: BasicProperties, n: i32) -> BasicProperties {
    let mut h = FieldTable::default();
    h.insert(short(RETRIES_LEFT), AMQPValue::LongInt(n));
    props.with_headers(h)
}

/// Consumes `queue` and answers each request with a confirmed publish, then acks it. A
/// request whose `retries-left` header is above 0 is instead republished to `queue` with one
/// less (persistent, mandatory, confirmed, then acked).
async fn start_raw_server(
    b: &Bench,
    queue: &str,
    consume: &Connection,
    publish: &Connection,
) -> anyhow::Result<()> {
    let ch = consume.create_channel().await?;
    raw::declare_queue(&ch, queue, b.queue_type).await?;
    ch.basic_qos(b.args.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = raw::consume(&ch, queue, "", false).await?;
    let out = raw::confirm_channel(publish).await?;
    let queue = short(queue);
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let (out, queue) = (out.clone(), queue.clone());
            tokio::spawn(async move {
                let answer = async {
                    let left = retries_left(&d.properties);
                    let (to, props) = if left > 0 {
                        (queue, with_retries_left(d.properties.clone(), left - 1))
                    } else {
                        let reply_to = d.properties.reply_to().clone().context("no reply_to")?;
                        let mut props = BasicProperties::default()
                            .with_content_type(short("application/json"))
                            .with_delivery_mode(1);
                        if let Some(c) = d.properties.correlation_id() {
                            props = props.with_correlation_id(c.clone());
                        }
                        (reply_to, props)
                    };
                    raw::publish_one(&out, "", to.as_str(), &d.data, props).await?;
                    d.acker.ack(BasicAckOptions::default()).await?;
                    Ok::<_, anyhow::Error>(())
                };
                if let Err(e) = answer.await {
                    tracing::debug!(error = %e, "raw rpc server could not answer");
                }
            });
        }
    });
    Ok(())
}

/// Declares the caller's exclusive reply queue and routes replies to waiting calls.
async fn start_raw_caller(queue: &str, conn: &Connection) -> anyhow::Result<RawCaller> {
    let replies = conn.create_channel().await?;
    let reply_queue = replies
        .queue_declare(
            short(""),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let reply_to = reply_queue.name().clone();
    let mut consumer = raw::consume(&replies, reply_to.as_str(), "", true).await?;
    let waiters: Waiters = Arc::default();
    let w = waiters.clone();
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let id = d
                .properties
                .correlation_id()
                .as_ref()
                .and_then(|c| c.as_str().parse::<u64>().ok());
            let tx = id.and_then(|id| w.lock().ok().and_then(|mut m| m.remove(&id)));
            if let Some(tx) = tx {
                let _ = tx.send(());
            }
        }
    });
    let target: Target = "bench-0123456789-echo.echo".parse()?;
    let len = Envelope::new(&target, payload(), None).to_bytes()?.len();
    Ok(RawCaller {
        channel: raw::confirm_channel(conn).await?,
        queue: short(queue),
        reply_to,
        body: raw::body_of_len(len),
        waiters,
        next: AtomicU64::new(0),
    })
}

// ---- warren -------------------------------------------------------------------------

async fn warren_side(b: &Bench) -> anyhow::Result<Measured> {
    let svc = b.service("echo")?;
    let guard = b
        .start_worker(b.worker_builder("warren bench worker")?.service(
            Service::new(&svc).method("echo", |_ctx: Context, v: Value| async move {
                Ok::<Value, TaskError>(v)
            }),
        ))
        .await?;
    let client = b
        .client_builder("warren bench client")?
        .invoke_timeout(CALL_TIMEOUT)
        .connect()
        .await?;
    let target: Arc<str> = Arc::from(format!("{svc}.echo"));
    let c = client.clone();
    let result = drive(b, move || {
        let (client, target) = (c.clone(), target.clone());
        async move {
            let v: Value = client.invoke(Task::new(&*target, &payload())).await?;
            if v != payload() {
                bail!("echo answered {v}");
            }
            Ok(())
        }
    })
    .await;
    client.close().await;
    guard.stop().await;
    result
}
