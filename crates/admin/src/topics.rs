//! Topics and their subscriptions (what `warren topics` and the web admin's Topics page
//! show), and the last messages of a topic (what `warren peek` shows).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use warren_core::envelope::Envelope;
use warren_core::patterns::utc_timestamp;
use warren_core::status::StatusStore;
use warren_core::topology::{dead_queue, recent_queue};
use warren_core::Broker;

use crate::queues::{classify, QueueKind, QueueRow};
use crate::AdminError;

/// One subscriber of a topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Subscriber {
    /// `svc.method`.
    pub target: String,
    /// Its queue, `warren.sub.<topic>:<svc>:<method>`.
    pub queue: String,
    /// Messages waiting.
    pub pending: Option<u64>,
    /// Messages being handled.
    pub unacked: Option<u64>,
    /// Consumers (workers) attached.
    pub consumers: Option<u64>,
    /// Dead letters of the subscriber's service (all its methods).
    pub dead: Option<u64>,
}

/// A topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Topic {
    /// Its name.
    pub topic: String,
    /// Messages published, counted by the status store (`None` without one).
    pub published: Option<u64>,
    /// Recent messages kept for peek.
    pub recent: Option<u64>,
    /// Its subscribers.
    pub subscribers: Vec<Subscriber>,
}

/// (ready, unacked, consumers) of a queue.
type Counts = (Option<u64>, Option<u64>, Option<u64>);

/// Topics and subscriptions found in `rows` (a listing of warren's queues). With `broker`,
/// the ready and consumer counts of the topic queues and dead-letter queues are read with
/// passive declares, which are exact (a management API or rabbitmqctl figure can lag by
/// seconds); with `store`, the published counters are added.
pub async fn topics(
    rows: &[QueueRow],
    broker: Option<&Broker>,
    store: Option<&dyn StatusStore>,
) -> Result<Vec<Topic>, AdminError> {
    let mut counts: BTreeMap<String, Counts> = rows
        .iter()
        .map(|r| (r.name.clone(), (r.ready, r.unacked, r.consumers)))
        .collect();
    if let Some(b) = broker {
        for r in rows {
            let ours = matches!(
                classify(&r.name),
                QueueKind::Recent(_) | QueueKind::Dead(_) | QueueKind::Subscription { .. }
            );
            if ours {
                if let Some(s) = b.queue_stats(&r.name).await? {
                    let e = counts.entry(r.name.clone()).or_default();
                    e.0 = Some(u64::from(s.ready));
                    e.2 = Some(u64::from(s.consumers));
                }
            }
        }
    }
    let ready = |name: &str| counts.get(name).and_then(|e| e.0);
    let mut topics: BTreeMap<String, Topic> = BTreeMap::new();
    for r in rows {
        match classify(&r.name) {
            QueueKind::Recent(t) => entry(&mut topics, &t).recent = ready(&r.name),
            QueueKind::Subscription { topic, svc, method } => {
                let dead = dead_queue(&svc).ok().and_then(|d| ready(&d));
                let c = counts.get(&r.name).copied().unwrap_or_default();
                entry(&mut topics, &topic).subscribers.push(Subscriber {
                    target: format!("{svc}.{method}"),
                    queue: r.name.clone(),
                    pending: c.0,
                    unacked: c.1,
                    consumers: c.2,
                    dead,
                });
            }
            _ => {}
        }
    }
    if let Some(s) = store {
        for (name, t) in &mut topics {
            t.published = s.counter(&format!("published:{name}")).await.ok().flatten();
        }
    }
    Ok(topics.into_values().collect())
}

fn entry<'a>(topics: &'a mut BTreeMap<String, Topic>, t: &str) -> &'a mut Topic {
    topics.entry(t.to_owned()).or_insert_with(|| Topic {
        topic: t.to_owned(),
        published: None,
        recent: None,
        subscribers: Vec::new(),
    })
}

/// One recent message of a topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Peeked {
    /// The message's task id (`None` when the body is not an envelope).
    pub id: Option<String>,
    /// Its cid.
    pub cid: Option<String>,
    /// When it was published (UTC, ISO 8601).
    pub published_at: Option<String>,
    /// The payload (the raw body as text when it is not an envelope).
    pub payload: Value,
}

/// The last messages of a topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Peek {
    /// The topic.
    pub topic: String,
    /// Messages kept (at most 100).
    pub total: u64,
    /// The last `n` of them, oldest first.
    pub messages: Vec<Peeked>,
}

/// The last `n` messages published to `topic`, read from its recent queue without removing
/// them (taken unacked, then released in their order). `Ok(None)`: nothing was ever
/// published to it.
pub async fn peek(broker: &Broker, topic: &str, n: usize) -> Result<Option<Peek>, AdminError> {
    warren_core::names::validate_name("topic", topic)?;
    let queue = recent_queue(topic);
    let Some(stats) = broker.queue_stats(&queue).await? else {
        return Ok(None);
    };
    let total = stats.ready as usize;
    let batch = if total == 0 {
        None
    } else {
        broker
            .take(&queue, total, Duration::from_millis(500), |b| {
                b.len() >= total
            })
            .await?
    };
    let bodies = batch.as_ref().map(|b| b.bodies.clone()).unwrap_or_default();
    if let Some(b) = batch {
        b.release().await;
    }
    let skip = bodies.len().saturating_sub(n);
    let messages = bodies[skip..]
        .iter()
        .map(|b| match Envelope::from_bytes(b) {
            Ok(env) => Peeked {
                id: Some(env.id.to_string()),
                cid: Some(env.cid),
                published_at: Some(utc_timestamp(env.created_ms)),
                payload: env.payload,
            },
            Err(_) => Peeked {
                id: None,
                cid: None,
                published_at: None,
                payload: Value::String(String::from_utf8_lossy(b).into_owned()),
            },
        })
        .collect();
    Ok(Some(Peek {
        topic: topic.to_owned(),
        total: total as u64,
        messages,
    }))
}
