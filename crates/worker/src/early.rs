//! Long handlers and the broker's `consumer_timeout`: deliveries **acked early**.
//!
//! RabbitMQ closes a consumer's channel when one of its deliveries stays unacked longer than
//! `consumer_timeout` (node-wide, 30 min by default in 3.10), and requeues every unacked
//! delivery of that channel: a long task would run twice, and the other tasks of the channel
//! would be disturbed. A worker therefore acks a delivery whose handler is still running
//! `WorkerBuilder::consumer_timeout` minus a margin after the delivery arrived, and tracks
//! the task itself from then on: its outcome (reply, hooks, retry, dead letter) is published
//! as usual; what would have been a requeue publishes the original message to its queue
//! again ([`EarlyAcked::republish`]), marked `warren-resent`. A graceful shutdown that
//! abandons such a task at its drain timeout republishes it too ([`EarlyAcks::republish_all`]).
//! A worker that crashes after the early ack loses that run: from the early ack on, the
//! task is at most once (docs/time.md).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use warren_core::{Incoming, Outgoing, Publisher};

use crate::process::{Route, Shared};

/// How often a republish is tried before the task is given up as lost.
const REPUBLISH_TRIES: u32 = 5;

/// The copies of the deliveries acked early whose handlers still run, to publish again if
/// their outcome cannot be published or the worker stops before they end.
#[derive(Default)]
pub(crate) struct EarlyAcks {
    next: AtomicU64,
    copies: Mutex<HashMap<u64, Outgoing>>,
}

impl EarlyAcks {
    fn insert(&self, copy: Outgoing) -> u64 {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut c) = self.copies.lock() {
            c.insert(key, copy);
        }
        key
    }

    fn take(&self, key: u64) -> Option<Outgoing> {
        self.copies.lock().ok().and_then(|mut c| c.remove(&key))
    }

    /// How many tasks acked early are still running.
    pub(crate) fn len(&self) -> usize {
        self.copies.lock().map_or(0, |c| c.len())
    }

    /// Publishes every task acked early that is still running back to its queue (a worker
    /// that stops without waiting for them, at its drain timeout); returns how many were
    /// published. A task republished here runs again (`ctx.redelivered()`), even if the
    /// abandoned run finishes after all.
    pub(crate) async fn republish_all(&self, publisher: &Publisher) -> usize {
        let copies: Vec<Outgoing> = self
            .copies
            .lock()
            .map(|mut c| c.drain().map(|(_, v)| v).collect())
            .unwrap_or_default();
        let mut sent = 0;
        for copy in copies {
            if publish(publisher, &copy).await {
                sent += 1;
            }
        }
        sent
    }
}

/// A delivery acked early: its copy stays registered until this is dropped (the task's
/// outcome settled).
pub(crate) struct EarlyAcked<'a> {
    acks: &'a EarlyAcks,
    key: u64,
}

impl EarlyAcked<'_> {
    /// Publishes the original message to its queue again (it can no longer be requeued):
    /// the task runs again, seen as `ctx.redelivered()`. Done once, by whichever of this
    /// and a shutdown's [`EarlyAcks::republish_all`] comes first.
    pub(crate) async fn republish(&self, shared: &Shared) {
        if let Some(copy) = self.acks.take(self.key) {
            publish(shared.sender.publisher(), &copy).await;
        }
    }
}

impl Drop for EarlyAcked<'_> {
    fn drop(&mut self) {
        let _ = self.acks.take(self.key);
    }
}

async fn publish(publisher: &Publisher, copy: &Outgoing) -> bool {
    for n in 0..REPUBLISH_TRIES {
        match publisher.publish(copy).await {
            Ok(()) => {
                tracing::info!(queue = %copy.routing_key, id = ?copy.message_id, "task acked early published again to its queue");
                return true;
            }
            Err(e) if n + 1 < REPUBLISH_TRIES => {
                tracing::warn!(error = %e, "could not publish a task acked early again; retrying");
                tokio::time::sleep(crate::settle::MAX_PAUSE).await;
            }
            Err(e) => {
                tracing::error!(error = %e, queue = %copy.routing_key, id = ?copy.message_id, "could not publish a task acked early again: this run of it is lost");
            }
        }
    }
    false
}

/// The original message as a new publish to the queue it came from (default exchange),
/// byte for byte, with its properties and headers (but the broker's own delivery
/// bookkeeping) and `warren-resent: true`.
fn copy_of(route: &Route, d: &Incoming) -> Outgoing {
    let mut copy = Outgoing::new("", route.queue.clone(), d.body.clone());
    copy.message_id = d.message_id().map(str::to_owned);
    copy.correlation_id = d.correlation_id().map(str::to_owned);
    copy.reply_to = d.reply_to().map(str::to_owned);
    copy.priority = d.priority();
    copy.headers = d
        .headers()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("x-death") && !k.starts_with("x-delivery-count"))
        .collect();
    copy.mark_resent();
    copy
}

/// Runs `work` (the handler and the publishing of its outcome). If it is still running at
/// `ack_by`, acks the delivery then and registers its copy; the result says whether it did.
pub(crate) async fn guard<'a, F: Future>(
    shared: &'a Shared,
    route: &Route,
    d: &Incoming,
    ack_by: Option<tokio::time::Instant>,
    work: F,
) -> (F::Output, Option<EarlyAcked<'a>>) {
    let Some(at) = ack_by else {
        return (work.await, None);
    };
    tokio::pin!(work);
    tokio::select! {
        // The work first: when it is done at its first poll, no timer is armed.
        biased;
        out = &mut work => return (out, None),
        () = tokio::time::sleep_until(at) => {}
    }
    // Registered before the ack, so a shutdown never misses it.
    let key = shared.early.insert(copy_of(route, d));
    let early = EarlyAcked {
        acks: &shared.early,
        key,
    };
    let early = match d.ack_sent().await {
        Ok(true) => {
            tracing::warn!(
                "still running near the broker's consumer_timeout: acked early; \
                 this worker now tracks the task (a crash of it loses this run)"
            );
            Some(early)
        }
        Ok(false) => {
            tracing::warn!(
                "early ack not delivered (channel closed); the broker will redeliver the task"
            );
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "early ack failed; the broker will redeliver the task");
            None
        }
    };
    (work.await, early)
}
