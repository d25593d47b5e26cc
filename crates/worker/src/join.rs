//! The exactly-once join of a split job (and of a fan-in, and of a background invoke/retry's
//! callback). `docs/joins.md` explains the protocol and walks through every crash point; in
//! short:
//!
//! 1. Every finished part publishes its result (ok or error) to the job's part queue, then,
//!    while its own part task is still unacked, tries to join. A result whose part queue is
//!    gone belongs to a finished (or abandoned) job: it is dropped, never re-creates it.
//! 2. A join starts only when the part queue holds at least `total_parts` ready messages.
//! 3. **Hold**: the joiner consumes the part queue through an *exclusive* consumer on a
//!    private channel. RabbitMQ grants one exclusive consumer per queue; every other
//!    contender is refused (and stops: the holder is alive, or its unacked delivery is
//!    redelivered when it dies, and the hold ends with its channel).
//! 4. **Done marker**: if `warren.done.<job>` holds markers, the hook (or some callbacks)
//!    already fired: the joiner fires only what is left, then removes the part queue.
//! 5. The joiner takes every result, unacked, and de-duplicates them by `part_id`. Missing
//!    parts (duplicates filled the count): it puts them back, lets go, and starts over.
//! 6. **Fire**: one publish per hook or callback, to its service queue, with the done
//!    marker queue in its `BCC` header: "the hook was sent" and "the job is done" are one
//!    broker event. The marker queue expires after the completion window.
//! 7. The part queue is deleted; the joiner's part task is acked.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;
use warren_core::amqp::Batch;
use warren_core::envelope::ReplyOutcome;
use warren_core::topology::{service_queue, JobKey, QueueSpec, H_BCC};
use warren_core::{
    Envelope, Failure, FailureKind, FanOut, HeaderValue, HookTarget, Hooks, Outgoing,
    PartDecorator, Take, Target, Via,
};

use crate::fanout;

use crate::process::Shared;
use crate::publish::send_later;

type Res<T = ()> = warren_core::Result<T>;

/// How many times one join attempt starts over after finding parts missing.
const MAX_ROUNDS: u32 = 5;
/// How long a joiner waits for one more result before it counts what it holds.
const TAKE_IDLE: Duration = Duration::from_secs(2);
/// When a scheduled join re-check runs.
const RECHECK_AFTER: Duration = Duration::from_secs(2);

/// Everything a joiner needs to know about a job; carried by each part task.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub(crate) part_queue: String,
    pub(crate) total: u32,
    pub(crate) key: JobKey,
    pub(crate) hooks: Hooks,
    pub(crate) cid: String,
    /// The split task's id (or, for hand-attached parts without a parent, the job key).
    pub(crate) id: Uuid,
    pub(crate) svc: String,
    pub(crate) method: String,
    /// Set for a fan-in (or a background invoke/retry): the final callbacks fire instead of
    /// the hooks.
    pub(crate) fanout: Option<FanOut>,
}

impl Job {
    pub(crate) fn of(env: &Envelope, part: &PartDecorator) -> Self {
        let key = JobKey::of(&part.part_queue);
        Self {
            part_queue: part.part_queue.clone(),
            total: part.total_parts,
            key,
            hooks: env.hooks.clone(),
            cid: env.cid.clone(),
            id: env.parent.unwrap_or(key.0),
            svc: env.svc.clone(),
            method: env.method.clone(),
            fanout: env.fanout.clone(),
        }
    }

    /// What the join fires: a fan-in's final callbacks (all of them, whatever the outcome),
    /// or a split job's `oncomplete` or `onerror` hook.
    fn fire_targets(&self, ok: bool) -> Vec<HookTarget> {
        match &self.fanout {
            Some(f) => f.on_final.clone(),
            None if ok => self.hooks.oncomplete.iter().cloned().collect(),
            None => self.hooks.onerror.iter().cloned().collect(),
        }
    }

    /// How many done markers a finished join leaves: one per fired callback (at least one).
    fn markers_when_done(&self) -> usize {
        match &self.fanout {
            Some(f) => f.on_final.len().max(1),
            None => 1,
        }
    }

    fn via(&self) -> Via {
        match &self.fanout {
            Some(f) if f.retry_call.is_some() => Via::RetryCallback,
            Some(_) => Via::OnFinal,
            None => Via::Hook,
        }
    }

    /// The done-marker queue of the job's service (one per service and window).
    pub(crate) fn done(&self, shared: &Shared) -> Res<QueueSpec> {
        Ok(QueueSpec::done_markers(
            &self.svc,
            ms(shared.joins.completion_window),
        )?)
    }

