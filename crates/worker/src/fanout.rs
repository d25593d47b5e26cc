//! The callbacks of parallel targets: on-target callbacks (sent by the worker that ran a
//! target, after each target) and the payloads of the final callbacks that the join fires
//! (fan-in and background invoke/retry).

use std::collections::BTreeMap;

use futures_util::future::try_join_all;
use serde_json::Value;
use warren_core::envelope::ReplyOutcome;
use warren_core::patterns::utc_timestamp;
use warren_core::{
    Envelope, Failure, FailureKind, FanInOutcome, FanOut, RetryOutcome, Target, TargetOutcome, Via,
};

use crate::join::PartResult;
use crate::process::Shared;

/// One target's outcome as its callbacks see it.
pub(crate) fn target_outcome(
    cid: &str,
    f: &FanOut,
    index: u32,
    target: String,
    req_ms: u64,
    outcome: &ReplyOutcome,
) -> TargetOutcome {
    let (ok, response, error) = match outcome {
        ReplyOutcome::Ok(v) => (true, Some(v.clone()), None),
        ReplyOutcome::Error(e) => (false, None, Some(e.clone())),
    };
    TargetOutcome {
        cid: cid.to_owned(),
        source: f.source.clone(),
        target,
        index,
        ok,
        response,
        error,
        req_ts_utc: utc_timestamp(req_ms),
    }
}

/// Sends every on-target callback of a finished parallel target (at-least-once: a worker
/// that dies after sending them and before its ack runs the target and sends them again).
pub(crate) async fn on_target(
    shared: &Shared,
    env: Option<&Envelope>,
    outcome: &ReplyOutcome,
) -> warren_core::Result<()> {
    let Some((env, f)) = env.and_then(|e| e.fanout.as_ref().map(|f| (e, f))) else {
        return Ok(());
    };
    if f.on_target.is_empty() {
        return Ok(());
    }
    let target = format!("{}.{}", env.svc, env.method);
    let o = target_outcome(&env.cid, f, f.index, target, env.created_ms, outcome);
    let payload = serde_json::to_value(&o).map_err(warren_core::Error::Json)?;
    try_join_all(f.on_target.iter().map(|cb| {
        let payload = payload.clone();
        async move {
            let t = Target::new(&cb.svc, &cb.method)?;
            let mut call = Envelope::new(&t, payload, Some(env.cid.clone()));
            call.channel = Via::OnTarget;
            call.parent = Some(env.id);
            shared
                .sender
                .send(&call, None, shared.sender.deadline())
                .await
        }
    }))
    .await?;
    Ok(())
}

/// The payload of a fan-in's final callbacks (every target's outcome, in the caller's
/// order), or of a background invoke/retry's callback; and whether it all succeeded.
pub(crate) fn final_payload(
    cid: &str,
    f: &FanOut,
    results: &BTreeMap<u32, PartResult>,
) -> Result<(bool, Value), serde_json::Error> {
    let outcome_of = |r: &PartResult| {
        target_outcome(
            cid,
            f,
            r.part_id,
            r.target.clone().unwrap_or_default(),
            r.req_ms.unwrap_or_default(),
            &r.outcome,
        )
    };
    if let Some(call) = &f.retry_call {
        let first = results.values().next();
        let o = first.map(outcome_of);
        let ok = o.as_ref().is_some_and(|o| o.ok);
        let payload = RetryOutcome {
            ok,
            source: f.source.clone().unwrap_or_else(|| "client".to_owned()),
            target: o.as_ref().map(|o| o.target.clone()).unwrap_or_default(),
            retry_repeats: call.repeats,
            retry_seconds: call.seconds,
            call_cid: cid.to_owned(),
            orig_cid: call.orig_cid.clone(),
            req_ts_utc: o.as_ref().map(|o| o.req_ts_utc.clone()).unwrap_or_default(),
            context: call.context.clone(),
            attempts: first.and_then(|r| r.attempt).unwrap_or(1),
            response: o.as_ref().and_then(|o| o.response.clone()),
            error: match &o {
                Some(o) => o.error.clone(),
                None => Some(Failure {
                    kind: FailureKind::Other,
                    message: "the call left no outcome".into(),
                }),
            },
        };
        return Ok((ok, serde_json::to_value(payload)?));
    }
    let outcomes: Vec<TargetOutcome> = results.values().map(outcome_of).collect();
    let ok = outcomes.iter().all(|o| o.ok);
    let payload = FanInOutcome {
        cid: cid.to_owned(),
        source: f.source.clone(),
        ok,
        outcomes,
    };
    Ok((ok, serde_json::to_value(payload)?))
}
