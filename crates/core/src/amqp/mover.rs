//! [`DelayMover`]: moves due delayed messages from [`DUE_QUEUE`] into their service queues.
//!
//! The last level of the delay cascade dead-letters into the classic [`DUE_QUEUE`] (see
//! [`crate::delay`]). Every worker runs one mover: it consumes that queue and, for each
//! message, publishes it to the queue its `warren-dest` header names with a confirm
//! ([`TaskSender::deliver_due`]) and only then acks it. A crash in between delivers the
//! message again (a duplicate of the same task id, at least once); nothing is dropped when
//! a quorum service queue has no leader for a moment, which is what a direct
//! dead-lettering hop into it does.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::broker::Broker;
use super::consumer::{ConsumerEvent, Subscription, SubscriptionSpec};
use super::sender::TaskSender;
use crate::delay::{due_spec, DUE_QUEUE};

/// Due messages a mover has in hand at once (its prefetch and its publishes in flight).
pub const MOVER_PREFETCH: u16 = 128;

/// A consumer of [`DUE_QUEUE`] that publishes every due message to its service queue.
pub struct DelayMover {
    sub: Subscription,
    sender: TaskSender,
}

impl DelayMover {
    /// A mover consuming [`DUE_QUEUE`] on `broker` (declared and subscribed when it runs)
    /// and publishing through `sender`.
    #[must_use]
    pub fn new(broker: Broker, sender: TaskSender) -> Self {
        let spec = SubscriptionSpec {
            queue: due_spec(),
            also_declare: Vec::new(),
            prefetch: MOVER_PREFETCH,
            no_ack: false,
            max_pause: SubscriptionSpec::PAUSE,
        };
        Self {
            sub: Subscription::lazy(broker, spec),
            sender,
        }
    }

    /// Moves due messages until `stop` is cancelled, then waits for the moves in flight.
    /// A move that fails (its publish not confirmed by the publish timeout) puts the message
    /// back in [`DUE_QUEUE`]; a lost channel does the same by itself.
    pub async fn run(mut self, stop: CancellationToken) {
        let slots = Arc::new(Semaphore::new(usize::from(MOVER_PREFETCH)));
        let moving = TaskTracker::new();
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => break,
                e = self.sub.next() => e,
            };
            let delivery = match event {
                Ok(Some(ConsumerEvent::Delivery(d))) => d,
                Ok(Some(ConsumerEvent::Resubscribed)) => continue,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(queue = DUE_QUEUE, error = %e, "the delay mover stopped");
                    break;
                }
            };
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let sender = self.sender.clone();
            moving.spawn(async move {
                let _slot = slot;
                let moved = sender.deliver_due(&delivery, sender.deadline()).await;
                let settled = match &moved {
                    Ok(()) => delivery.ack().await,
                    Err(_) => delivery.reject(true).await,
                };
                match (moved, settled) {
                    (Ok(()), Ok(true)) => {}
                    (Ok(()), _) => tracing::warn!(
                        id = ?delivery.message_id(),
                        "a moved due message could not be acked; it will be moved again (a duplicate)"
                    ),
                    (Err(e), _) => tracing::warn!(
                        id = ?delivery.message_id(),
                        error = %e,
                        "moving a due message failed; it goes back to the due queue"
                    ),
                }
            });
        }
        moving.close();
        moving.wait().await;
        self.sub.close().await;
    }
}
