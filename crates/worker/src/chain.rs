//! Chain steps: after a step succeeds, its returned key-values are merged into the bog and
//! the next step is sent (before this step's ack); after the last step, or a step that
//! failed for good, the chain's outcome goes to its waiting handle and the status store.

use serde_json::{Map, Value};
use warren_core::envelope::ReplyOutcome;
use warren_core::status::{ChainProgress, TaskState, TaskStatus};
use warren_core::topology::is_reply_queue;
use warren_core::{Envelope, Incoming, Target, Via};

use crate::process::Shared;
use crate::publish::reply;

type Res = warren_core::Result<()>;

/// Merges `result` into the bog and sends the next step, or ends the chain.
pub(crate) async fn advance(
    shared: &Shared,
    d: &Incoming,
    env: &Envelope,
    result: Value,
    children: Map<String, Value>,
) -> Res {
    let Some(mut state) = env.chain.clone() else {
        return Ok(());
    };
    state.children.extend(children);
    if let Err(message) = state.merge(result) {
        // run() refuses non-object results first; this is a safety net.
        let f = warren_core::Failure {
            kind: warren_core::FailureKind::Rejected,
            message,
        };
        return end(shared, d, env, ReplyOutcome::Error(f)).await;
    }
    if state.is_last() {
        let v = serde_json::to_value(state.outcome()).map_err(warren_core::Error::Json)?;
        return end(shared, d, env, ReplyOutcome::Ok(v)).await;
    }
    let next = state.next();
    let Some(step) = next.step() else {
        return Ok(());
    };
    let mut task = Envelope::new(
        &Target::new(&step.svc, &step.method)?,
        Value::Null,
        Some(env.cid.clone()),
    );
    task.id = next.step_id(next.index);
    task.channel = Via::Chain;
    task.parent = Some(env.id);
    task.chain = Some(next);
    // The chain is at this step from now on (waiting for a worker), for the web admin.
    if let (Some(r), Some(p)) = (
        shared.recorder.as_ref(),
        ChainProgress::of(&task, TaskState::Pending),
    ) {
        r.chain_progress(&p).await;
    }
    let reply_to = d.reply_to().filter(|r| is_reply_queue(r));
    tracing::debug!(chain = %state.id, step = task.chain.as_ref().map_or(0, |c| c.index), "next chain step");
    shared
        .sender
        .send(&task, reply_to, shared.sender.deadline())
        .await
}

/// Reports the chain's outcome: to its waiting handle (under the chain's id) and to the
/// status store.
pub(crate) async fn end(
    shared: &Shared,
    d: &Incoming,
    env: &Envelope,
    outcome: ReplyOutcome,
) -> Res {
    let Some(state) = &env.chain else {
        return Ok(());
    };
    let mut as_chain = env.clone();
    as_chain.id = state.id;
    if let Some(r) = shared.recorder.as_ref() {
        r.chain_ended(state.id).await;
        let (st, result, error) = match &outcome {
            ReplyOutcome::Ok(v) => (TaskState::Succeeded, Some(v.clone()), None),
            ReplyOutcome::Error(f) => (TaskState::Failed, None, Some(f.clone())),
        };
        r.record(&TaskStatus {
            id: state.id,
            cid: env.cid.clone(),
            target: format!("chain of {} steps", state.steps.len()),
            state: st,
            attempts: env.attempt,
            result,
            error,
            created_ms: env.created_ms,
            updated_ms: warren_core::envelope::now_ms(),
        })
        .await;
    }
    tracing::info!(chain = %state.id, ok = matches!(outcome, ReplyOutcome::Ok(_)), "chain ended");
    reply(shared, d, Some(&as_chain), outcome).await
}
