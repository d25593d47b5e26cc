//! What happens to one delivery: decode, dispatch, run, publish the outcome, ack.
//!
//! The ack is always last: it is sent only after everything the outcome implies (reply,
//! retry, dead letter, hook) was published and confirmed. If one of those publishes fails,
//! the delivery is requeued instead, and the task runs again later (at-least-once).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use serde_json::{json, Value};
use tracing::Instrument;
use uuid::Uuid;
use warren_client::Client;
use warren_core::envelope::{now_ms, ReplyOutcome};
use warren_core::topology::{
    is_reply_queue, service_queue, DEAD_EXCHANGE, H_DEAD_AT, H_ERROR, H_REASON, H_SOURCE_QUEUE,
};
use warren_core::{
    Envelope, Failure, FailureKind, HeaderValue, Incoming, Outgoing, QueueType, Reply, Via,
    ENVELOPE_VERSION,
};

use crate::handler::ErasedHandler;
use crate::outcome::Action;
use crate::retry::{delay_queue, delay_step_ms, RetryPolicy};
use crate::Context;

/// One hosted service, ready to dispatch.
pub(crate) struct HostedService {
    pub(crate) methods: HashMap<String, Arc<dyn ErasedHandler>>,
    pub(crate) retry: RetryPolicy,
}

/// What every delivery handler shares.
pub(crate) struct Shared {
    pub(crate) services: HashMap<String, HostedService>,
    pub(crate) client: Client,
    pub(crate) queue_type: QueueType,
}

/// How a task ended, decided before anything is published.
enum Resolution {
    Done(Value),
    Retry(Duration),
    Dead(Failure),
}

fn failure(kind: FailureKind, message: impl Into<String>) -> Failure {
    Failure {
        kind,
        message: message.into(),
    }
}

/// Handles one delivery from the queue of service `svc`, to the ack.
pub(crate) async fn handle(shared: Arc<Shared>, svc: Arc<str>, d: Incoming) {
    if !d.is_live() {
        tracing::debug!("delivery from a closed channel skipped; the broker will redeliver it");
        return;
    }
    let env = match Envelope::from_bytes(&d.body) {
        Ok(env) => env,
        Err(e) => {
            tracing::warn!(queue_service = %svc, message_id = ?d.message_id(), error = %e, "bad envelope");
            let f = failure(FailureKind::BadEnvelope, e.to_string());
            finish(&shared, &svc, &d, None, Resolution::Dead(f)).await;
            return;
        }
    };
    let span = tracing::info_span!("task", svc = %env.svc, method = %env.method, id = %env.id, cid = %env.cid, attempt = env.attempt);
    async {
        tracing::debug!(redelivered = d.redelivered, "received");
        let resolution = run(&shared, &svc, &env, d.redelivered).await;
        finish(&shared, &svc, &d, Some(&env), resolution).await;
    }
    .instrument(span)
    .await;
}

async fn run(shared: &Shared, queue_svc: &str, env: &Envelope, redelivered: bool) -> Resolution {
    if env.svc != queue_svc {
        return Resolution::Dead(failure(
            FailureKind::UnknownTarget,
            format!(
                "task for service {:?} arrived on the queue of {queue_svc:?}",
                env.svc
            ),
        ));
    }
    let Some(service) = shared.services.get(&env.svc) else {
        return Resolution::Dead(failure(
            FailureKind::UnknownTarget,
            format!("this worker does not host service {:?}", env.svc),
        ));
    };
    let Some(handler) = service.methods.get(&env.method) else {
        return Resolution::Dead(failure(
            FailureKind::UnknownTarget,
            format!("service {:?} has no method {:?}", env.svc, env.method),
        ));
    };
    let ctx = Context {
        id: env.id,
        cid: env.cid.clone(),
        svc: env.svc.clone(),
        method: env.method.clone(),
        attempt: env.attempt,
        redelivered,
        via: env.channel,
        client: shared.client.clone(),
    };
    let started =
        std::panic::catch_unwind(AssertUnwindSafe(|| handler.call(ctx, env.payload.clone())));
    let fut = match started {
        Ok(Ok(fut)) => fut,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "payload does not fit the handler's input type");
            return Resolution::Dead(failure(FailureKind::BadPayload, e));
        }
        Err(panic) => return Resolution::Dead(panicked(&*panic)),
    };
    tracing::debug!("started");
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(Ok(v)) => {
            tracing::info!("succeeded");
            Resolution::Done(v)
        }
        Ok(Err(e)) => {
            let policy = &service.retry;
            let delay = match e.action {
                Action::Reject => {
                    tracing::warn!(error = %e.message, "rejected");
                    return Resolution::Dead(failure(FailureKind::Rejected, e.message));
                }
                Action::Fail => policy.delay_after(env.attempt),
                Action::RetryAfter(d) => d,
            };
            if env.attempt < policy.max_attempts {
                tracing::warn!(error = %e.message, retry_in = ?delay, "failed; will retry");
                Resolution::Retry(delay)
            } else {
                tracing::warn!(error = %e.message, "failed for good");
                Resolution::Dead(failure(
                    FailureKind::Handler,
                    if policy.max_attempts > 1 {
                        format!("{} (after {} attempts)", e.message, env.attempt)
                    } else {
                        e.message
                    },
                ))
            }
        }
        Err(panic) => Resolution::Dead(panicked(&*panic)),
    }
}

fn panicked(panic: &(dyn std::any::Any + Send)) -> Failure {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| String::from("non-string panic payload"));
    tracing::error!(panic = %text, "handler panicked");
    failure(FailureKind::Panic, format!("handler panicked: {text}"))
}