    /// Which of this job's callbacks the markers among `bodies` stand for (a marker is the
    /// callback's own message, whose id is the callback's deterministic id).
    fn markers_in(&self, bodies: &[Vec<u8>]) -> BTreeSet<usize> {
        let ids: BTreeMap<Uuid, usize> = (0..self.markers_when_done())
            .map(|i| (self.callback_id(i), i))
            .collect();
        bodies
            .iter()
            .filter(|b| serde_json::from_slice::<PartResult>(b).is_err())
            .filter_map(|b| Envelope::from_bytes(b).ok())
            .filter_map(|env| ids.get(&env.id).copied())
            .collect()
    }

    /// The id of the job's `i`-th hook or callback: the same in every joiner, so a marker
    /// says which callback it stands for (and a consumer can de-duplicate by task id).
    fn callback_id(&self, i: usize) -> Uuid {
        Uuid::new_v5(
            &self.key.0,
            &u64::try_from(i).unwrap_or(u64::MAX).to_be_bytes(),
        )
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A part's result as stored in the part queue.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PartResult {
    pub(crate) part_id: u32,
    pub(crate) task: Uuid,
    #[serde(flatten)]
    pub(crate) outcome: ReplyOutcome,
    /// `svc.method` of the part (read by fan-in callbacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) target: Option<String>,
    /// When the part's task was first sent, ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) req_ms: Option<u64>,
    /// The attempt that produced this result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) attempt: Option<u32>,
}

/// `true` when the job's join has fired (or started firing) its hook or callbacks, from the
/// service's done-marker queue. It reads the whole queue (markers of the completion window,
/// at most 65,535 of them are looked at), so it is only for the rare case that needs it: a
/// split task delivered again.
pub(crate) async fn is_done(shared: &Shared, job: &Job) -> Res<bool> {
    let done = job.done(shared)?;
    let broker = &shared.broker;
    let deadline = shared.sender.deadline();
    let mut pauses = warren_core::amqp::backoff(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        let ready = broker.declare_counted(&done).await?.ready;
        if ready == 0 {
            return Ok(false);
        }
        let max = (ready as usize).min(usize::from(u16::MAX));
        // Exclusive: two readers at once would each see only part of the markers.
        match broker
            .take_exclusive(&done.name, max, Duration::from_millis(500), |_| false)
            .await?
        {
            Take::Held(batch) => {
                let found = !job.markers_in(&batch.bodies).is_empty();
                batch.release().await;
                return Ok(found);
            }
            Take::Missing => return Ok(false),
            Take::Busy if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(pauses.next().unwrap_or(Duration::from_secs(1))).await;
            }
            Take::Busy => {
                return Err(warren_core::Error::Timeout {
                    what: format!("reading the done markers in {}", done.name),
                    after: shared.sender.publish_timeout(),
                })
            }
        }
    }
}

/// Publishes a part's result to the job's part queue. A result whose part queue does not
/// exist belongs to a job that already joined (or was abandoned and expired): it is dropped
/// and counted, and never re-creates the queue, so a straggler can never fire a hook again.
/// A part queue whose node is down is waited for (the publisher retries until its
/// deadline; then the error is transient and the part task is delivered again).
pub(crate) async fn record_part(
    shared: &Shared,
    job: &Job,
    env: &Envelope,
    part_id: u32,
    outcome: ReplyOutcome,
) -> Res {
    let body = serde_json::to_vec(&PartResult {
        part_id,
        task: env.id,
        outcome,
        target: Some(format!("{}.{}", env.svc, env.method)),
        req_ms: Some(env.created_ms),
        attempt: Some(env.attempt),
    })
    .map_err(warren_core::Error::Json)?;
    let mut msg = Outgoing::new("", job.part_queue.clone(), body);
    msg.message_id = Some(env.id.to_string());
    msg.correlation_id = Some(job.cid.clone());
    let publisher = shared.sender.publisher();
    let deadline = shared.sender.deadline();
    let mut pauses = warren_core::amqp::backoff(Duration::from_millis(200), Duration::from_secs(2));
    loop {
        match publisher.publish_by(&msg, deadline).await {
            Err(warren_core::Error::Unroutable { .. }) => {}
            other => return other,
        }
        // Gone, or on a node that is down (a refusal the publisher's retry understands)?
        match shared.broker.queue_stats(&job.part_queue).await {
            Ok(None) => {
                tracing::info!(part_id, part_queue = %job.part_queue, "part result for a finished or abandoned job; dropped");
                return Ok(());
            }
            Ok(Some(_)) => {}
            Err(e) if e.is_node_down() => {}
            Err(e) => return Err(e),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(warren_core::Error::Timeout {
                what: format!("publishing a part result to {}", job.part_queue),
                after: shared.sender.publish_timeout(),
            });
        }
        tokio::time::sleep(pauses.next().unwrap_or(Duration::from_secs(2))).await;
    }
}

