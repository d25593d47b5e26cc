//! Operator tools on top of warren-core: the dead letters of a service, listed and replayed.
//!
//! - [`DeadLetterOps::dead_letters`] reads `warren.dead.<svc>` by holding its messages
//!   ([`Broker::hold`]) and hands back each dead letter parsed ([`DeadLetter`]), leaving the
//!   queue as it was.
//! - [`DeadLetterOps::replay_dead_letters`] republishes dead letters to the queue they came
//!   from through a confirmed, mandatory [`Publisher`], and removes each dead letter only
//!   after its republish was confirmed: an interruption can duplicate a task, never lose one.
//!
//! The `warren` command (`warren dead list|replay`) and operator tools use it; workers and
//! clients do not need it.

use warren_core::amqp::HeldMessage;
use warren_core::names::check_amqp_len;
pub use warren_core::topology::H_REPLAYED;
use warren_core::topology::{
    dead_queue, service_queue, H_DEAD_AT, H_ERROR, H_REASON, H_SOURCE_QUEUE,
};
use warren_core::{Broker, Error, HeaderValue, Outgoing, Publisher, Result};

/// Headers of a dead letter that describe its death; a replay does not carry them over.
const DEATH_HEADERS: [&str; 8] = [
    H_REASON,
    H_ERROR,
    H_SOURCE_QUEUE,
    H_DEAD_AT,
    H_REPLAYED,
    "x-death",
    "x-delivery-count",
    "x-first-death-queue",
];

/// `true` for a header a replay drops (see [`DEATH_HEADERS`]; also RabbitMQ's
/// `x-first-death-*` and `x-last-death-*`).
fn is_death_header(key: &str) -> bool {
    DEATH_HEADERS.contains(&key)
        || key.starts_with("x-first-death-")
        || key.starts_with("x-last-death-")
}

/// A dead letter of a service, parsed.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Position in the dead-letter queue (0 = oldest).
    pub index: usize,
    /// The task id: the `message_id`, else the `id` of the envelope in the body.
    pub task_id: Option<String>,
    /// The cid: the `correlation_id`, else the `cid` of the envelope in the body.
    pub cid: Option<String>,
    /// `svc.method` of the envelope in the body, when the body is one.
    pub target: Option<String>,
    /// `x-warren-reason`, or `broker:<reason>` for a message the broker dead-lettered.
    pub reason: Option<String>,
    /// `x-warren-error`, or a description of the broker's `x-death` entry.
    pub error: Option<String>,
    /// `x-warren-source-queue`, or the queue of the broker's `x-death` entry.
    pub source_queue: Option<String>,
    /// `x-warren-dead-at-ms` (or the `x-death` time), ms since the Unix epoch.
    pub dead_at_ms: Option<i64>,
    /// `x-warren-replayed`: how many times this message was replayed before (0: never).
    pub replayed: i64,
    /// `true` when the broker dead-lettered it (`x-death`), not a worker.
    pub by_broker: bool,
    /// `true` when it was delivered before (an earlier listing, for example).
    pub redelivered: bool,
    /// Every header, as read.
    pub headers: Vec<(String, HeaderValue)>,
    /// The original message body, byte for byte.
    pub body: Vec<u8>,
}

