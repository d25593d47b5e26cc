//! Publishing what a task's outcome implies: replies, hooks, retries, dead letters.

use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;
use warren_core::envelope::{now_ms, ReplyOutcome};
use warren_core::topology::{
    is_reply_queue, DEAD_EXCHANGE, H_DEAD_AT, H_ERROR, H_REASON, H_SOURCE_QUEUE,
};
use warren_core::validate::identity;
use warren_core::{
    Envelope, Failure, HeaderValue, Incoming, Outgoing, Reply, Via, ENVELOPE_VERSION,
};

use crate::metrics::MethodMetrics;
use crate::process::{Route, Shared};

/// Answers a waiting invoker, if the message names a warren reply queue.
pub(crate) async fn reply(
    shared: &Shared,
    d: &Incoming,
    env: Option<&Envelope>,
    outcome: ReplyOutcome,
) -> warren_core::Result<()> {
    let Some(reply_to) = d.reply_to().filter(|r| !r.is_empty()) else {
        return Ok(());
    };
    if !is_reply_queue(reply_to) {
        tracing::warn!(
            reply_to,
            "reply_to is not a warren reply queue; not answering"
        );
        return Ok(());
    }
    // A body that is not a valid envelope is answered under the id it names, else under
    // its AMQP message id.
    let (body_id, body_cid) = match env {
        Some(_) => (None, None),
        None => identity(&d.body),
    };
    let id = match env {
        Some(e) => e.id,
        None => match body_id.or_else(|| d.message_id().and_then(|m| Uuid::parse_str(m).ok())) {
            Some(id) => id,
            None => {
                tracing::warn!("the caller cannot be answered: the message has no task id");
                return Ok(());
            }
        },
    };
    let cid = env
        .map(|e| e.cid.clone())
        .or(body_cid)
        .or_else(|| d.correlation_id().map(str::to_owned))
        .unwrap_or_default();
    let body = serde_json::to_vec(&Reply {
        v: ENVELOPE_VERSION,
        id,
        cid: cid.clone(),
        outcome,
    })
    .map_err(warren_core::Error::Json)?;
    let mut msg = Outgoing::new("", reply_to, body);
    msg.persistent = false;
    msg.message_id = Some(id.to_string());
    msg.correlation_id = Some(cid).filter(|c| !c.is_empty() && c.len() <= 255);
    match shared.sender.publisher().publish(&msg).await {
        Err(warren_core::Error::Unroutable { .. }) => {
            tracing::debug!(reply_to, %id, "caller's reply queue is gone; reply dropped");
            match env {
                Some(e) => shared.metrics.of(&e.svc, Some(&e.method)),
                None => shared.metrics.of("", None),
            }
            .reply_dropped();
            Ok(())
        }
        other => other,
    }
}

/// Fires the oncomplete (`ok`) or onerror hook, if the task has one.
pub(crate) async fn hook(
    shared: &Shared,
    env: Option<&Envelope>,
    ok: bool,
    payload: Value,
) -> warren_core::Result<()> {
    let Some(env) = env else { return Ok(()) };
    let target = if ok {
        env.hooks.oncomplete.as_ref()
    } else {
        env.hooks.onerror.as_ref()
    };
    let Some(target) = target else { return Ok(()) };
    let t = warren_core::Target::new(&target.svc, &target.method)?;
    let mut hook = Envelope::new(&t, payload, Some(env.cid.clone()));
    hook.channel = Via::Hook;
    hook.parent = Some(env.id);
    shared
        .sender
        .send(&hook, None, shared.sender.deadline())
        .await
}

/// Publishes the next attempt, to the service queue or through a delay queue.
///
/// The next attempt keeps the caller's `reply_to`, so an invoker waiting on a retried task
/// gets the final outcome.
pub(crate) async fn retry(
    shared: &Shared,
    d: &Incoming,
    env: &Envelope,
    delay: Duration,
) -> warren_core::Result<()> {
    let mut next = env.clone();
    next.attempt = env.attempt.saturating_add(1);
    next.channel = Via::Retry;
    let reply_to = d.reply_to().filter(|r| is_reply_queue(r));
    send_later(shared, &next, delay, reply_to).await
}