/// Tries to finish the job's join; returns when it fired, when it is not this caller's to
/// fire (not all parts in, already done, another joiner holds the part queue), or after
/// scheduling a re-check.
///
/// Every joiner runs inside an unacked delivery (a part task, a split task or a join check),
/// so a joiner that dies is redelivered and tries again; a contender refused by the
/// exclusive hold therefore just stops.
///
/// Checks of one job within one process are coalesced: while a check runs, another part
/// that finishes here only asks it to look once more (its result is already confirmed in
/// the part queue) and returns. That saves most of the per-result queue counts when the
/// parts of a job run side by side in one worker; see [`LocalCheck`].
pub(crate) async fn try_join(shared: &Shared, job: &Job) -> Res {
    if job.total == 0 {
        return join_empty(shared, job).await;
    }
    let Some(mut check) = LocalCheck::begin(shared, job) else {
        tracing::debug!(job = %job.key.0, "a check of this job runs in this process; asked it to look again");
        return Ok(());
    };
    let mut missing_rounds = 0;
    loop {
        match join_round(shared, job).await? {
            Round::Joined => return Ok(()),
            Round::Over if check.again() => {}
            // After this process released a hold, the broker may still show it for a moment
            // (a closed channel's consumer and its unacked results are let go
            // asynchronously), so this "nothing to do" may be a stale view, and the part
            // whose result completed the job may have stopped because it saw our hold: look
            // again later instead of trusting it.
            Round::Over if missing_rounds > 0 => {
                check.finish();
                return schedule_check(shared, job, RECHECK_AFTER).await;
            }
            Round::Over => return Ok(()),
            Round::PartsMissing => {
                missing_rounds += 1;
                if missing_rounds >= MAX_ROUNDS {
                    check.finish();
                    return schedule_check(shared, job, RECHECK_AFTER).await;
                }
            }
        }
    }
}

/// How one look at the part queue ended.
enum Round {
    /// Fired now, or found fired before (its part queue deleted now).
    Joined,
    /// Not everything is in yet, another joiner holds it, or the job is gone.
    Over,
    /// All results were counted but some part ids were missing (duplicates filled the
    /// count): look again.
    PartsMissing,
}

/// One look at the part queue: count, hold, read, fire and delete.
async fn join_round(shared: &Shared, job: &Job) -> Res<Round> {
    let broker = &shared.broker;
    let total = job.total as usize;
    let ready = match broker.queue_stats(&job.part_queue).await? {
        None => return Ok(Round::Over), // joined (and deleted) or expired
        Some(s) if s.ready < job.total => return Ok(Round::Over),
        // Another joiner holds it (it will count our result, see `Take::Busy`); asking
        // for the exclusive hold now would only be refused.
        Some(s) if s.consumers > 0 => return Ok(Round::Over),
        Some(s) => s.ready,
    };
    // Everything that was in the queue when it was counted: the results, and the done
    // markers of a joiner that fired and died before it deleted the queue.
    let taken = broker
        .take_exclusive(&job.part_queue, ready as usize, TAKE_IDLE, |_| false)
        .await?;
    let batch = match taken {
        Take::Held(b) => b,
        Take::Missing => return Ok(Round::Over),
        Take::Busy => {
            tracing::debug!(job = %job.key.0, "another joiner holds the job");
            return Ok(Round::Over);
        }
    };
    tracing::debug!(job = %job.key.0, taken = batch.bodies.len(), "part results taken");
    let fired = job.markers_in(&batch.bodies);
    if fired.len() >= job.markers_when_done() {
        // Joined before, by a joiner that died before it removed the part queue.
        batch.delete_queue(&job.part_queue).await?;
        return Ok(Round::Joined);
    }
    let results = distinct(&batch.bodies, job.total);
    if results.len() < total {
        tracing::debug!(job = %job.key.0, have = results.len(), total, "parts missing; releasing");
        batch.release().await;
        return Ok(Round::PartsMissing);
    }
    let (ok, payload) = hook_payload(job, &results)?;
    let mut batch = batch;
    fire(shared, job, ok, &payload, &fired, Some(&mut batch)).await?;
    crate::metrics::join_fired(&job.svc);
    batch.delete_queue(&job.part_queue).await?;
    tracing::info!(job = %job.key.0, parts = total, ok, "split job joined");
    Ok(Round::Joined)
}

