//! The exactly-once join of a split job. `docs/joins.md` explains the protocol and walks
//! through every crash point; in short:
//!
//! 1. Every finished part publishes its result (ok or error) to the job's part queue, then,
//!    while its own part task is still unacked, tries to join.
//! 2. A join starts only when the part queue holds at least `total_parts` ready messages.
//! 3. **Lease**: the joiner publishes into `warren.claim.<job>`, a queue that holds at most one
//!    message (`x-overflow=reject-publish`): exactly one publish is acked; the others are
//!    nacked. The lease message expires (`x-message-ttl`), so a dead joiner's lease frees
//!    itself. A contender that lost schedules a delayed re-check of the join.
//! 4. **Done marker**: if `warren.done.<job>` holds a message, the hook already fired: the
//!    joiner only removes the part queue.
//! 5. The joiner takes every result, unacked, and de-duplicates them by `part_id`. Missing
//!    parts (duplicates filled the count): it puts them back, frees the lease, and starts over.
//! 6. **Fire**: one publish to the `warren.join` headers exchange reaches both the hook's
//!    service (through the exchange-to-exchange binding to `warren.tasks`) and the done
//!    marker queue, so "the hook was sent" and "the job is done" are one broker event.
//! 7. The part queue is deleted; the joiner's part task is acked.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;
use warren_core::envelope::ReplyOutcome;
use warren_core::topology::{JobKey, QueueSpec, H_JOB, JOIN_EXCHANGE};
use warren_core::{
    Envelope, Failure, FailureKind, FanOut, HeaderValue, HookTarget, Hooks, Outgoing,
    PartDecorator, Target, Via,
};

use crate::fanout;

use crate::process::Shared;
use crate::publish::send_later;

type Res<T = ()> = Result<T, warren_client::Error>;

