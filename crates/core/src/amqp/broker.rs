//! [`Broker`]: one managed AMQP connection, replaced when it dies.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;

use super::message::short;
use crate::config::{AmqpConfig, QueueType};
use crate::delay::{DELIVER_EXCHANGE, UNROUTED_EXCHANGE};
use crate::error::{classify, AmqpError, Error, Result};
use crate::names::check_amqp_len;
use crate::topology::{QueueSpec, DEAD_EXCHANGE, TASK_EXCHANGE, TOPIC_EXCHANGE};

/// A connection to RabbitMQ that reconnects itself.
///
/// Cheap to clone (all clones share the connection). When the connection dies, the next
/// caller that needs it reconnects, with exponential backoff and jitter, trying each
/// configured URL in turn, for as long as the [`crate::ReconnectPolicy`] allows. Every
/// connection gets a new *generation* number; deliveries remember theirs, so a delivery
/// from a dead connection is never taken for a live one.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    config: AmqpConfig,
    live: Mutex<Option<Live>>,
    generation: AtomicU64,
    /// Long-lived channels for declarations and passive declares, so that checking a queue
    /// costs one round trip instead of three (open, declare, close).
    ops: Vec<Arc<Mutex<ChannelSlot>>>,
    next_op: std::sync::atomic::AtomicUsize,
    /// The connection generation whose exchanges are known to be declared.
    exchanges_at: AtomicU64,
    /// Channels of the live connection that the broker closed (a `NOT_FOUND` passive
    /// declare, a refused exclusive consume). See [`Broker::note_closed`].
    closed_by_broker: std::sync::atomic::AtomicU32,
    /// Channels opened on the live connection.
    opened: std::sync::atomic::AtomicU32,
    /// Idle channels in confirm mode, left clean by a held batch that ended with its
    /// queue's delete (see [`Broker::hold_channel`]), at most [`HOLD_CHANNELS`].
    holds: std::sync::Mutex<Vec<(Channel, u64)>>,
}

/// A connection that had a channel closed by the broker is retired before this many
/// channels were opened on it. lapin 4.12 hands out channel ids in a cycle of the
/// connection's `channel_max` (2,047 on RabbitMQ), and opening a channel on the id of one
/// the broker closed fails with that old channel's error, so warren moves to a fresh
/// connection before the ids come round.
const RETIRE_AFTER_OPENED: u32 = 1_900;
/// How long a retired connection stays open for the work still running on it.
const RETIRED_GRACE: Duration = Duration::from_secs(30);
/// How long closing a connection waits for the broker's close-ok: a connection to a node
/// that stopped answering would never send it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A channel kept for reuse, with the connection generation it belongs to.
pub(crate) type ChannelSlot = Option<(Channel, u64)>;

/// Channels kept for declarations and checks.
const OPS_CHANNELS: usize = 32;

/// Idle hold channels kept for reuse. Opening and closing a channel (with its prefetch
/// and confirm mode) costs RabbitMQ 3.10 about 0.6 ms of CPU, a fifth of what warren's
/// join added to the broker's work for a 10-part job; see docs/scaling.md.
const HOLD_CHANNELS: usize = 16;

/// An ops channel, held exclusively until dropped.
struct OpsChannel {
    slot: tokio::sync::OwnedMutexGuard<ChannelSlot>,
    channel: Channel,
    generation: u64,
}

#[derive(Clone)]
pub(crate) struct Live {
    pub(crate) conn: Arc<Connection>,
    pub(crate) generation: u64,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("urls", &self.inner.config.redacted_urls())
            .field("generation", &self.generation())
            .finish()
    }
}

/// Counts from a passive queue declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages ready for delivery (RabbitMQ does not report unacked ones here).
    pub ready: u32,
    /// Consumers attached.
    pub consumers: u32,
}

impl Broker {
    /// Connects now (so a wrong URL or a broker that is down fails early, with a clear
    /// error, after the reconnect policy's `give_up_after`).
    pub async fn connect(config: AmqpConfig) -> Result<Self> {
        let broker = Self {
            inner: Arc::new(Inner {
                config,
                live: Mutex::new(None),
                generation: AtomicU64::new(0),
                ops: (0..OPS_CHANNELS)
                    .map(|_| Arc::new(Mutex::new(None)))
                    .collect(),
                next_op: std::sync::atomic::AtomicUsize::new(0),
                exchanges_at: AtomicU64::new(0),
                closed_by_broker: std::sync::atomic::AtomicU32::new(0),
                opened: std::sync::atomic::AtomicU32::new(0),
                holds: std::sync::Mutex::new(Vec::new()),
            }),
        };
        broker.live().await?;
        Ok(broker)
    }