/// The join of a job without parts: only its split task (or that task's redelivery, which
/// checks the done markers first: see `split`) fires it, so no hold is needed.
async fn join_empty(shared: &Shared, job: &Job) -> Res {
    fire(
        shared,
        job,
        true,
        &Value::Array(Vec::new()),
        &BTreeSet::new(),
        None,
    )
    .await?;
    crate::metrics::join_fired(&job.svc);
    Ok(())
}

/// One result per part id; a success wins over a failure of the same part (a part that
/// failed, then ran again after a crash and succeeded).
fn distinct(bodies: &[Vec<u8>], total: u32) -> BTreeMap<u32, PartResult> {
    let mut out = BTreeMap::<u32, PartResult>::new();
    for b in bodies {
        // A done marker (the fired hook's own message) is not a result.
        let Ok(r) = serde_json::from_slice::<PartResult>(b) else {
            continue;
        };
        if r.part_id >= total {
            continue;
        }
        let better = matches!(r.outcome, ReplyOutcome::Ok(_));
        match out.get(&r.part_id).map(|r| &r.outcome) {
            Some(ReplyOutcome::Ok(_)) => {}
            Some(ReplyOutcome::Error(_)) if !better => {}
            _ => {
                out.insert(r.part_id, r);
            }
        }
    }
    out
}

/// The oncomplete payload (results ordered by part id) or the onerror payload; for a fan-in,
/// the final callbacks' payload.
fn hook_payload(job: &Job, results: &BTreeMap<u32, PartResult>) -> Res<(bool, Value)> {
    if let Some(f) = &job.fanout {
        return fanout::final_payload(&job.cid, f, results).map_err(warren_core::Error::Json);
    }
    let failed: Vec<Value> = results
        .iter()
        .filter_map(|(id, r)| match &r.outcome {
            ReplyOutcome::Error(f) => Some(json!({"part_id": id, "error": f})),
            ReplyOutcome::Ok(_) => None,
        })
        .collect();
    if failed.is_empty() {
        let ordered = results
            .values()
            .map(|r| match &r.outcome {
                ReplyOutcome::Ok(v) => v.clone(),
                ReplyOutcome::Error(_) => Value::Null,
            })
            .collect();
        return Ok((true, Value::Array(ordered)));
    }
    // A job whose parts were cancelled (docs/cancellation.md) fails as cancelled.
    let cancelled = results
        .values()
        .any(|r| matches!(&r.outcome, ReplyOutcome::Error(f) if f.kind == FailureKind::Cancelled));
    let error = Failure {
        kind: if cancelled {
            FailureKind::Cancelled
        } else {
            FailureKind::PartsFailed
        },
        message: format!("{} of {} parts failed", failed.len(), job.total),
    };
    Ok((
        false,
        json!({
            "id": job.id, "cid": job.cid, "svc": job.svc, "method": job.method,
            "error": error, "failed_parts": failed,
        }),
    ))
}

/// Fires the job's hook (or those of its callbacks not in `fired`), each in one publish
/// with its done marker: the hook goes to its service's queue and, through the `BCC`
/// header, to the job's marker queue (declared here, expiring after the completion window).
/// Callbacks are sent one at a time, in their fixed order.
///
/// With `held` (the part queue's exclusive hold), every publish goes out on the hold's own
/// channel: if this joiner lost its hold (its connection died and another joiner may have
/// taken over), the publish fails instead of firing a second time.
async fn fire(
    shared: &Shared,
    job: &Job,
    ok: bool,
    payload: &Value,
    fired: &BTreeSet<usize>,
    mut held: Option<&mut Batch>,
) -> Res {
    let done = job.done(shared)?;
    shared
        .sender
        .publisher()
        .declare_cached(&done.name, std::slice::from_ref(&done))
        .await?;
    // Where each hook's marker goes besides its service queue: the service's done-marker
    // queue and, while the job is held, the part queue itself (so a joiner that died after
    // firing and before deleting the part queue is seen by the next one).
    let mut bcc = vec![done.name.clone()];
    if held.is_some() {
        bcc.push(job.part_queue.clone());
    }
    let targets = job.fire_targets(ok);
    if targets.is_empty() {
        // Nothing to call: the marker alone says the job is done.
        if fired.is_empty() {
            let mut env = Envelope::new(
                &Target::new(&job.svc, &job.method)?,
                Value::Null,
                Some(job.cid.clone()),
            );
            env.id = job.callback_id(0);
            let mut marker = Outgoing::new(
                "",
                done.name.clone(),
                env.to_bytes().map_err(warren_core::Error::Json)?,
            );
            marker.message_id = Some(env.id.to_string());
            if held.is_some() {
                marker.headers = vec![(
                    H_BCC.to_owned(),
                    HeaderValue::StrList(vec![job.part_queue.clone()]),
                )];
            }
            send(shared, &done, held, &marker).await?;
        }
        return Ok(());
    }
    for (i, t) in targets.iter().enumerate() {
        if fired.contains(&i) {
            continue;
        }
        // The callback's queue must exist, or the publish would reach only the marker.
        shared.sender.ensure_service(&t.svc).await?;
        let mut env = Envelope::new(
            &Target::new(&t.svc, &t.method)?,
            payload.clone(),
            Some(job.cid.clone()),
        );
        env.id = job.callback_id(i);
        env.channel = job.via();
        env.parent = Some(job.id);
        let mut msg = Outgoing::new(
            "",
            service_queue(&t.svc)?,
            env.to_bytes().map_err(warren_core::Error::Json)?,
        );
        msg.message_id = Some(env.id.to_string());
        msg.correlation_id = Some(env.cid);
        msg.headers = vec![(H_BCC.to_owned(), HeaderValue::StrList(bcc.clone()))];
        send(shared, &done, held.as_deref_mut(), &msg).await?;
    }
    Ok(())
}