/// How many times one join attempt starts over after finding parts missing.
const MAX_ROUNDS: u32 = 5;

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
    fn markers_when_done(&self) -> u32 {
        match &self.fanout {
            Some(f) => u32::try_from(f.on_final.len()).unwrap_or(u32::MAX).max(1),
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

    pub(crate) fn claim(&self, shared: &Shared) -> QueueSpec {
        QueueSpec::claim(&self.key, ms(shared.joins.lease), ms(shared.joins.expiry))
    }

    pub(crate) fn done(&self, shared: &Shared) -> QueueSpec {
        QueueSpec::done(&self.key, ms(shared.joins.expiry))
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

/// How many of the job's done markers exist: one per callback fired so far. Callbacks are
/// fired one at a time, in a fixed order, each in the same publish as its marker, so a
/// joiner that resumes after a crash knows exactly which ones are left.
async fn markers(shared: &Shared, job: &Job) -> Res<u32> {
    let done = job.done(shared);
    Ok(shared
        .client
        .broker()
        .queue_stats(&done.name)
        .await?
        .map_or(0, |s| s.ready))
}

/// `true` when the job's join has fired (or started firing) its hook or callbacks.
pub(crate) async fn is_done(shared: &Shared, job: &Job) -> Res<bool> {
    Ok(markers(shared, job).await? > 0)
}

/// Publishes a part's result to the job's part queue (declaring it if a hand-split job's
/// queue does not exist yet). A result for a job that already joined is dropped.
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
    .map_err(warren_client::Error::Encode)?;
    let mut msg = Outgoing::new("", job.part_queue.clone(), body);
    msg.message_id = Some(env.id.to_string());
    msg.correlation_id = Some(job.cid.clone());
    match shared.client.publish_raw(&msg).await {
        Err(warren_client::Error::Broker(warren_core::Error::Unroutable { .. })) => {
            if is_done(shared, job).await? {
                tracing::debug!(part_id, "late part result for a job that already joined");
                return Ok(());
            }
            let spec = QueueSpec::part(&job.part_queue, ms(shared.joins.expiry))?;
            match shared.client.broker().declare(&[spec]).await {
                // Declared by its producer with other arguments (a client's fan-in, another
                // worker's expiry setting): it exists, which is all this needs.
                Err(warren_core::Error::Refused { .. }) => {}
                other => other?,
            }
            shared.client.publish_raw(&msg).await
        }
        other => other,
    }
}

/// Tries to finish the job's join; returns when it fired, when it is not this caller's to
/// fire (not all parts in, already done, another joiner holds the lease), or after
/// scheduling a re-check.
///
/// Every joiner runs inside an unacked delivery (a part task, a split task or a join check),
/// so a joiner that dies is redelivered and tries again. A first-time contender that loses
/// the lease therefore just stops: the holder is alive, or its redelivery will follow. Only
/// a `redelivered` contender (possibly the dead holder's own retry, facing its own lease)
/// schedules a re-check for after the lease runs out.
pub(crate) async fn try_join(shared: &Shared, job: &Job, redelivered: bool) -> Res {
    let broker = shared.client.broker();
    // When a re-check runs: after any lease that may block the join has expired.
    let recheck_after = shared.joins.lease + Duration::from_millis(500);
    for _ in 0..MAX_ROUNDS {
        if held_here(shared, job) {
            // A joiner in this process holds the lease and is alive (it is us). Our result
            // was recorded before this check, so the holder's next look at the part queue
            // (after it lets go: see `LocalHold`) counts it; nothing is left for us to do.
            tracing::debug!(job = %job.key.0, "a joiner in this process holds the lease");
            return Ok(());
        }
        let ready = if job.total == 0 {
            0
        } else {
            match broker.queue_stats(&job.part_queue).await? {
                None => return Ok(()), // joined (and deleted) or expired
                Some(s) if s.ready < job.total => return Ok(()),
                Some(s) => s.ready,
            }
        };
        // The lease: only one contender's publish is acked. The claim queue is declared when
        // the job is split (or here, on first use, for a job split by its caller).
        let claim = job.claim(shared);
        declare_once(shared, &claim).await?;
        let leased_at = Instant::now();
        let mut lease = Outgoing::new("", claim.name.clone(), b"{}".to_vec());
        lease.persistent = false;
        // A unique id, so a return for this publish is never confused with another's.
        lease.message_id = Some(Uuid::now_v7().to_string());
        let mut published = shared.client.publish_raw(&lease).await;
        if let Err(warren_client::Error::Broker(warren_core::Error::Unroutable { .. })) = published
        {
            broker.declare(std::slice::from_ref(&claim)).await?;
            published = shared.client.publish_raw(&lease).await;
        }
        match published {
            Err(warren_client::Error::Broker(warren_core::Error::Nacked { .. })) => {
                tracing::debug!(job = %job.key.0, redelivered, "another joiner holds the lease");
                if redelivered {
                    return schedule_check(shared, job, recheck_after).await;
                }
                return Ok(());
            }
            other => other?,
        }
        tracing::debug!(job = %job.key.0, ready, "lease won");
        let _hold = LocalHold::new(shared, job);
        // The done-marker queue: declared at split time for split jobs, here for fan-ins.
        declare_once(shared, &job.done(shared)).await?;
        let fired = markers(shared, job).await?;
        if fired >= job.markers_when_done() {
            let _ = broker.delete_queue(&job.part_queue).await?;
            return Ok(());
        }
        if job.total == 0 {
            let payload = Value::Array(Vec::new());
            if !fire(shared, job, true, payload, fired, leased_at).await? {
                return schedule_check(shared, job, recheck_after).await;
            }
            return Ok(());
        }
        tracing::debug!(job = %job.key.0, "not done yet; taking results");
        let total = job.total as usize;
        let mut seen = BTreeSet::<u32>::new();
        let batch = broker
            .take(
                &job.part_queue,
                ready as usize,
                Duration::from_secs(2),
                |bodies| {
                    if let Some(last) = bodies.last() {
                        if let Ok(r) = serde_json::from_slice::<PartResult>(last) {
                            seen.insert(r.part_id);
                        }
                    }
                    seen.len() >= total
                },
            )
            .await?;
        let Some(batch) = batch else { return Ok(()) };
        tracing::debug!(job = %job.key.0, taken = batch.bodies.len(), "part results taken");
        let results = distinct(&batch.bodies, job.total);
        if results.len() < total {
            tracing::debug!(job = %job.key.0, have = results.len(), total, "parts missing; releasing");
            batch.release().await;
            if !release_lease(shared, &claim.name, leased_at).await {
                // Our lease still blocks everyone until it expires: re-check after that.
                return schedule_check(shared, job, recheck_after).await;
            }
            continue;
        }
        if leased_at.elapsed() > shared.joins.lease.mul_f64(0.8) {
            // Our lease may have run out: another joiner could be firing. Let the check decide.
            batch.release().await;
            return schedule_check(shared, job, recheck_after).await;
        }
        let (ok, payload) = hook_payload(job, &results)?;
        if !fire(shared, job, ok, payload, fired, leased_at).await? {
            // The lease ran short between two callbacks: the rest fire after a re-check.
            batch.release().await;
            return schedule_check(shared, job, recheck_after).await;
        }
        tracing::debug!(job = %job.key.0, "hook fired");
        batch.delete_queue(&job.part_queue).await?;
        tracing::info!(job = %job.key.0, parts = total, ok, "split job joined");
        return Ok(());
    }
    schedule_check(shared, job, recheck_after).await
}

/// One result per part id; a success wins over a failure of the same part (a part that
/// failed, then ran again after a crash and succeeded).
fn distinct(bodies: &[Vec<u8>], total: u32) -> BTreeMap<u32, PartResult> {
    let mut out = BTreeMap::<u32, PartResult>::new();
    for b in bodies {
        let Ok(r) = serde_json::from_slice::<PartResult>(b) else {
            tracing::warn!("ignoring a message in a part queue that is not a part result");
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
        return fanout::final_payload(&job.cid, f, results).map_err(warren_client::Error::Encode);
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
    let error = Failure {
        kind: FailureKind::PartsFailed,
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

/// Fires the job's hook (or its callbacks after the `fired` ones already sent), each with
/// its done marker in one publish. Returns `false` when it stopped because the lease was
/// running out (the remaining callbacks fire after a re-check).
async fn fire(
    shared: &Shared,
    job: &Job,
    ok: bool,
    payload: Value,
    fired: u32,
    leased_at: Instant,
) -> Res<bool> {
    let done = job.done(shared);
    let targets = job.fire_targets(ok);
    if targets.is_empty() {
        if fired == 0 {
            let mut marker = Outgoing::new("", done.name.clone(), b"{}".to_vec());
            marker.message_id = Some(Uuid::now_v7().to_string());
            shared.client.publish_raw(&marker).await?;
        }
        return Ok(true);
    }
    for (i, t) in targets.iter().enumerate().skip(fired as usize) {
        if i > fired as usize && leased_at.elapsed() > shared.joins.lease.mul_f64(0.8) {
            return Ok(false);
        }
        // The callback's queue must exist, or the publish would reach only the done marker.
        shared.client.ensure_service(&t.svc).await?;
        let mut env = Envelope::new(
            &Target::new(&t.svc, &t.method)?,
            payload.clone(),
            Some(job.cid.clone()),
        );
        env.channel = job.via();
        env.parent = Some(job.id);
        let mut msg = Outgoing::new(
            JOIN_EXCHANGE,
            t.svc.clone(),
            env.to_bytes().map_err(warren_client::Error::Encode)?,
        );
        msg.message_id = Some(env.id.to_string());
        msg.correlation_id = Some(env.cid);
        msg.headers = vec![(H_JOB.to_owned(), HeaderValue::Str(job.key.0.to_string()))];
        shared.client.publish_raw(&msg).await?;
    }
    Ok(true)
}

/// `true` when a joiner of this process holds `job`'s lease right now.
fn held_here(shared: &Shared, job: &Job) -> bool {
    shared.holding.lock().is_ok_and(|h| h.contains(&job.key.0))
}

/// Marks a job's lease as held by a joiner of this process, so this process's other
/// contenders skip their (doomed) lease attempts. Released when the holder leaves the
/// round that won the lease: before it looks at the part queue again, so any result a
/// skipper recorded is counted by the holder's next round or by a scheduled re-check.
struct LocalHold<'a> {
    shared: &'a Shared,
    key: Uuid,
}

impl<'a> LocalHold<'a> {
    fn new(shared: &'a Shared, job: &Job) -> Self {
        if let Ok(mut h) = shared.holding.lock() {
            h.insert(job.key.0);
        }
        Self {
            shared,
            key: job.key.0,
        }
    }
}

impl Drop for LocalHold<'_> {
    fn drop(&mut self) {
        if let Ok(mut h) = self.shared.holding.lock() {
            h.remove(&self.key);
        }
    }
}

/// Declares a join queue unless this process already did (a queue deleted since is declared
/// again by the callers' unroutable fallbacks).
async fn declare_once(shared: &Shared, spec: &QueueSpec) -> Res {
    let known = shared.declared.lock().is_ok_and(|d| d.contains(&spec.name));
    if known {
        return Ok(());
    }
    shared
        .client
        .broker()
        .declare(std::slice::from_ref(spec))
        .await?;
    if let Ok(mut d) = shared.declared.lock() {
        if d.len() >= 10_000 {
            d.clear();
        }
        d.insert(spec.name.clone());
    }
    Ok(())
}

/// Frees our lease early if it cannot have expired yet (purging later could remove the
/// lease of the next holder); `false` when it was left to expire.
async fn release_lease(shared: &Shared, claim: &str, leased_at: Instant) -> bool {
    leased_at.elapsed() < shared.joins.lease / 2
        && shared.client.broker().purge_queue(claim).await.is_ok()
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
