//! The reply side of invoke: one reply queue per client and a table of waiting calls.
//!
//! The reply queue `warren.reply.<client id>` is a classic, non-durable queue that expires
//! 60 s after its client stops using it (`x-expires`). It is not exclusive, so after a
//! reconnect the client declares the same queue again and replies that arrived meanwhile are
//! still there; a crashed client's queue disappears by itself.
//!
//! When the cluster node holding the queue dies, the queue and any reply in it are gone. The
//! client declares it again on a node that is up, retrying at most every 250 ms while the
//! broker still refuses (it does until it has noticed the node is down): a reply the
//! worker publishes before then is dropped as unroutable, and its call times out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warren_core::topology::{QueueSpec, REPLY_PREFIX};
use warren_core::{Broker, ConsumerEvent, Reply, Subscription, SubscriptionSpec};

/// How long an unused reply queue lives.
const REPLY_QUEUE_EXPIRES_MS: u64 = 60_000;

type Waiters = Arc<Mutex<HashMap<Uuid, oneshot::Sender<Reply>>>>;

/// The running reply listener of a client.
pub(crate) struct Replies {
    pub(crate) queue: String,
    waiters: Waiters,
    stopped: CancellationToken,
    failure: Arc<Mutex<Option<String>>>,
}

impl Replies {
    /// Declares the reply queue, subscribes and starts routing replies to waiters.
    pub(crate) async fn start(
        broker: Broker,
        client_id: Uuid,
        shutdown: CancellationToken,
    ) -> Result<Self, warren_core::Error> {
        let queue = format!("{REPLY_PREFIX}{client_id}");
        let mut spec = QueueSpec::reply(queue.clone())?;
        spec.exclusive = false;
        spec.expires_ms = Some(REPLY_QUEUE_EXPIRES_MS);
        let mut sub = Subscription::start(
            broker,
            SubscriptionSpec {
                queue: spec,
                also_declare: Vec::new(),
                prefetch: 0,
                no_ack: true,
                max_pause: SubscriptionSpec::SHORT_PAUSE,
            },
        )
        .await?;
        let waiters: Waiters = Arc::default();
        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        let stopped = CancellationToken::new();
        let (w, f, s) = (waiters.clone(), failure.clone(), stopped.clone());
        let cancel = sub.cancel_token();
        tokio::spawn(async move {
            let _stopped = s.drop_guard();
            loop {
                let ev = tokio::select! {
                    () = shutdown.cancelled() => { cancel.cancel(); break }
                    ev = sub.next() => ev,
                };
                match ev {
                    Ok(Some(ConsumerEvent::Delivery(d))) => route(&w, &d.body),
                    Ok(Some(ConsumerEvent::Resubscribed)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "reply listener stopped");
                        if let Ok(mut g) = f.lock() {
                            *g = Some(e.to_string());
                        }
                        break;
                    }
                }
            }
            // Wake every waiter: their senders drop here.
            if let Ok(mut g) = w.lock() {
                g.clear();
            }
            sub.close().await;
        });
        Ok(Self {
            queue,
            waiters,
            stopped,
            failure,
        })
    }

    /// Registers a call before its request is published.
    pub(crate) fn register(&self, id: Uuid) -> Option<oneshot::Receiver<Reply>> {
        if self.stopped.is_cancelled() {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().ok()?.insert(id, tx);
        Some(rx)
    }

    /// Forgets a call (timed out or abandoned).
    pub(crate) fn forget(&self, id: &Uuid) {
        if let Ok(mut g) = self.waiters.lock() {
            g.remove(id);
        }
    }

    /// Why the listener stopped, if it did.
    pub(crate) fn stop_reason(&self) -> String {
        self.failure
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .unwrap_or_else(|| String::from("client shut down"))
    }
}

fn route(waiters: &Waiters, body: &[u8]) {
    let reply: Reply = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a reply that is not a warren reply");
            return;
        }
    };
    let sender = waiters.lock().ok().and_then(|mut g| g.remove(&reply.id));
    match sender {
        Some(tx) => {
            let _ = tx.send(reply);
        }
        None => tracing::debug!(id = %reply.id, "reply for a call nobody waits for (timed out?)"),
    }
}