/// One publish of [`fire`]: on the hold's channel, or through the publisher (declaring the
/// marker queue again if the publish comes back unroutable).
async fn send(shared: &Shared, done: &QueueSpec, held: Option<&mut Batch>, msg: &Outgoing) -> Res {
    let publisher = shared.sender.publisher();
    match held {
        Some(batch) => publisher.publish_held(batch, msg).await?,
        None => {
            let deadline = shared.sender.deadline();
            publisher
                .publish_routed(msg, &done.name, &|| Ok(vec![done.clone()]), deadline)
                .await?;
        }
    }
    Ok(())
}

/// The one running join check of a job in this process (see [`try_join`]).
///
/// A part that finishes while its job's check runs here sets the check's `again` flag and
/// returns (its delivery is acked); the check then looks at the part queue once more
/// before it ends. Setting the flag, and ending the check when it is not set, happen under
/// one lock, so no request to look again is lost. If this process dies, the checking
/// part's own delivery (still unacked) is redelivered and its redelivery counts every
/// result, including those of the parts that asked.
struct LocalCheck<'a> {
    shared: &'a Shared,
    key: Uuid,
    finished: bool,
}

impl<'a> LocalCheck<'a> {
    /// Starts the job's check, or (`None`) asks the running one to look again.
    fn begin(shared: &'a Shared, job: &Job) -> Option<Self> {
        let key = job.key.0;
        let Ok(mut checking) = shared.checking.lock() else {
            // A poisoned map: check without coalescing.
            return Some(Self {
                shared,
                key,
                finished: true,
            });
        };
        if let Some(again) = checking.get_mut(&key) {
            *again = true;
            return None;
        }
        checking.insert(key, false);
        Some(Self {
            shared,
            key,
            finished: false,
        })
    }

    /// `true` (and the flag cleared) when another part asked for one more look; otherwise
    /// ends the check.
    fn again(&mut self) -> bool {
        if self.finished {
            return false;
        }
        let Ok(mut checking) = self.shared.checking.lock() else {
            return false;
        };
        match checking.get_mut(&self.key) {
            Some(again) if *again => {
                *again = false;
                true
            }
            _ => {
                checking.remove(&self.key);
                self.finished = true;
                false
            }
        }
    }

    /// Ends the check (a scheduled re-check takes over).
    fn finish(&mut self) {
        if !self.finished {
            if let Ok(mut checking) = self.shared.checking.lock() {
                checking.remove(&self.key);
            }
            self.finished = true;
        }
    }
}

impl Drop for LocalCheck<'_> {
    /// A check that ended with an error: its delivery is delivered again and checks then.
    fn drop(&mut self) {
        self.finish();
    }
}

/// Sends a join re-check for `job` after `delay` (a task on the job's own service).
pub(crate) async fn schedule_check(shared: &Shared, job: &Job, delay: Duration) -> Res {
    let mut env = Envelope::new(
        &Target::new(&job.svc, &job.method)?,
        Value::Null,
        Some(job.cid.clone()),
    );
    env.channel = Via::Join;
    env.hooks = job.hooks.clone();
    env.parent = Some(job.id);
    env.part = Some(PartDecorator {
        part_id: 0,
        total_parts: job.total,
        part_queue: job.part_queue.clone(),
    });
    env.fanout = job.fanout.clone();
    send_later(shared, &env, delay, None).await
}
