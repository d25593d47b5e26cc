//! What happens to one delivery: decode, dispatch, run, publish the outcome, ack.
//!
//! The ack is always last: it is sent only after everything the outcome implies (reply,
//! retry, dead letter, hook, part result and join) was published and confirmed. If one of
//! those publishes fails, the delivery is requeued instead, and the task runs again later
//! (at-least-once).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use serde_json::{json, Map, Value};
use tracing::Instrument;
use warren_client::{Client, Extract};
use warren_core::envelope::ReplyOutcome;
use warren_core::status::Recorder;
use warren_core::topology::H_REPLAYED;
use warren_core::trace::{TraceContext, H_TRACEPARENT, H_TRACESTATE};
use warren_core::{Broker, Envelope, Failure, FailureKind, Incoming, TaskSender, Via};

use crate::chain;
use crate::context::Children;
use crate::fanout::on_target;
use crate::flow::Admission;
use crate::handler::ErasedHandler;
use crate::join::{self, Job};
use crate::metrics::{MethodMetrics, Outcome, Settled};
use crate::publish::{dead_letter, hook, reply, retry};
use crate::settle::{after_failure, dead_letters, settle, Failed, Next, Settle};
use crate::split::{self, splitter_name};
use crate::Context;
use warren_core::status::{ChainProgress, TaskState, TaskStatus};
use warren_core::RetryPolicy;

/// One hosted service, ready to dispatch.
pub(crate) struct HostedService {
    pub(crate) methods: HashMap<String, Arc<dyn ErasedHandler>>,
    /// The splitter (`<method>_part`) of each method that has one, by the method's name:
    /// looked up for every delivery, so built once.
    pub(crate) splitters: HashMap<String, Arc<dyn ErasedHandler>>,
    pub(crate) retry: RetryPolicy,
    pub(crate) method_retry: HashMap<String, RetryPolicy>,
    /// Hard time limits per method.
    pub(crate) time_limits: HashMap<String, Duration>,
    /// Rate limits and per-key limits per method (docs/flow.md).
    pub(crate) limits: crate::flow::Limits,
}