/// Publishes everything the resolution implies, then acks (or requeues on failure).
async fn finish(
    shared: &Shared,
    queue_svc: &str,
    d: &Incoming,
    env: Option<&Envelope>,
    resolution: Resolution,
) {
    let published = match &resolution {
        Resolution::Done(v) => {
            let reply = reply(shared, d, env, ReplyOutcome::Ok(v.clone()));
            let hook = hook(shared, env, true, v.clone());
            let (a, b) = tokio::join!(reply, hook);
            a.and(b)
        }
        Resolution::Retry(delay) => match env {
            Some(env) => retry(shared, d, env, *delay).await,
            None => Ok(()),
        },
        Resolution::Dead(f) => {
            let dead = dead_letter(shared, queue_svc, d, f).await;
            match dead {
                Ok(()) => {
                    let payload = json!({
                        "id": env.map(|e| e.id),
                        "cid": env.map(|e| e.cid.clone()),
                        "svc": env.map(|e| e.svc.clone()),
                        "method": env.map(|e| e.method.clone()),
                        "error": f,
                    });
                    let reply = reply(shared, d, env, ReplyOutcome::Error(f.clone()));
                    let hook = hook(shared, env, false, payload);
                    let (a, b) = tokio::join!(reply, hook);
                    a.and(b)
                }
                Err(e) => Err(e),
            }
        }
    };
    match published {
        Ok(()) => match d.ack().await {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                "ack not delivered (channel closed); the task will be delivered again"
            ),
            Err(e) => tracing::warn!(error = %e, "ack failed; the task will be delivered again"),
        },
        Err(e) => {
            tracing::error!(error = %e, "could not publish the task's outcome; requeueing it");
            if !matches!(d.reject(true).await, Ok(true)) {
                tracing::warn!(
                    "requeue not delivered; the broker will redeliver when the channel closes"
                );
            }
        }
    }
}

/// Answers a waiting invoker, if the message names a warren reply queue.
async fn reply(
    shared: &Shared,
    d: &Incoming,
    env: Option<&Envelope>,
    outcome: ReplyOutcome,
) -> Result<(), warren_client::Error> {
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
    let id = match env {
        Some(e) => e.id,
        None => match d.message_id().and_then(|m| Uuid::parse_str(m).ok()) {
            Some(id) => id,
            None => return Ok(()),
        },
    };
    let cid = env
        .map(|e| e.cid.clone())
        .or_else(|| d.correlation_id().map(str::to_owned))
        .unwrap_or_default();
    let body = serde_json::to_vec(&Reply {
        v: ENVELOPE_VERSION,
        id,
        cid: cid.clone(),
        outcome,
    })
    .map_err(warren_client::Error::Encode)?;
    let mut msg = Outgoing::new("", reply_to, body);
    msg.persistent = false;
    msg.message_id = Some(id.to_string());
    msg.correlation_id = Some(cid).filter(|c| !c.is_empty() && c.len() <= 255);
    match shared.client.publish_raw(&msg).await {
        Err(warren_client::Error::Broker(warren_core::Error::Unroutable { .. })) => {
            tracing::debug!("caller's reply queue is gone; reply dropped");
            Ok(())
        }
        other => other,
    }
}

/// Fires the oncomplete (`ok`) or onerror hook, if the task has one.
async fn hook(
    shared: &Shared,
    env: Option<&Envelope>,
    ok: bool,
    payload: Value,
) -> Result<(), warren_client::Error> {
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
    shared.client.send_envelope(&hook, None).await
}

/// Publishes the next attempt, to the service queue or through a delay queue.
///
/// The next attempt keeps the caller's `reply_to`, so an invoker waiting on a retried task
/// gets the final outcome.
async fn retry(
    shared: &Shared,
    d: &Incoming,
    env: &Envelope,
    delay: Duration,
) -> Result<(), warren_client::Error> {
    let mut next = env.clone();
    next.attempt = env.attempt.saturating_add(1);
    next.channel = Via::Retry;
    let reply_to = d.reply_to().filter(|r| is_reply_queue(r));
    if delay.is_zero() {
        return shared.client.send_envelope(&next, reply_to).await;
    }
    let spec = delay_queue(&env.svc, delay_step_ms(delay), shared.queue_type)?;
    shared
        .client
        .broker()
        .declare(std::slice::from_ref(&spec))
        .await?;
    let mut msg = Outgoing::new(
        "",
        spec.name,
        next.to_bytes().map_err(warren_client::Error::Encode)?,
    );
    msg.message_id = Some(next.id.to_string());
    msg.correlation_id = Some(next.cid.clone());
    msg.reply_to = reply_to.map(str::to_owned);
    shared.client.publish_raw(&msg).await
}

/// Publishes the original message, byte for byte, to the service's dead-letter queue with
/// the reason in its headers.
async fn dead_letter(
    shared: &Shared,
    queue_svc: &str,
    d: &Incoming,
    f: &Failure,
) -> Result<(), warren_client::Error> {
    tracing::warn!(reason = f.kind.as_str(), error = %f.message, "dead-lettered");
    // Make sure the dead-letter queue exists (the worker declared it at start; it may have
    // been deleted since).
    shared.client.ensure_service(queue_svc).await?;
    let mut msg = Outgoing::new(DEAD_EXCHANGE, queue_svc, d.body.clone());
    msg.message_id = d.message_id().map(str::to_owned);
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
        (
            H_SOURCE_QUEUE.into(),
            HeaderValue::Str(service_queue(queue_svc).unwrap_or_default()),
        ),
        (
            H_DEAD_AT.into(),
            HeaderValue::Int(i64::try_from(now_ms()).unwrap_or(0)),
        ),
    ];
    shared.client.publish_raw(&msg).await
}