impl DeadLetter {
    /// Parses a held message of a dead-letter queue.
    #[must_use]
    pub fn parse(index: usize, m: &HeldMessage) -> Self {
        let env: Option<serde_json::Value> = serde_json::from_slice(&m.body).ok();
        let env_str = |k: &str| {
            env.as_ref()
                .and_then(|e| e.get(k))
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        };
        let target = match (env_str("svc"), env_str("method")) {
            (Some(s), Some(me)) => Some(format!("{s}.{me}")),
            _ => None,
        };
        let header_str = |k: &str| m.header(k).and_then(|v| v.as_str().map(str::to_owned));
        let death = m.broker_death();
        let by_broker = death.is_some() && m.header(H_REASON).is_none();
        let (reason, error, source_queue, dead_at_ms) = match (&death, by_broker) {
            (Some(d), true) => (
                Some(format!(
                    "broker:{}",
                    d.reason.as_deref().unwrap_or("unknown")
                )),
                Some(format!(
                    "dead-lettered by RabbitMQ from {} ({}{})",
                    d.queue.as_deref().unwrap_or("?"),
                    d.reason.as_deref().unwrap_or("no reason given"),
                    d.count
                        .map(|c| format!(", {c} time(s)"))
                        .unwrap_or_default()
                )),
                d.queue.clone(),
                d.at_ms,
            ),
            _ => (
                header_str(H_REASON),
                header_str(H_ERROR),
                header_str(H_SOURCE_QUEUE),
                m.header(H_DEAD_AT).and_then(|v| v.as_int()),
            ),
        };
        Self {
            index,
            task_id: m.message_id().map(str::to_owned).or_else(|| env_str("id")),
            cid: m
                .correlation_id()
                .map(str::to_owned)
                .or_else(|| env_str("cid")),
            target,
            reason,
            error,
            source_queue,
            dead_at_ms,
            replayed: m.header(H_REPLAYED).and_then(|v| v.as_int()).unwrap_or(0),
            by_broker,
            redelivered: m.redelivered,
            headers: m.headers(),
            body: m.body.clone(),
        }
    }

    /// Where a replay sends it: its source queue, else `warren.svc.<svc>`.
    pub fn destination(&self, svc: &str) -> Result<String> {
        match self.source_queue.as_deref().filter(|q| !q.is_empty()) {
            Some(q) => {
                check_amqp_len("source queue", q)?;
                Ok(q.to_owned())
            }
            None => Ok(service_queue(svc)?),
        }
    }

    /// The message a replay publishes: the same body, `message_id` and `correlation_id`,
    /// to the default exchange with the destination queue as routing key, persistent, with
    /// the original headers minus the ones describing its death, plus
    /// [`H_REPLAYED`] = previous count + 1. (`reply_to` is not kept: whoever waited for
    /// the reply gave up long ago.)
    pub fn replay_message(&self, svc: &str) -> Result<Outgoing> {
        let mut msg = Outgoing::new("", self.destination(svc)?, self.body.clone());
        msg.message_id.clone_from(&self.task_id);
        msg.correlation_id.clone_from(&self.cid);
        msg.headers = self
            .headers
            .iter()
            .filter(|(k, v)| !is_death_header(k) && !matches!(v, HeaderValue::Other(_)))
            .cloned()
            .collect();
        msg.headers.push((
            H_REPLAYED.to_owned(),
            HeaderValue::Int(self.replayed.saturating_add(1)),
        ));
        Ok(msg)
    }
}

/// The dead letters of a service, read without removing them.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    /// `warren.dead.<svc>`.
    pub queue: String,
    /// Ready dead letters in the queue when it was read.
    pub total: u32,
    /// The first of them (up to the limit), oldest first.
    pub letters: Vec<DeadLetter>,
}

/// Which dead letters to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplaySelection {
    /// Every dead letter in the queue when the replay starts.
    All,
    /// The dead letters with these task ids (each must be present, else nothing is
    /// replayed).
    Ids(Vec<String>),
}

/// One dead letter replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// Its task id, if it has one.
    pub task_id: Option<String>,
    /// Its cid, if it has one.
    pub cid: Option<String>,
    /// The queue it was republished to.
    pub destination: String,
    /// Its [`H_REPLAYED`] value now.
    pub replay_count: i64,
}

/// One selected dead letter that was not replayed cleanly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayFailure {
    /// Its task id, if it has one.
    pub task_id: Option<String>,
    /// Where it was to go.
    pub destination: Option<String>,
    /// What went wrong.
    pub error: String,
    /// `true` when the republish was confirmed but the dead letter could not be removed
    /// afterwards: it is still (or again) a dead letter, and replaying it again will run
    /// the task twice.
    pub published: bool,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// `warren.dead.<svc>`.
    pub queue: String,
    /// Dead letters looked at.
    pub looked_at: usize,
    /// Replayed and removed from the dead-letter queue, in queue order.
    pub replayed: Vec<Replayed>,
    /// Dead letters not selected, left in place.
    pub skipped: usize,
    /// Selected but not replayed (still dead letters), or replayed but not removed.
    pub failed: Vec<ReplayFailure>,
    /// Ids asked for that no dead letter has; when not empty, nothing was replayed.
    pub unmatched: Vec<String>,
    /// `true` when the replay stopped early (the connection died): dead letters not
    /// reached are still in the queue.
    pub interrupted: bool,
}