/// Publishes a task flow control deferred (docs/flow.md): the same envelope, attempt
/// unchanged, through the delay queues, with the caller's reply queue, its deferral count
/// ([`warren_core::flow::H_DEFERRALS`]) and the start reserved for it, if any
/// ([`warren_core::flow::H_FLOW_SLOT`]).
pub(crate) async fn defer(
    shared: &Shared,
    d: &Incoming,
    env: &Envelope,
    delay: Duration,
    slot_ms: Option<u64>,
) -> warren_core::Result<()> {
    use warren_core::flow::{H_DEFERRALS, H_FLOW_SLOT};
    let reply_to = d.reply_to().filter(|r| is_reply_queue(r));
    let count = crate::flow::deferrals(d).saturating_add(1);
    let mut headers = vec![(H_DEFERRALS.to_owned(), HeaderValue::Int(i64::from(count)))];
    if let Some(ms) = slot_ms {
        headers.push((
            H_FLOW_SLOT.to_owned(),
            HeaderValue::Int(i64::try_from(ms).unwrap_or(i64::MAX)),
        ));
    }
    // A delivery that may have run before (redelivered, or a copy sent again) keeps that
    // mark in its deferred copy, which the broker delivers as new.
    let resent = matches!(
        d.header(warren_core::topology::H_RESENT),
        Some(HeaderValue::Bool(true))
    );
    let marked;
    let env = if (d.redelivered || resent) && !env.resent {
        let mut copy = env.clone();
        copy.resent = true;
        marked = copy;
        &marked
    } else {
        env
    };
    shared
        .sender
        .send_later_with(env, delay, reply_to, &headers, shared.sender.deadline())
        .await
}

/// Sends `env` to its service queue now (`delay` zero) or after `delay`, through the
/// durable wait queue of that delay step.
pub(crate) async fn send_later(
    shared: &Shared,
    env: &Envelope,
    delay: Duration,
    reply_to: Option<&str>,
) -> warren_core::Result<()> {
    shared
        .sender
        .send_later(env, delay, reply_to, shared.sender.deadline())
        .await
}

/// Publishes the original message, byte for byte, to the service's dead-letter queue with
/// the reason in its headers.
pub(crate) async fn dead_letter(
    shared: &Shared,
    route: &Route,
    d: &Incoming,
    m: &MethodMetrics,
    f: &Failure,
) -> warren_core::Result<()> {
    let queue_svc = route.svc.as_str();
    tracing::warn!(reason = f.kind.as_str(), error = %f.message, "dead-lettered");
    // Make sure the dead-letter queue exists (the worker declared it at start; it may have
    // been deleted since).
    shared.sender.ensure_service(queue_svc).await?;
    let mut msg = Outgoing::new(DEAD_EXCHANGE, queue_svc, d.body.clone());
    msg.message_id = d
        .message_id()
        .map(str::to_owned)
        .or_else(|| identity(&d.body).0.map(|id| id.to_string()));
    msg.correlation_id = d.correlation_id().map(str::to_owned);
    let mut error = f.message.clone();
    if error.len() > 4000 {
        let mut cut = 4000;
        while !error.is_char_boundary(cut) {
            cut -= 1;
        }
        error.truncate(cut);
    }
    msg.headers = vec![
        (H_REASON.into(), HeaderValue::Str(f.kind.as_str().into())),
        (H_ERROR.into(), HeaderValue::Str(error)),
        (H_SOURCE_QUEUE.into(), HeaderValue::Str(route.queue.clone())),
        (
            H_DEAD_AT.into(),
            HeaderValue::Int(i64::try_from(now_ms()).unwrap_or(0)),
        ),
    ];
    // A replayed message that dies again keeps its replay count, so operators see it.
    if let Some(n) = d.header(warren_core::topology::H_REPLAYED) {
        msg.headers
            .push((warren_core::topology::H_REPLAYED.to_owned(), n));
    }
    shared.sender.publisher().publish(&msg).await?;
    m.dead_lettered(f.kind);
    Ok(())
}
