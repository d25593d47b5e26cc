//! Raw lapin building blocks: what a careful user would write without warren.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::stream::{FuturesUnordered, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use tokio::task::JoinHandle;
use warren_core::QueueType;

/// Publishes `n` copies of `body` (persistent, mandatory, confirmed), up to `in_flight`
/// pipelined: each sends its frames and awaits its confirm.
pub async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: &BasicProperties,
    n: u64,
    in_flight: usize,
) -> anyhow::Result<()> {
    let one = || publish_one(ch, exchange, routing_key, body, props.clone());
    let mut pending = FuturesUnordered::new();
    for _ in 0..n {
        pending.push(one());
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

/// Publishes one mandatory message (persistent or not, as `props` say) and waits for its
/// confirm.
pub async fn publish_one(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> anyhow::Result<()> {
    let confirm = ch
        .basic_publish(
            short(exchange),
            short(routing_key),
            mandatory(),
            body,
            props,
        )
        .await?;
    check_confirm(confirm.await)
}

/// Publish options of every raw publish: mandatory (an unroutable message comes back).
pub fn mandatory() -> BasicPublishOptions {
    BasicPublishOptions {
        mandatory: true,
        immediate: false,
    }
}

/// Properties of a persistent JSON message.
pub fn persistent_json() -> BasicProperties {
    BasicProperties::default()
        .with_content_type(short("application/json"))
        .with_delivery_mode(2)
}

/// A lapin short string (callers pass names already known to fit in 255 bytes).
pub fn short(s: &str) -> ShortString {
    ShortString::from(s)
}

/// A plain lapin connection (no auto-recovery: the bench wants failures to show).
pub async fn connect(url: &str, name: &str) -> anyhow::Result<Connection> {
    let props = ConnectionProperties::default()
        .with_connection_name(LongString::from(name.as_bytes().to_vec()));
    Connection::connect(url, props)
        .await
        .context("raw lapin could not connect")
}

/// A channel in confirm mode.
pub async fn confirm_channel(conn: &Connection) -> anyhow::Result<Channel> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

/// Closes every connection of `conns`, ignoring errors (the run is over either way).
pub async fn close_all(conns: &[Connection]) {
    for c in conns {
        let _ = c.close(200, short("bye")).await;
    }
}

/// Declares a durable queue of `queue_type`, as warren declares its service queues.
pub async fn declare_queue(ch: &Channel, name: &str, queue_type: QueueType) -> anyhow::Result<()> {
    declare_expiring(ch, name, queue_type, None).await
}

/// Declares a durable queue of `queue_type` that the broker deletes once unused for
/// `expires` (`x-expires`), or never with `None`.
pub async fn declare_expiring(
    ch: &Channel,
    name: &str,
    queue_type: QueueType,
    expires: Option<Duration>,
) -> anyhow::Result<()> {
    let mut args = FieldTable::default();
    args.insert(
        short("x-queue-type"),
        AMQPValue::LongString(queue_type.as_str().into()),
    );
    if let Some(e) = expires {
        args.insert(
            short("x-expires"),
            AMQPValue::LongLongInt(i64::try_from(e.as_millis()).unwrap_or(i64::MAX)),
        );
    }
    ch.queue_declare(
        short(name),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await
    .with_context(|| format!("declaring {name}"))?;
    Ok(())
}

/// A consumer of `queue` on `ch` that acks what it gets (with `no_ack`, the broker counts
/// every delivery as acked).
pub async fn consume(
    ch: &Channel,
    queue: &str,
    tag: &str,
    no_ack: bool,
) -> anyhow::Result<Consumer> {
    ch.basic_consume(
        short(queue),
        short(tag),
        BasicConsumeOptions {
            no_ack,
            ..BasicConsumeOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .with_context(|| format!("consuming {queue}"))
}

/// When the first and the last of a consumer's acks went through.
#[derive(Debug, Clone, Copy)]
pub struct AckSpan {
    /// The first ack.
    pub first: Instant,
    /// The last ack.
    pub last: Instant,
}

/// Takes `n` deliveries from `consumer` and acks each, the acks in flight concurrently (each
/// delivery acked on its own, as warren does, so the consumer does not wait for one ack
/// frame to be written before the next), counting them in `acked`; the task returns when
/// its `n`-th ack is through.
pub fn ack_n(
    mut consumer: Consumer,
    n: u64,
    acked: Arc<AtomicU64>,
) -> JoinHandle<anyhow::Result<AckSpan>> {
    tokio::spawn(async move {
        if n == 0 {
            let now = Instant::now();
            return Ok(AckSpan {
                first: now,
                last: now,
            });
        }
        let (mut received, mut done, mut first) = (0u64, 0u64, None);
        let mut acks = FuturesUnordered::new();
        loop {
            tokio::select! {
                d = consumer.next(), if received < n => {
                    let d = d.context("the consumer stream ended")??;
                    received += 1;
                    acks.push(async move { d.acker.ack(BasicAckOptions::default()).await });
                }
                Some(r) = acks.next() => {
                    if !r? {
                        bail!("ack not delivered");
                    }
                    acked.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    let first = *first.get_or_insert(now);
                    done += 1;
                    if done == n {
                        return Ok(AckSpan { first, last: now });
                    }
                }
            }
        }
    })
}

/// A confirm counts only as an ack without a returned message.
pub fn check_confirm(c: lapin::Result<Confirmation>) -> anyhow::Result<()> {
    match c.context("waiting for a publisher confirm")? {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r)) => {
            bail!("message returned: {}", r.reply_text.as_str())
        }
        Confirmation::Nack(None) => bail!("message nacked by the broker"),
        Confirmation::NotRequested => bail!("publisher confirms are not enabled"),
    }
}

/// A JSON body of exactly `len` bytes (at least 8), so raw messages weigh what warren's
/// envelopes weigh.
pub fn body_of_len(len: usize) -> Vec<u8> {
    format!("{{\"p\":\"{}\"}}", "x".repeat(len.saturating_sub(8))).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_asked_length_and_is_json() {
        for len in [8, 100, 377] {
            let b = body_of_len(len);
            assert_eq!(b.len(), len);
            assert!(serde_json::from_slice::<serde_json::Value>(&b).is_ok());
        }
    }
}