/// Dead-letter listing and replay on a [`Broker`] (what `warren dead list|replay` runs).
pub trait DeadLetterOps {
    /// See [`Broker`]'s implementation.
    fn dead_letters(
        &self,
        svc: &str,
        limit: Option<usize>,
    ) -> impl std::future::Future<Output = Result<Option<DeadLetters>>> + Send;

    /// See [`Broker`]'s implementation.
    fn replay_dead_letters(
        &self,
        publisher: &Publisher,
        svc: &str,
        selection: &ReplaySelection,
    ) -> impl std::future::Future<Output = Result<Option<ReplayReport>>> + Send;

    /// Like [`DeadLetterOps::replay_dead_letters`], calling `progress(done, selected)` after
    /// each selected dead letter was handled (replayed or failed), e.g. to drive a progress
    /// bar.
    fn replay_dead_letters_with_progress(
        &self,
        publisher: &Publisher,
        svc: &str,
        selection: &ReplaySelection,
        progress: &(dyn Fn(usize, usize) + Send + Sync),
    ) -> impl std::future::Future<Output = Result<Option<ReplayReport>>> + Send;
}

impl DeadLetterOps for Broker {
    /// The dead letters of `svc`, oldest first, at most `limit` (`None`: all), read with
    /// [`Broker::hold`] and released: the queue keeps them, in the same order. `Ok(None)`
    /// when `warren.dead.<svc>` does not exist.
    ///
    /// The whole queue is held (and read into memory) even with a limit: on a quorum queue
    /// RabbitMQ puts a requeued message behind the ones still in the queue, so releasing
    /// only the first few would move them to the end.
    async fn dead_letters(&self, svc: &str, limit: Option<usize>) -> Result<Option<DeadLetters>> {
        let queue = dead_queue(svc)?;
        let Some(held) = self.hold(&queue, None).await? else {
            return Ok(None);
        };
        let letters = held
            .messages
            .iter()
            .take(limit.unwrap_or(usize::MAX))
            .enumerate()
            .map(|(i, m)| DeadLetter::parse(i, m))
            .collect();
        let total = u32::try_from(held.messages.len()).unwrap_or(u32::MAX);
        held.release().await?;
        Ok(Some(DeadLetters {
            queue,
            total,
            letters,
        }))
    }

    /// Republishes dead letters of `svc` to the queue each came from, with `publisher`
    /// (confirmed, mandatory), and removes each from `warren.dead.<svc>` only after its
    /// republish was confirmed. Dead letters not selected, and those whose republish
    /// failed, stay where they were, in order.
    ///
    /// Nothing is lost if the process or connection dies midway: a dead letter is removed
    /// only after its copy is safely in the destination queue. Dying between the confirm
    /// and the removal leaves both; the copy carries [`H_REPLAYED`], and replaying the
    /// dead letter again runs the task twice.
    ///
    /// With [`ReplaySelection::Ids`], every id must match a dead letter, else nothing is
    /// replayed and [`ReplayReport::unmatched`] lists the others. `Ok(None)` when
    /// `warren.dead.<svc>` does not exist.
    async fn replay_dead_letters(
        &self,
        publisher: &Publisher,
        svc: &str,
        selection: &ReplaySelection,
    ) -> Result<Option<ReplayReport>> {
        self.replay_dead_letters_with_progress(publisher, svc, selection, &|_, _| {})
            .await
    }