impl HostedService {
    /// The hard time limit of a task's attempt: the smaller of its own and its method's, or
    /// whichever is set (a caller can tighten a method's limit, never loosen it).
    fn time_limit(&self, env: &Envelope) -> Option<Duration> {
        let own = env.time_limit_ms.map(Duration::from_millis);
        match (own, self.time_limits.get(&env.method).copied()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The policy for a task: its own, else its method's, else the service's (which is the
    /// worker's default when the service set none).
    fn policy<'a>(&'a self, env: &'a Envelope) -> &'a RetryPolicy {
        env.retry
            .as_ref()
            .or_else(|| self.method_retry.get(&env.method))
            .unwrap_or(&self.retry)
    }
}

/// Split-job settings.
#[derive(Debug, Clone)]
pub(crate) struct JoinSettings {
    /// How long a job's done marker lives after the join (its last use).
    pub(crate) completion_window: Duration,
    /// How long an unused part queue lives (an abandoned job's).
    pub(crate) expiry: Duration,
}

/// What every delivery handler shares.
pub(crate) struct Shared {
    pub(crate) services: HashMap<String, HostedService>,
    /// The client handlers get in their context (enqueue, invoke, patterns).
    pub(crate) client: Client,
    /// How the worker sends tasks (hooks, retries, parts, callbacks, chain steps): the
    /// client's own sender, so both share one publisher.
    pub(crate) sender: TaskSender,
    /// The publishing connection (part queue counts, holds, deletes).
    pub(crate) broker: Broker,
    /// Records task statuses, when a store is configured.
    pub(crate) recorder: Option<Recorder>,
    pub(crate) joins: JoinSettings,
    /// Jobs a join check of this process is running for, each with whether another part
    /// of this process asked it to look again (see `join::LocalCheck`).
    pub(crate) checking: std::sync::Mutex<HashMap<uuid::Uuid, bool>>,
    /// Consecutive failures to publish outcomes, for the pause before a requeue.
    pub(crate) requeues: Requeues,
    /// The values handlers read with `Context::state`.
    pub(crate) state: crate::state::State,
    /// Metric handles per hosted method.
    pub(crate) metrics: crate::metrics::Registry,
    /// How long after it arrived a delivery is acked early if its handler still runs (or
    /// requeued if it never started), so the broker's `consumer_timeout` never closes the
    /// channel; `None` when the timeout is off (see `WorkerBuilder::consumer_timeout`).
    pub(crate) ack_early_after: Option<Duration>,
    /// The deliveries acked early whose handlers still run.
    pub(crate) early: crate::early::EarlyAcks,
    /// Where rate limits and key slots are kept (docs/flow.md).
    pub(crate) flow: crate::flow::Flow,
    /// Cancellations heard and handlers running (docs/cancellation.md).
    pub(crate) cancels: crate::cancel::Cancels,
    /// How long a cancelled handler may still run before its future is dropped.
    pub(crate) cancel_grace: Duration,
}

/// Where a delivery came from: a service's queue, or one subscriber's queue of a topic.
#[derive(Debug)]
pub(crate) struct Route {
    /// The service whose worker consumes the queue.
    pub(crate) svc: String,
    /// The queue's name (dead letters record it, so a replay goes back there).
    pub(crate) queue: String,
    /// For a subscription queue: the method that handles the topic's messages.
    pub(crate) method: Option<String>,
}

impl Route {
    /// A message published to a topic names the topic, not a service: on a subscription
    /// queue it becomes a task for the subscriber's own `svc.method`.
    fn adopt(&self, mut env: Envelope) -> Envelope {
        if let (Some(method), Some(_)) = (&self.method, &env.topic) {
            env.svc.clone_from(&self.svc);
            env.method.clone_from(method);
        }
        env
    }
}

/// How a task ended, decided before anything is published.
enum Resolution {
    Done(Value),
    /// A chain step's result and what the child chains it saw end returned.
    Step(Value, Map<String, Value>),
    Retry(Duration),
    Dead(Failure),
    Split(Vec<Value>),
}

/// What a decoded delivery is, decided once from its envelope; [`publish_outcome`] follows
/// it. A body that does not decode never gets a kind: it is refused (dead-lettered and
/// answered) before any of this.
enum Kind {
    /// A task whose outcome is answered and fires its hooks and callbacks (an enqueue,
    /// invoke, hook, callback, retry or topic message; a split task, when its method has a
    /// splitter).
    Task,
    /// A part of a split job, or a target of a fan-in: its outcome goes to the job's part
    /// queue, then the job may join.
    Part(Job),
    /// A step of a chain: the chain goes on with the next step, or ends.
    ChainStep,
    /// A re-check of a job's join: no handler runs.
    JoinCheck(Job),
}

impl Kind {
    fn of(env: &Envelope) -> Self {
        match (&env.chain, &env.part) {
            (_, Some(p)) if env.channel == Via::Join => Self::JoinCheck(Job::of(env, p)),
            (Some(_), _) => Self::ChainStep,
            (None, Some(p)) => Self::Part(Job::of(env, p)),
            (None, None) => Self::Task,
        }
    }
}

fn failure(kind: FailureKind, message: impl Into<String>) -> Failure {
    Failure {
        kind,
        message: message.into(),
    }
}

/// Handles one delivery from the queue of service `svc`, to the ack, in the trace of
/// whatever sent it: everything it publishes continues that trace (a new one when the
/// message carries none; see `warren_core::trace`).
pub(crate) async fn handle(
    shared: Arc<Shared>,
    route: Arc<Route>,
    d: Incoming,
    arrived: tokio::time::Instant,
) {
    let received = TraceContext::from_headers(
        d.header(H_TRACEPARENT).as_ref(),
        d.header(H_TRACESTATE).as_ref(),
    );
    let task = received
        .as_ref()
        .map_or_else(TraceContext::new_root, TraceContext::child);
    // Boxed: the spawned task then stays small, and the delivery's state is written once
    // on the heap instead of being copied through every wrapper (tokio moves a spawned
    // future by value, and each wrapper would lay out its own copy).
    task.scope(Box::pin(handle_delivery(
        shared, route, d, received, arrived,
    )))
    .await;
}

async fn handle_delivery(
    shared: Arc<Shared>,
    route: Arc<Route>,
    d: Incoming,
    received: Option<TraceContext>,
    arrived: tokio::time::Instant,
) {
    let svc = &route.svc;
    if !d.is_live() {
        tracing::debug!("delivery from a closed channel skipped; the broker will redeliver it");
        return;
    }
    let env = match Envelope::from_bytes(&d.body) {
        Ok(env) => route.adopt(env),
        Err(e) => {
            tracing::warn!(queue_service = %svc, message_id = ?d.message_id(), error = %e, "bad envelope");
            let f = failure(FailureKind::BadEnvelope, e.to_string());
            let m = shared.metrics.of(svc, None);
            let _in_flight = m.received(None, false);
            let settled = Box::pin(refuse(&shared, &route, &d, m, f)).await;
            m.settled(Outcome::Failed(FailureKind::BadEnvelope), settled);
            return;
        }
    };
    let kind = Kind::of(&env);
    let span = tracing::info_span!("task", svc = %env.svc, method = %env.method, id = %env.id, cid = %env.cid, attempt = env.attempt);
    if let Some(parent) = &received {
        parent.set_parent_of(&span);
    }
    async {
        tracing::debug!(redelivered = d.redelivered, "received");
        let m = shared.metrics.of(svc, Some(&env.method));
        if let Kind::JoinCheck(job) = &kind {
            let checked = Box::pin(join::try_join(&shared, job))
                .await
                .map_err(Into::into);
            settle_delivery(&shared, &route, &d, Some(&env), m, checked, None).await;
            return;
        }
        // A cancelled task never runs (docs/cancellation.md); it is never recorded running,
        // and flow control does not hold it back.
        let cancelled = shared.cancels.check(shared.recorder.as_ref(), &env).await;
        // Flow control (docs/flow.md): a task over its method's rate limit, or whose key is
        // busy, waits on the broker instead of running now.
        let limits = shared
            .services
            .get(&env.svc)
            .filter(|_| env.svc == *svc && cancelled.is_none())
            .map(|s| &s.limits);
        let slot = match limits {
            None => None,
            Some(limits) => {
                match Box::pin(crate::flow::admit(&shared.flow, limits, &env, &d)).await {
                    Admission::Run(slot) => slot,
                    Admission::Wait(wait) => {
                        let settled = Box::pin(defer(&shared, &route, &d, &env, m, &wait)).await;
                        m.deferred(wait.reason, settled);
                        return;
                    }
                }
            }
        };
        // After flow control: a deferred chain step has not claimed its step yet, so its
        // copy is not taken for a duplicate when it comes back.
        if duplicate_step(&shared, &env, &d).await {
            tracing::info!("chain step already claimed by an earlier copy; dropping this one");
            if let Some(slot) = slot {
                crate::flow::release(&shared.flow, slot).await;
            }
            if let Some(r) = shared.recorder.as_ref() {
                r.bump(DUPLICATE_STEPS).await;
            }
            ack(&d).await;
            return;
        }
        let _in_flight = m.received(Some(&env), matches!(kind, Kind::Part(_)));
        if let (Some(r), None) = (shared.recorder.as_ref(), &cancelled) {
            r.record_linked(&status_of(&env, TaskState::Running, None, None), &env)
                .await;
            if let Some(p) = ChainProgress::of(&env, TaskState::Running) {
                r.chain_progress(&p).await;
            }
        }
        // A copy the publisher sent again (the broker may hold an earlier one) counts as a
        // possible re-run, like a broker redelivery.
        let resent = matches!(
            d.header(warren_core::topology::H_RESENT),
            Some(warren_core::HeaderValue::Bool(true))
        );
        let work = async {
            let started = std::time::Instant::now();
            let resolution = match cancelled {
                Some(f) => {
                    tracing::info!("cancelled; not run");
                    Resolution::Dead(f)
                }
                None => run(&shared, svc, &env, d.redelivered || resent).await,
            };
            m.ran(started.elapsed());
            let outcome = match &resolution {
                Resolution::Done(_) | Resolution::Step(..) | Resolution::Split(_) => {
                    Outcome::Succeeded
                }
                Resolution::Retry(_) => Outcome::Retried,
                Resolution::Dead(f) => Outcome::Failed(f.kind),
            };
            let published = finish(&shared, &route, &d, &env, &kind, m, resolution).await;
            (outcome, published)
        };
        // Pinned here once; the wrappers below hold a pointer to it, not a copy each.
        let mut work = std::pin::pin!(work);
        // Still running near the broker's consumer timeout: acked early (docs/time.md).
        let ack_by = shared.ack_early_after.and_then(|a| arrived.checked_add(a));
        let ((outcome, published), early) = match slot {
            None => crate::early::guard(&shared, &route, &d, ack_by, work.as_mut()).await,
            // A key slot is held (and its lease renewed) until the outcome is published.
            Some(slot) => {
                let held = Box::pin(crate::flow::holding(&shared.flow, slot, work.as_mut()));
                crate::early::guard(&shared, &route, &d, ack_by, held).await
            }
        };
        let settled = settle_delivery(
            &shared,
            &route,
            &d,
            Some(&env),
            m,
            published,
            early.as_ref(),
        )
        .await;
        m.settled(outcome, settled);
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
    // Parts and parallel targets run the method itself, never its splitter.
    let splitter = if env.part.is_none() && env.fanout.is_none() && env.chain.is_none() {
        service.splitters.get(&env.method)
    } else {
        None
    };
    // The hard limit counts from here, and the handler sees it as its deadline.
    let limit = service.time_limit(env);
    let deadline = limit.and_then(|l| std::time::Instant::now().checked_add(l));
    let running = shared.cancels.start(env);
    let ctx = Context {
        id: env.id,
        cid: env.cid.clone(),
        svc: env.svc.clone(),
        method: env.method.clone(),
        attempt: env.attempt,
        redelivered: redelivered || env.resent,
        via: env.channel,
        part: env.part.clone(),
        topic: env.topic.clone(),
        client: shared.client.clone(),
        parent: env.parent,
        state: shared.state.clone(),
        children: Children::default(),
        deadline,
        cancel: running.token.clone(),
    };
    let children = ctx.children.clone();
    // A chain step reads its input from the bog.
    let input = match &env.chain {
        Some(c) => Value::Object(c.bog.clone()),
        None => env.payload.clone(),
    };
    let stops = Stops {
        limit,
        cancel: running.token.clone(),
        grace: shared.cancel_grace,
    };
    let outcome = call(splitter.unwrap_or(handler).as_ref(), ctx, input, stops).await;
    drop(running);
    match outcome {
        Ok(v) if env.chain.is_some() && !(v.is_object() || v.is_null()) => {
            Resolution::Dead(failure(
                FailureKind::Rejected,
                format!("a chain step must return key-values (a JSON object), not {v}"),
            ))
        }
        Ok(v) if env.chain.is_some() => Resolution::Step(v, ended_children(&children)),
        Ok(Value::Array(parts)) if splitter.is_some() => Resolution::Split(parts),
        Ok(other) if splitter.is_some() => Resolution::Dead(failure(
            FailureKind::Rejected,
            format!(
                "splitter {} must return a list of part payloads, not {other}",
                splitter_name(&env.method)
            ),
        )),
        Ok(v) => {
            tracing::info!("succeeded");
            Resolution::Done(v)
        }
        Err(Stop::Dead(f)) => Resolution::Dead(f),
        Err(Stop::Failed(failed, message)) => {
            let policy = service.policy(env);
            match after_failure(failed, env.attempt, policy) {
                Next::Dead(FailureKind::Rejected) => {
                    tracing::warn!(error = %message, "rejected");
                    Resolution::Dead(failure(FailureKind::Rejected, message))
                }
                Next::Dead(FailureKind::Cancelled) => {
                    tracing::info!(error = %message, "cancelled while it ran");
                    Resolution::Dead(failure(FailureKind::Cancelled, message))
                }
                Next::Retry(delay) => {
                    tracing::info!(error = %message, retry_in = ?delay, "failed; will retry");
                    Resolution::Retry(delay)
                }
                Next::Dead(kind) => {
                    tracing::warn!(error = %message, "failed for good");
                    let message = if policy.max_attempts > 1 {
                        format!("{message} (after {} attempts)", env.attempt)
                    } else {
                        message
                    };
                    Resolution::Dead(failure(kind, message))
                }
            }
        }
    }
}

/// The store counter of chain-step copies dropped as duplicates.
pub const DUPLICATE_STEPS: &str = "chain-steps-dropped";

/// `true` for a chain step that another copy already claimed: a first delivery (not
/// redelivered) of a step whose (id, attempt, replay count) is claimed in the status store
/// was re-sent by a redelivered predecessor. A redelivered copy always runs (its claimant
/// may have died); a retry (next attempt) or a replay claims afresh; without a store, or
/// when it fails, every copy runs (at least once).
async fn duplicate_step(shared: &Shared, env: &Envelope, d: &Incoming) -> bool {
    if env.chain.is_none() || d.redelivered {
        return false;
    }
    let Some(r) = shared.recorder.as_ref() else {
        return false;
    };
    let replayed = d.header(H_REPLAYED).and_then(|v| v.as_int()).unwrap_or(0);
    let mut key = env.attempt.to_be_bytes().to_vec();
    key.extend_from_slice(&replayed.to_be_bytes());
    match r.store().claim(uuid::Uuid::new_v5(&env.id, &key)).await {
        Ok(first) => !first,
        Err(e) => {
            tracing::warn!(error = %e, "cannot claim the chain step; running it (at least once)");
            false
        }
    }
}

/// The merged returned values (their own children's included) of the child chains a
/// handler enqueued that have ended, later children over earlier.
fn ended_children(children: &Children) -> Map<String, Value> {
    let mut out = Map::new();
    let handles = children.lock().map(|c| c.clone()).unwrap_or_default();
    for h in handles {
        if let Some(Ok(r)) = h.try_result() {
            out.extend(r.extract(Extract::new().merge_children()));
        }
    }
    out
}

fn status_of(
    env: &Envelope,
    state: TaskState,
    result: Option<Value>,
    error: Option<Failure>,
) -> TaskStatus {
    TaskStatus {
        id: env.id,
        cid: env.cid.clone(),
        target: format!("{}.{}", env.svc, env.method),
        state,
        attempts: env.attempt,
        result,
        error,
        created_ms: env.created_ms,
        updated_ms: warren_core::envelope::now_ms(),
    }
}

/// Why a handler call did not produce a value.
enum Stop {
    /// Bad payload or panic: never retried.
    Dead(Failure),
    /// The handler's own error (with what it asked for) or its time limit, and the message.
    Failed(Failed, String),
}

/// What stops a running handler: its hard time limit, and a cancellation (after a grace).
struct Stops {
    limit: Option<Duration>,
    cancel: tokio_util::sync::CancellationToken,
    grace: Duration,
}

/// Decodes the payload, runs the handler (stopped at its time limit, or a grace period after
/// it was cancelled: its future is dropped), catches panics. A handler that returns an error
/// after it was cancelled fails as cancelled; one that returns `Ok` within the grace keeps
/// its result.
async fn call(
    handler: &dyn ErasedHandler,
    ctx: Context,
    payload: Value,
    stops: Stops,
) -> Result<Value, Stop> {
    let started = std::panic::catch_unwind(AssertUnwindSafe(|| handler.call(ctx, payload)));
    let fut = match started {
        Ok(Ok(fut)) => fut,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "payload does not fit the handler's input type");
            return Err(Stop::Dead(failure(FailureKind::BadPayload, e)));
        }
        Err(panic) => return Err(Stop::Dead(panicked(&*panic))),
    };
    tracing::debug!("started");
    let running = AssertUnwindSafe(fut).catch_unwind();
    let limited = async {
        match stops.limit {
            None => Ok(running.await),
            Some(limit) => match tokio::time::timeout(limit, running).await {
                Ok(ran) => Ok(ran),
                Err(_) => {
                    tracing::warn!(?limit, "handler stopped at its time limit");
                    Err(Stop::Failed(
                        Failed::TimedOut,
                        format!("the handler ran past its time limit of {limit:?} and was stopped"),
                    ))
                }
            },
        }
    };
    let grace = stops.grace;
    let cancelled_and_graced = async {
        stops.cancel.cancelled().await;
        tracing::info!(
            ?grace,
            "cancelled while running; the handler has its grace period"
        );
        tokio::time::sleep(grace).await;
    };
    let ran = tokio::select! {
        biased;
        ran = limited => ran?,
        () = cancelled_and_graced => {
            tracing::warn!(?grace, "cancelled handler still running after its grace; dropped");
            return Err(Stop::Failed(
                Failed::Cancelled,
                format!("cancelled while running; dropped after the grace period of {grace:?}"),
            ));
        }
    };
    let cancelled = stops.cancel.is_cancelled();
    match ran {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if cancelled => Err(Stop::Failed(
            Failed::Cancelled,
            format!("cancelled while running: {}", e.message),
        )),
        Ok(Err(e)) => Err(Stop::Failed(Failed::Handler(e.action), e.message)),
        Err(panic) => Err(Stop::Dead(panicked(&*panic))),
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

/// Publishes everything the resolution implies (and records its status); the caller
/// settles the delivery from the result.
async fn finish(
    shared: &Shared,
    route: &Route,
    d: &Incoming,
    env: &Envelope,
    kind: &Kind,
    m: &MethodMetrics,
    resolution: Resolution,
) -> Result<(), warren_client::Error> {
    // The status the outcome leaves, computed only when someone reads it.
    let wanted = shared.recorder.is_some() || env.notify.is_some();
    let status = match &resolution {
        _ if !wanted => None,
        Resolution::Done(v) | Resolution::Step(v, _) => {
            Some(status_of(env, TaskState::Succeeded, Some(v.clone()), None))
        }
        Resolution::Dead(f) => Some(status_of(env, TaskState::Failed, None, Some(f.clone()))),
        Resolution::Retry(_) => Some(status_of(env, TaskState::Pending, None, None)),
        Resolution::Split(_) => None,
    };
    let ends = !matches!(resolution, Resolution::Retry(_));
    let mut published: Result<(), warren_client::Error> =
        publish_outcome(shared, route, d, env, kind, m, resolution)
            .await
            .map_err(Into::into);
    if let (Ok(()), true, Some(key)) = (&published, ends, &env.unique) {
        crate::unique::release(shared, env, key).await;
    }
    if let (Ok(()), Some(st), e) = (&published, &status, env) {
        if let Some(r) = shared.recorder.as_ref() {
            r.record(st).await;
        }
        if let Some(topic) = e
            .notify
            .as_deref()
            .filter(|_| st.state != TaskState::Pending)
        {
            published = Box::pin(
                shared.client.publish(
                    warren_client::Message::new(topic, st)
                        .with_cid(e.cid.clone())
                        .with_parent(e.id),
                ),
            )
            .await
            .map(|_| ());
        }
    }
    published
}

/// A delivery that is not a task warren can run: dead-lettered with its reason and answered
/// (under the id its body names, if any), then settled like any other outcome.
async fn refuse(
    shared: &Shared,
    route: &Route,
    d: &Incoming,
    m: &MethodMetrics,
    f: Failure,
) -> Settled {
    let published = async {
        Box::pin(dead_letter(shared, route, d, m, &f)).await?;
        reply(shared, d, None, ReplyOutcome::Error(f)).await
    }
    .await
    .map_err(Into::into);
    settle_delivery(shared, route, d, None, m, published, None).await
}

/// Acks, requeues (after a pause) or dead-letters the delivery, as [`settle`] decides from
/// the result of publishing its outcome. A delivery acked early (`early`) is never acked
/// or requeued again: what would be a requeue republishes its message instead.
async fn settle_delivery(
    shared: &Shared,
    route: &Route,
    d: &Incoming,
    env: Option<&Envelope>,
    m: &MethodMetrics,
    published: Result<(), warren_client::Error>,
    early: Option<&crate::early::EarlyAcked<'_>>,
) -> Settled {
    let key = env.map(|e| e.id);
    let failed_before = key.map_or(0, |k| shared.requeues.failures(k));
    match (
        settle(&published, failed_before, early.is_some()),
        published,
    ) {
        (Settle::Ack, _) => {
            shared.requeues.forget(key);
            ack(d).await;
            Settled::Acked
        }
        (Settle::AlreadyAcked, _) => {
            shared.requeues.forget(key);
            Settled::Acked
        }
        (Settle::Republish { after }, result) => {
            let error = result.err().map(|e| e.to_string());
            tracing::error!(error = ?error, republish_in = ?after, "could not publish the outcome of a task acked early; publishing the task again");
            shared.requeues.failed(key);
            tokio::time::sleep(after).await;
            if let Some(early) = early {
                Box::pin(early.republish(shared)).await;
            }
            Settled::Requeued
        }
        (Settle::Requeue { after }, Err(e)) => {
            tracing::error!(error = %e, requeue_in = ?after, "could not publish the task's outcome; requeueing it");
            shared.requeues.failed(key);
            tokio::time::sleep(after).await;
            requeue(d).await;
            Settled::Requeued
        }
        // `settle` never answers Defer (flow control settles through `defer`, which
        // publishes first); requeueing is the safe reading.
        (Settle::Requeue { .. } | Settle::Defer { .. }, _) => {
            requeue(d).await;
            Settled::Requeued
        }
        (Settle::DeadLetter(f), _) => {
            tracing::error!(error = %f.message, "the task's outcome cannot be published; dead-lettering it");
            shared.requeues.forget(key);
            let kind = f.kind;
            let dead = Box::pin(dead_letter(shared, route, d, m, &f)).await;
            if let Err(e) = Box::pin(reply(shared, d, env, ReplyOutcome::Error(f))).await {
                tracing::warn!(error = %e, "could not answer the caller");
            }
            match (dead, early) {
                (Ok(()), None) => {
                    ack(d).await;
                    Settled::DeadLettered(kind)
                }
                (Ok(()), Some(_)) => Settled::DeadLettered(kind),
                (Err(e), None) => {
                    tracing::error!(error = %e, "could not dead-letter; requeueing");
                    tokio::time::sleep(crate::settle::MAX_PAUSE).await;
                    requeue(d).await;
                    Settled::Requeued
                }
                (Err(e), Some(early)) => {
                    tracing::error!(error = %e, "could not dead-letter a task acked early; publishing it again");
                    tokio::time::sleep(crate::settle::MAX_PAUSE).await;
                    Box::pin(early.republish(shared)).await;
                    Settled::Requeued
                }
            }
        }
    }
}

/// Defers a task flow control held back ([`Settle::Defer`]): publishes the same envelope
/// (attempt unchanged, the caller's reply queue kept) through the delay queues, then
/// settles the delivery from that publish: acked once the copy is confirmed, requeued if
/// it could not be published.
async fn defer(
    shared: &Shared,
    route: &Route,
    d: &Incoming,
    env: &Envelope,
    m: &MethodMetrics,
    wait: &crate::flow::Wait,
) -> Settled {
    let published = match crate::settle::before_run(Some(wait.delay)) {
        Some(Settle::Defer { delay }) => {
            tracing::debug!(
                reason = wait.reason.as_str(),
                ?delay,
                "deferred by flow control"
            );
            crate::publish::defer(shared, d, env, delay, wait.slot_ms).await
        }
        _ => Ok(()),
    };
    settle_delivery(
        shared,
        route,
        d,
        Some(env),
        m,
        published.map_err(Into::into),
        None,
    )
    .await
}

async fn requeue(d: &Incoming) {
    if !matches!(d.reject(true).await, Ok(true)) {
        tracing::warn!("requeue not delivered; the broker will redeliver when the channel closes");
    }
}

/// Consecutive transient failures to publish a task's outcome, per task id, in this worker:
/// they set the pause before each requeue. Bounded: cleared when it reaches 10,000 tasks.
#[derive(Default)]
pub(crate) struct Requeues(std::sync::Mutex<HashMap<uuid::Uuid, u32>>);

impl Requeues {
    const MAX: usize = 10_000;

    fn failures(&self, id: uuid::Uuid) -> u32 {
        self.0
            .lock()
            .map_or(0, |m| m.get(&id).copied().unwrap_or(0))
    }

    fn failed(&self, id: Option<uuid::Uuid>) {
        if let (Some(id), Ok(mut m)) = (id, self.0.lock()) {
            if m.len() >= Self::MAX {
                m.clear();
            }
            *m.entry(id).or_default() += 1;
        }
    }

    fn forget(&self, id: Option<uuid::Uuid>) {
        if let (Some(id), Ok(mut m)) = (id, self.0.lock()) {
            if !m.is_empty() {
                m.remove(&id);
            }
        }
    }
}

async fn ack(d: &Incoming) {
    match d.ack().await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!("ack not delivered (channel closed); the task will be delivered again");
        }
        Err(e) => tracing::warn!(error = %e, "ack failed; the task will be delivered again"),
    }
}

async fn publish_outcome(
    shared: &Shared,
    route: &Route,
    d: &Incoming,
    env: &Envelope,
    kind: &Kind,
    m: &MethodMetrics,
    resolution: Resolution,
) -> warren_core::Result<()> {
    match (kind, resolution) {
        // Waiting for another attempt is the same for every kind of task.
        (_, Resolution::Retry(delay)) => Box::pin(retry(shared, d, env, delay)).await,
        (Kind::JoinCheck(job), _) => Box::pin(join::try_join(shared, job)).await,
        // A chain step goes on with the next step, or ends the chain.
        (Kind::ChainStep, Resolution::Step(v, children)) => {
            Box::pin(chain::advance(shared, d, env, v, children)).await
        }
        (Kind::ChainStep, Resolution::Done(v)) => {
            Box::pin(chain::advance(shared, d, env, v, Map::new())).await
        }
        (Kind::ChainStep, Resolution::Dead(f)) => {
            if dead_letters(f.kind) {
                Box::pin(dead_letter(shared, route, d, m, &f)).await?;
            }
            Box::pin(chain::end(shared, d, env, ReplyOutcome::Error(f))).await
        }
        // A part reports to its part queue and joins; it has no reply or hooks of its own
        // (the job's hooks fire at the join).
        (Kind::Part(job), Resolution::Done(v) | Resolution::Step(v, _)) => {
            let outcome = ReplyOutcome::Ok(v);
            on_target(shared, Some(env), &outcome).await?;
            Box::pin(report_part(shared, job, env, outcome)).await
        }
        (Kind::Part(job), Resolution::Dead(f)) => {
            if dead_letters(f.kind) {
                Box::pin(dead_letter(shared, route, d, m, &f)).await?;
            }
            let outcome = ReplyOutcome::Error(f);
            on_target(shared, Some(env), &outcome).await?;
            Box::pin(report_part(shared, job, env, outcome)).await
        }
        (Kind::Task, Resolution::Split(parts)) => {
            Box::pin(split::split(shared, d, env, parts)).await
        }
        // Most tasks are answered by nobody: their result is neither cloned nor published.
        (Kind::Task, Resolution::Done(v) | Resolution::Step(v, _)) => {
            if !has_listeners(d, env) {
                return Ok(());
            }
            Box::pin(async move {
                let outcome = ReplyOutcome::Ok(v.clone());
                let (a, b, c) = tokio::join!(
                    reply(shared, d, Some(env), outcome.clone()),
                    hook(shared, Some(env), true, v),
                    on_target(shared, Some(env), &outcome)
                );
                a.and(b).and(c)
            })
            .await
        }
        (Kind::Task, Resolution::Dead(f)) => {
            // A blocking invoke/retry attempt that the caller will repeat is not dead yet.
            if dead_letters(f.kind) && !(f.kind == FailureKind::Handler && env.caller_retries) {
                Box::pin(dead_letter(shared, route, d, m, &f)).await?;
            }
            on_target(shared, Some(env), &ReplyOutcome::Error(f.clone())).await?;
            let payload = json!({
                "id": env.id, "cid": env.cid, "svc": env.svc, "method": env.method, "error": f,
            });
            Box::pin(async {
                let (a, b) = tokio::join!(
                    reply(shared, d, Some(env), ReplyOutcome::Error(f.clone())),
                    hook(shared, Some(env), false, payload)
                );
                a.and(b)
            })
            .await
        }
        // Only a plain task runs a splitter (see `run`).
        (Kind::Part(_) | Kind::ChainStep, Resolution::Split(_)) => Ok(()),
    }
}

/// `true` when a plain task's success is published somewhere: a reply to its caller, an
/// `oncomplete` hook, or fan-out `on_target` callbacks (the three publishers below return
/// at once without them).
fn has_listeners(d: &Incoming, env: &Envelope) -> bool {
    d.reply_to().is_some_and(|r| !r.is_empty())
        || env.hooks.oncomplete.is_some()
        || env.fanout.as_ref().is_some_and(|f| !f.on_target.is_empty())
}

/// A part's outcome: recorded in its job's part queue, then the job may join.
async fn report_part(
    shared: &Shared,
    job: &Job,
    env: &Envelope,
    outcome: ReplyOutcome,
) -> warren_core::Result<()> {
    let part_id = env.part.as_ref().map_or(0, |p| p.part_id);
    join::record_part(shared, job, env, part_id, outcome).await?;
    join::try_join(shared, job).await
}
