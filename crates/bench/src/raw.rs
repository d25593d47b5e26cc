//! Raw lapin building blocks: what a careful user would write without warren.

use anyhow::{bail, Context as _};
use futures_util::stream::{FuturesUnordered, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
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
    let one = || async move {
        let confirm = ch
            .basic_publish(
                short(exchange),
                short(routing_key),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                props.clone(),
            )
            .await?;
        check_confirm(confirm.await)
    };
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

/// Declares a durable queue of `queue_type`, as warren declares its service queues.
pub async fn declare_queue(ch: &Channel, name: &str, queue_type: QueueType) -> anyhow::Result<()> {
    let mut args = FieldTable::default();
    args.insert(
        short("x-queue-type"),
        AMQPValue::LongString(queue_type.as_str().into()),
    );
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