    /// See [`DeadLetterOps::replay_dead_letters_with_progress`].
    async fn replay_dead_letters_with_progress(
        &self,
        publisher: &Publisher,
        svc: &str,
        selection: &ReplaySelection,
        progress: &(dyn Fn(usize, usize) + Send + Sync),
    ) -> Result<Option<ReplayReport>> {
        let queue = dead_queue(svc)?;
        let Some(held) = self.hold(&queue, None).await? else {
            return Ok(None);
        };
        let letters: Vec<DeadLetter> = held
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| DeadLetter::parse(i, m))
            .collect();
        let mut report = ReplayReport {
            queue: queue.clone(),
            looked_at: letters.len(),
            ..ReplayReport::default()
        };
        let selected: Vec<bool> = match selection {
            ReplaySelection::All => vec![true; letters.len()],
            ReplaySelection::Ids(ids) => {
                let mut unmatched: Vec<String> = Vec::new();
                for id in ids {
                    let found = letters.iter().any(|l| l.task_id.as_deref() == Some(id));
                    if !found && !unmatched.contains(id) {
                        unmatched.push(id.clone());
                    }
                }
                if !unmatched.is_empty() {
                    report.unmatched = unmatched;
                    report.skipped = letters.len();
                    held.release().await?;
                    return Ok(Some(report));
                }
                letters
                    .iter()
                    .map(|l| l.task_id.as_ref().is_some_and(|t| ids.contains(t)))
                    .collect()
            }
        };
        report.skipped = selected.iter().filter(|s| !**s).count();
        let total = letters.len() - report.skipped;
        progress(0, total);
        for (letter, _) in letters.iter().zip(&selected).filter(|(_, s)| **s) {
            progress(report.replayed.len() + report.failed.len(), total);
            if !held.is_live() {
                report.interrupted = true;
                break;
            }
            let fail =
                |destination: Option<String>, error: String, published: bool| ReplayFailure {
                    task_id: letter.task_id.clone(),
                    destination,
                    error,
                    published,
                };
            let msg = match letter.replay_message(svc) {
                Ok(m) if m.routing_key == queue => {
                    report.failed.push(fail(
                        Some(m.routing_key),
                        String::from("its source queue is the dead-letter queue itself"),
                        false,
                    ));
                    continue;
                }
                Ok(m) => m,
                Err(e) => {
                    report.failed.push(fail(None, e.to_string(), false));
                    continue;
                }
            };
            if let Err(e) = publisher.publish(&msg).await {
                let error = match e {
                    Error::Unroutable { .. } => format!(
                        "queue {} does not exist (a worker declares its queues when it \
                         starts; start one, then replay again)",
                        msg.routing_key
                    ),
                    other => other.to_string(),
                };
                report
                    .failed
                    .push(fail(Some(msg.routing_key.clone()), error, false));
                continue;
            }
            match held.ack(letter.index).await {
                Ok(true) => report.replayed.push(Replayed {
                    task_id: letter.task_id.clone(),
                    cid: letter.cid.clone(),
                    destination: msg.routing_key,
                    replay_count: letter.replayed.saturating_add(1),
                }),
                other => {
                    let why = match other {
                        Err(e) => e.to_string(),
                        Ok(_) => String::from("the channel holding it closed"),
                    };
                    report.failed.push(fail(
                        Some(msg.routing_key),
                        format!("republished, but the dead letter could not be removed: {why}"),
                        true,
                    ));
                    report.interrupted = true;
                    break;
                }
            }
        }
        progress(report.replayed.len() + report.failed.len(), total);
        if let Err(e) = held.release().await {
            // The acks may not have reached the broker: the dead letters counted as replayed
            // may still be there, and replaying them again would duplicate their tasks.
            tracing::warn!(error = %e, "releasing the dead-letter queue failed");
            for r in report.replayed.drain(..) {
                report.failed.push(ReplayFailure {
                    task_id: r.task_id,
                    destination: Some(r.destination),
                    error: format!(
                        "republished, but removing the dead letter may not have reached the \
                         broker: {e}"
                    ),
                    published: true,
                });
            }
            report.interrupted = true;
        }
        Ok(Some(report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn death_headers_are_recognised() {
        assert!(is_death_header("x-warren-reason"));
        assert!(is_death_header("x-death"));
        assert!(is_death_header("x-first-death-reason"));
        assert!(is_death_header("x-last-death-exchange"));
        assert!(is_death_header(H_REPLAYED));
        assert!(!is_death_header("warren-job"));
    }
}
