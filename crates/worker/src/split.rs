//! Splitting a task into parts: a method `m` on a service that also registers `m_part` (the
//! splitter) is, when a task for `m` arrives without a part decorator, run as a split job.

use futures_util::{StreamExt, TryStreamExt};
use serde_json::Value;
use uuid::Uuid;
use warren_core::envelope::ReplyOutcome;
use warren_core::topology::{part_queue, JobKey, QueueSpec};
use warren_core::validate::MAX_PARTS;
use warren_core::{Envelope, Incoming, PartDecorator, SplitStarted, Via};

use crate::publish::reply;

use crate::join::{self, Job};
use crate::process::Shared;

/// Part tasks published at once while splitting.
const IN_FLIGHT: usize = 256;

/// The splitter method's name for `method`.
pub(crate) fn splitter_name(method: &str) -> String {
    format!("{method}_part")
}

/// Creates the part queue and publishes one part task per payload; zero parts join at once.
/// A redelivered split task whose job already joined does nothing (its parts ran).
pub(crate) async fn split(
    shared: &Shared,
    d: &Incoming,
    env: &Envelope,
    parts: Vec<Value>,
) -> warren_core::Result<()> {
    let queue = part_queue(&env.svc, &env.method, &env.id)?;
    let total = u32::try_from(parts.len()).map_err(|_| {
        warren_core::Error::Config("a splitter returned more than u32::MAX parts".into())
    })?;
    let job = Job {
        key: JobKey::of(&queue),
        part_queue: queue.clone(),
        total,
        hooks: env.hooks.clone(),
        cid: env.cid.clone(),
        id: env.id,
        svc: env.svc.clone(),
        method: env.method.clone(),
        fanout: None,
    };
    if total > MAX_PARTS {
        return Err(warren_core::Error::Config(format!(
            "splitter {} returned {total} parts; a split job has at most {MAX_PARTS}",
            splitter_name(&env.method)
        )));
    }
    if d.redelivered && join::is_done(shared, &job).await? {
        tracing::info!("split task redelivered after its job joined; nothing to do");
        return answer(shared, d, env, total).await;
    }
    tracing::info!(parts = total, part_queue = %queue, "split");
    if total == 0 {
        join::try_join(shared, &job).await?;
        return answer(shared, d, env, total).await;
    }
    let expiry = u64::try_from(shared.joins.expiry.as_millis()).unwrap_or(u64::MAX);
    shared
        .sender
        .publisher()
        .declare_cached(&queue, &[QueueSpec::part(&queue, expiry)?])
        .await?;
    // The job's total, for the web admin (a part queue counts the results in, not the parts).
    if let Some(r) = shared.recorder.as_ref() {
        r.job_total(env.id, total).await;
    }
    // A redelivered split task may have published some parts already: every part it sends
    // now is marked, so a part that runs twice is always seen as a possible re-run.
    let resent = d.redelivered;
    futures_util::stream::iter(parts.into_iter().enumerate())
        .map(|(i, payload)| {
            let part_id = u32::try_from(i).unwrap_or(u32::MAX);
            let mut part = env.clone();
            // Deterministic ids: a re-split after a crash publishes the same part tasks.
            part.id = Uuid::new_v5(&env.id, &part_id.to_be_bytes());
            part.payload = payload;
            part.channel = Via::Part;
            part.attempt = 1;
            part.parent = Some(env.id);
            part.resent = resent;
            part.part = Some(PartDecorator {
                part_id,
                total_parts: total,
                part_queue: queue.clone(),
            });
            async move {
                shared
                    .sender
                    .send(&part, None, shared.sender.deadline())
                    .await
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<()>()
        .await?;
    answer(shared, d, env, total).await
}

/// Answers an invoker of a split method: the job started, with `parts` parts (its result
/// goes to the job's hooks at the join).
async fn answer(
    shared: &Shared,
    d: &Incoming,
    env: &Envelope,
    parts: u32,
) -> warren_core::Result<()> {
    let started = SplitStarted { job: env.id, parts };
    let value = serde_json::to_value(started).map_err(warren_core::Error::Json)?;
    reply(shared, d, Some(env), ReplyOutcome::Ok(value)).await
}