    /// The configuration this broker was built from.
    #[must_use]
    pub fn config(&self) -> &AmqpConfig {
        &self.inner.config
    }

    /// The current connection generation (starts at 1, +1 per reconnect).
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// The live connection, reconnecting first if it died.
    pub(crate) async fn live(&self) -> Result<Live> {
        let mut slot = self.inner.live.lock().await;
        if let Some(live) = slot.as_ref() {
            if live.conn.status().connected() {
                return Ok(live.clone());
            }
            tracing::warn!(
                generation = live.generation,
                "connection to RabbitMQ lost; reconnecting"
            );
        }
        *slot = None;
        let conn = self.reconnect().await?;
        self.inner.closed_by_broker.store(0, Ordering::Release);
        self.inner.opened.store(0, Ordering::Release);
        let generation = self.inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
        if generation > 1 {
            crate::metrics::reconnected();
        }
        let live = Live {
            conn: Arc::new(conn),
            generation,
        };
        *slot = Some(live.clone());
        Ok(live)
    }

    /// Tries every URL with backoff until one answers or the policy gives up.
    ///
    /// A TLS certificate problem ([`Error::Tls`]) is not retried: when every URL of a round
    /// failed on one, the first such error is returned at once.
    async fn reconnect(&self) -> Result<Connection> {
        let cfg = &self.inner.config;
        let policy = &cfg.reconnect;
        let tls = cfg.lapin_tls();
        let started = Instant::now();
        let mut delays = super::publisher::backoff(policy.min_delay, policy.max_delay);
        let mut last: Option<AmqpError> = None;
        loop {
            let mut tls_failure: Option<Error> = None;
            let mut other_failure = false;
            for url in cfg.urls() {
                let props = ConnectionProperties::default().with_connection_name(LongString::from(
                    cfg.connection_name.as_bytes().to_vec(),
                ));
                let attempt = async {
                    let runtime = lapin::runtime::default_runtime()?;
                    Connection::connect_with_config(url.secret(), props, tls.clone(), runtime).await
                };
                match tokio::time::timeout(cfg.connect_timeout, attempt).await {
                    Ok(Ok(conn)) => {
                        tracing::info!(url = %url, "connected to RabbitMQ");
                        return Ok(conn);
                    }
                    Ok(Err(e)) => match tls_problem(&e, url.host_port().as_str()) {
                        Some(reason) => {
                            tracing::warn!(url = %url, %reason, error = %e, "TLS certificate problem");
                            last = Some(AmqpError(e.clone()));
                            tls_failure.get_or_insert(Error::Tls {
                                url: url.redacted().to_owned(),
                                reason,
                                source: Box::new(AmqpError(e)),
                            });
                        }
                        None => {
                            tracing::debug!(url = %url, error = %e, "connect failed");
                            last = Some(AmqpError(e));
                            other_failure = true;
                        }
                    },
                    Err(_) => {
                        tracing::debug!(url = %url, "connect timed out");
                        other_failure = true;
                    }
                }
            }
            if let Some(err) = tls_failure.filter(|_| !other_failure) {
                return Err(err);
            }
            let waited = started.elapsed();
            let delay = delays.next().unwrap_or(policy.max_delay);
            if policy.give_up_after.is_some_and(|max| waited + delay > max) {
                return Err(Error::Unavailable {
                    urls: cfg.redacted_urls(),
                    waited,
                    source: last,
                });
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// Marks the current connection as dead if it is still generation `generation`, so the
    /// next caller reconnects (used when a channel shows the connection is gone).
    pub(crate) async fn invalidate(&self, generation: u64) {
        let stale = {
            let mut slot = self.inner.live.lock().await;
            if slot.as_ref().is_some_and(|l| l.generation == generation) {
                slot.take()
            } else {
                None
            }
        };
        // Closed outside the lock and in the background: a close waits for the broker's
        // close-ok, which a half-dead connection never sends, and every caller of `live`
        // would wait with it.
        if let Some(live) = stale {
            tokio::spawn(
                async move { close_bounded(&live.conn, 320, "warren: reconnecting").await },
            );
        }
    }

    /// Counts a channel of connection `generation` that the broker closed (see
    /// [`RETIRE_AFTER_OPENED`]).
    pub(crate) async fn note_closed(&self, generation: u64) {
        if generation == self.generation() {
            self.inner.closed_by_broker.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Retires connection `generation` when it had channels closed by the broker and its
    /// channel ids are about to come round: callers get a fresh connection from now on, and
    /// the old one is closed after a grace period, so work still running on it (a join's
    /// hold, a confirm in flight) can finish.
    async fn maybe_retire(&self, generation: u64, opened: u32) {
        if opened < RETIRE_AFTER_OPENED || self.inner.closed_by_broker.load(Ordering::Acquire) == 0
        {
            return;
        }
        let mut slot = self.inner.live.lock().await;
        if slot.as_ref().is_none_or(|l| l.generation != generation) {
            return;
        }
        let Some(old) = slot.take() else { return };
        tracing::info!(
            generation,
            opened,
            closed_by_broker = self.inner.closed_by_broker.load(Ordering::Acquire),
            "retiring a connection before its channel ids come round; opening a fresh one"
        );
        tokio::spawn(async move {
            tokio::time::sleep(RETIRED_GRACE).await;
            close_bounded(&old.conn, 200, "warren: retired").await;
        });
    }

    /// Opens a new channel on the live connection.
    pub(crate) async fn channel(&self) -> Result<(Channel, u64)> {
        let live = self.live().await?;
        tracing::trace!(generation = live.generation, "opening a channel");
        let opened = self.inner.opened.fetch_add(1, Ordering::AcqRel) + 1;
        match live.conn.create_channel().await {
            Ok(ch) => {
                self.maybe_retire(live.generation, opened).await;
                Ok((ch, live.generation))
            }
            Err(e) => {
                tracing::warn!(generation = live.generation, error = %e, "could not open a channel; reconnecting");
                self.invalidate(live.generation).await;
                Err(classify("opening a channel", e))
            }
        }
    }

    /// Channels opened on the live connection so far (reset when it is replaced). A figure
    /// for tests and health checks: warren keeps its channels, so on a steady load this
    /// should hardly move.
    #[must_use]
    pub fn channels_opened(&self) -> u32 {
        self.inner.opened.load(Ordering::Acquire)
    }

    /// A channel in confirm mode for a held batch ([`Broker::take_exclusive`]): an idle one
    /// of the live connection if there is one, else a new one. Returns the channel, its
    /// connection generation, and whether it was reused (confirms already on).
    pub(crate) async fn hold_channel(&self) -> Result<(Channel, u64, bool)> {
        let current = self.generation();
        let idle = self.inner.holds.lock().ok().and_then(|mut holds| {
            // Channels of an older connection are dropped (and so closed) here.
            holds.retain(|(ch, g)| *g == current && ch.status().connected());
            holds.pop()
        });
        if let Some((ch, g)) = idle {
            return Ok((ch, g, true));
        }
        let (ch, g) = self.channel().await?;
        Ok((ch, g, false))
    }

    /// Keeps a hold channel for the next batch: it holds no delivery, no consumer and no
    /// unconfirmed publish. Beyond [`HOLD_CHANNELS`] idle ones it is closed instead.
    pub(crate) async fn keep_hold_channel(&self, channel: Channel, generation: u64) {
        let spare = if generation == self.generation() && channel.status().connected() {
            self.inner.holds.lock().ok().and_then(|mut holds| {
                if holds.len() < HOLD_CHANNELS {
                    holds.push((channel, generation));
                    None
                } else {
                    Some(channel)
                }
            })
        } else {
            Some(channel)
        };
        if let Some(channel) = spare {
            let _ = channel.close(200, short("ok")).await;
        }
    }

    /// An ops channel of the live connection (opened if needed).
    async fn ops(&self) -> Result<OpsChannel> {
        let i = self.inner.next_op.fetch_add(1, Ordering::Relaxed) % self.inner.ops.len();
        let mut slot = self.inner.ops[i].clone().lock_owned().await;
        let current = self.generation();
        let reusable = slot
            .as_ref()
            .filter(|(ch, g)| *g == current && ch.status().connected())
            .map(|(ch, _)| ch.clone());
        let (channel, generation) = match reusable {
            Some(ch) => (ch, current),
            None => {
                let (ch, g) = self.channel().await?;
                *slot = Some((ch.clone(), g));
                (ch, g)
            }
        };
        Ok(OpsChannel {
            slot,
            channel,
            generation,
        })
    }

    /// Gives an ops channel back; forgets it if an error closed it (a soft error such as
    /// `NOT_FOUND` closes it), and counts that close.
    async fn finish_ops(&self, mut ops: OpsChannel) {
        if !ops.channel.status().connected() {
            *ops.slot = None;
            drop(ops.slot);
            self.note_closed(ops.generation).await;
        }
    }

    /// Declares warren's exchanges (idempotent; once per connection).
    pub async fn declare_exchanges(&self) -> Result<()> {
        let generation = self.generation();
        if self.inner.exchanges_at.load(Ordering::Acquire) == generation {
            return Ok(());
        }
        let ops = self.ops().await?;
        let res = declare_exchanges_on(&ops.channel).await;
        self.finish_ops(ops).await;
        res?;
        self.inner.exchanges_at.store(generation, Ordering::Release);
        Ok(())
    }

    /// Declares queues (with their bindings), in order.
    pub async fn declare(&self, specs: &[QueueSpec]) -> Result<()> {
        self.declare_exchanges().await?;
        let ops = self.ops().await?;
        let mut res = Ok(());
        for spec in specs {
            res = declare_on(&ops.channel, spec).await.map(|_| ());
            if res.is_err() {
                break;
            }
        }
        self.finish_ops(ops).await;
        res
    }

    /// Declares one queue (with its binding) and returns its counts. Unlike
    /// [`Broker::queue_stats`] on a queue that may be missing, this never has the broker
    /// close the channel (lapin 4.12 stops opening channels on a connection after about
    /// 2,047 broker-closed ones, so hot paths avoid provoking `NOT_FOUND`).
    pub async fn declare_counted(&self, spec: &QueueSpec) -> Result<QueueStats> {
        self.declare_exchanges().await?;
        let ops = self.ops().await?;
        let res = declare_on(&ops.channel, spec).await;
        self.finish_ops(ops).await;
        res
    }

    /// Ready and consumer counts of a queue, or `None` if it does not exist. A durable queue
    /// whose cluster node is down is an error ([`Error::is_node_down`]), not `None`.
    pub async fn queue_stats(&self, queue: &str) -> Result<Option<QueueStats>> {
        check_amqp_len("queue", queue)?;
        let ops = self.ops().await?;
        let res = ops
            .channel
            .queue_declare(
                short(queue),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        self.finish_ops(ops).await;
        match res {
            Ok(q) => Ok(Some(QueueStats {
                ready: q.message_count(),
                consumers: q.consumer_count(),
            })),
            Err(e) => {
                let err = classify(format!("checking queue {queue}"), e);
                match &err {
                    // A durable queue whose node is down exists; it is just not reachable.
                    _ if err.is_node_down() => Err(err),
                    Error::Refused { source, .. } if source.reply_code() == Some(404) => Ok(None),
                    _ => Err(err),
                }
            }
        }
    }

    /// Deletes a queue (no error if it does not exist); returns how many messages it held.
    pub async fn delete_queue(&self, queue: &str) -> Result<u32> {
        check_amqp_len("queue", queue)?;
        let ops = self.ops().await?;
        let res = ops
            .channel
            .queue_delete(short(queue), QueueDeleteOptions::default())
            .await;
        self.finish_ops(ops).await;
        res.map_err(|e| classify(format!("deleting queue {queue}"), e))
    }

    /// Deletes an exchange (no error if it does not exist).
    pub async fn delete_exchange(&self, exchange: &str) -> Result<()> {
        check_amqp_len("exchange", exchange)?;
        let ops = self.ops().await?;
        let res = ops
            .channel
            .exchange_delete(
                short(exchange),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await;
        self.finish_ops(ops).await;
        res.map_err(|e| classify(format!("deleting exchange {exchange}"), e))
    }

    /// Removes every ready message from a queue; returns how many.
    pub async fn purge_queue(&self, queue: &str) -> Result<u32> {
        check_amqp_len("queue", queue)?;
        let ops = self.ops().await?;
        let res = ops
            .channel
            .queue_purge(short(queue), QueuePurgeOptions::default())
            .await;
        self.finish_ops(ops).await;
        res.map_err(|e| classify(format!("purging queue {queue}"), e))
    }

    /// The vhost and user name of the live connection (never the password).
    pub async fn identity(&self) -> Result<(String, String)> {
        let live = self.live().await?;
        let st = live.conn.status();
        Ok((st.vhost().as_str().to_owned(), st.username()))
    }

    /// Closes the connection (pending work on it is abandoned); waits at most 5 s for the
    /// broker to acknowledge the close.
    pub async fn close(&self) {
        let live = self.inner.live.lock().await.take();
        if let Some(live) = live {
            close_bounded(&live.conn, 200, "warren: closing").await;
        }
    }
}

/// Closes `conn`, waiting at most [`CLOSE_TIMEOUT`] for the broker's close-ok.
async fn close_bounded(conn: &Connection, code: u16, text: &str) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(code, short(text))).await;
}

pub(crate) async fn declare_exchanges_on(ch: &Channel) -> Result<()> {
    for (name, kind) in [
        (TASK_EXCHANGE, ExchangeKind::Direct),
        (DEAD_EXCHANGE, ExchangeKind::Direct),
        (TOPIC_EXCHANGE, ExchangeKind::Direct),
        (crate::cancel::CANCEL_EXCHANGE, ExchangeKind::Fanout),
    ] {
        ch.exchange_declare(
            short(name),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| classify(format!("declaring exchange {name}"), e))?;
    }
    // Delayed delivery (crate::delay): the headers exchange every service queue is bound to,
    // and its alternate exchange. The alternate's queue (which keeps a delayed message whose
    // destination queue is gone) is declared with the delay levels, by delayed publishes
    // only: it is a classic queue, and a consumer must not depend on its node being up.
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    ch.exchange_declare(
        short(UNROUTED_EXCHANGE),
        ExchangeKind::Fanout,
        durable,
        FieldTable::default(),
    )
    .await
    .map_err(|e| classify(format!("declaring exchange {UNROUTED_EXCHANGE}"), e))?;
    let mut args = FieldTable::default();
    args.insert(
        short("alternate-exchange"),
        AMQPValue::LongString(UNROUTED_EXCHANGE.into()),
    );
    ch.exchange_declare(
        short(DELIVER_EXCHANGE),
        ExchangeKind::Headers,
        durable,
        args,
    )
    .await
    .map_err(|e| classify(format!("declaring exchange {DELIVER_EXCHANGE}"), e))?;
    Ok(())
}

pub(crate) async fn declare_on(ch: &Channel, spec: &QueueSpec) -> Result<QueueStats> {
    check_amqp_len("queue", &spec.name)?;
    if let Some(x) = &spec.exchange {
        check_amqp_len("exchange", &x.name)?;
        ch.exchange_declare(
            short(&x.name),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| classify(format!("declaring exchange {}", x.name), e))?;
        if let Some((dest, pattern)) = &x.bind_to {
            check_amqp_len("exchange", dest)?;
            check_amqp_len("routing key", pattern)?;
            ch.exchange_bind(
                short(dest),
                short(&x.name),
                short(pattern),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| classify(format!("binding exchange {} to {dest}", x.name), e))?;
        }
    }
    let mut args = FieldTable::default();
    if let Some(t) = spec.queue_type {
        args.insert(
            short("x-queue-type"),
            AMQPValue::LongString(t.as_str().into()),
        );
    }
    if let Some(dlx) = &spec.dead_letter_exchange {
        check_amqp_len("exchange", dlx)?;
        args.insert(
            short("x-dead-letter-exchange"),
            AMQPValue::LongString(dlx.as_str().into()),
        );
    }
    if let Some(key) = &spec.dead_letter_routing_key {
        check_amqp_len("routing key", key)?;
        args.insert(
            short("x-dead-letter-routing-key"),
            AMQPValue::LongString(key.as_str().into()),
        );
    }
    if spec.dead_letter_exchange.is_some() && spec.queue_type == Some(QueueType::Quorum) {
        args.insert(
            short("x-dead-letter-strategy"),
            AMQPValue::LongString("at-least-once".into()),
        );
        args.insert(
            short("x-overflow"),
            AMQPValue::LongString("reject-publish".into()),
        );
    }
    if let Some(ms) = spec.message_ttl_ms {
        args.insert(
            short("x-message-ttl"),
            AMQPValue::LongLongInt(i64::try_from(ms).unwrap_or(i64::MAX)),
        );
    }
    if let Some(limit) = spec.delivery_limit {
        args.insert(short("x-delivery-limit"), AMQPValue::LongLongInt(limit));
    }
    if let Some(max) = spec.max_length {
        args.insert(short("x-max-length"), AMQPValue::LongLongInt(max));
    }
    if let Some(max) = spec.max_priority {
        args.insert(
            short("x-max-priority"),
            AMQPValue::LongLongInt(i64::from(max)),
        );
    }
    if let Some(max) = spec.max_length_reject {
        args.insert(
            short("x-max-length"),
            AMQPValue::LongLongInt(i64::try_from(max).unwrap_or(i64::MAX)),
        );
        args.insert(
            short("x-overflow"),
            AMQPValue::LongString("reject-publish".into()),
        );
    }
    if let Some(ms) = spec.expires_ms {
        args.insert(
            short("x-expires"),
            AMQPValue::LongLongInt(i64::try_from(ms).unwrap_or(i64::MAX)),
        );
    }
    let declared = ch
        .queue_declare(
            short(&spec.name),
            QueueDeclareOptions {
                durable: spec.durable,
                exclusive: spec.exclusive,
                auto_delete: false,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map_err(|e| classify(format!("declaring queue {}", spec.name), e))?;
    let stats = QueueStats {
        ready: declared.message_count(),
        consumers: declared.consumer_count(),
    };
    if let Some((exchange, key)) = &spec.bind {
        check_amqp_len("routing key", key)?;
        let mut bind_args = FieldTable::default();
        if !spec.bind_headers.is_empty() {
            bind_args.insert(short("x-match"), AMQPValue::LongString("all".into()));
            for (k, v) in &spec.bind_headers {
                check_amqp_len("header key", k)?;
                bind_args.insert(short(k), AMQPValue::LongString(v.as_str().into()));
            }
        }
        ch.queue_bind(
            short(&spec.name),
            short(exchange),
            short(key),
            QueueBindOptions::default(),
            bind_args,
        )
        .await
        .map_err(|e| classify(format!("binding queue {}", spec.name), e))?;
    }
    Ok(stats)
}

/// When `err` (from connecting to `host_port`) is a TLS certificate problem, says what is
/// wrong; `None` for every other failure (refused, reset, timed out, not TLS at all, ...).
fn tls_problem(err: &lapin::Error, host_port: &str) -> Option<String> {
    use rustls::{AlertDescription as A, CertificateError as C, Error as T};
    let tls = rustls_error(err)?;
    let host = host_port
        .rsplit_once(':')
        .map_or(host_port, |(host, _)| host);
    let trust = "trust the CA that issued it with WARREN_AMQP_CA_FILE or \
                 AmqpConfig::with_tls_ca_file";
    let reason = match tls {
        T::InvalidCertificate(C::UnknownIssuer) => {
            format!("the server's certificate is not issued by a trusted CA; {trust}")
        }
        T::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => format!(
            "the server's certificate is not valid for the host name {host:?} in the URL \
             (connect with a name listed in its subject alternative names)"
        ),
        T::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        ) => String::from("the server's certificate has expired or is not yet valid"),
        T::InvalidCertificate(C::Revoked) => String::from("the server's certificate is revoked"),
        T::InvalidCertificate(_) => String::from("the server's certificate was rejected"),
        T::NoCertificatesPresented => String::from("the server presented no certificate"),
        T::InvalidCertRevocationList(_) => String::from("a certificate revocation list is invalid"),
        T::AlertReceived(
            A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::CertificateRequired
            | A::AccessDenied,
        ) => String::from(
            "the server refused the client certificate (or wants one: see \
             AmqpConfig::with_tls_client_cert)",
        ),
        // The trust store could not be built (e.g. a CA certificate that does not parse).
        T::General(_) | T::Other(_) => String::from("the TLS trust settings are unusable"),
        _ => return None,
    };
    Some(format!("{reason} ({tls})"))
}

/// The rustls error inside a lapin connect error, if there is one.
fn rustls_error(err: &lapin::Error) -> Option<&rustls::Error> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // `io::Error::source` skips the error it wraps; look at that one directly.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
                return Some(tls);
            }
        }
        next = e.source();
    }
    None
}
