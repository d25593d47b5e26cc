//! Wire types of the parallel patterns: the decorator a fan-out target carries, and the
//! payloads its callbacks receive.
//!
//! - Parallel execution: every target carries a [`FanOut`] naming the on-target callbacks;
//!   the worker that finishes a target (success or final failure) sends each callback a
//!   [`TargetOutcome`].
//! - Fan-out/fan-in: the targets are also the parts of a job (a part decorator, the same
//!   exactly-once join as split jobs); the join sends each final callback one
//!   [`FanInOutcome`] with every target's outcome.
//! - Invoke/retry in background: one target with its own retry policy, joined as a job of
//!   one part, so the callback receives exactly one [`RetryOutcome`].

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::envelope::{Failure, HookTarget};

/// Carried by each target of a parallel invoke (the envelope's `fanout` field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FanOut {
    /// The parallel invoke's id, shared by all its targets.
    pub job: Uuid,
    /// This target's position in the caller's list, `0..total`.
    pub index: u32,
    /// How many targets the invoke has.
    pub total: u32,
    /// The `svc.method` that made the call, when it was a handler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Callbacks run after this target finishes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_target: Vec<HookTarget>,
    /// Callbacks run once after all targets finish (fan-in).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_final: Vec<HookTarget>,
    /// Set for a background invoke/retry: what its callback is told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_call: Option<RetryCall>,
}

/// The invoke/retry settings echoed to its callback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryCall {
    /// Attempts in all.
    pub repeats: u32,
    /// Seconds between attempts.
    pub seconds: f64,
    /// The caller's own cid (the handler's, when called from one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orig_cid: Option<String>,
    /// Caller-supplied JSON handed to the callback.
    #[serde(default)]
    pub context: Value,
}

/// What an on-target callback receives after one target finished; also one entry of a
/// [`FanInOutcome`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetOutcome {
    /// The parallel invoke's correlation id.
    pub cid: String,
    /// The `svc.method` that made the call, when it was a handler.
    #[serde(default)]
    pub source: Option<String>,
    /// The target, `svc.method`.
    pub target: String,
    /// The target's position in the caller's list.
    pub index: u32,
    /// `true` when the target succeeded.
    pub ok: bool,
    /// The target's result when `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<Value>,
    /// Why the target failed, when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
    /// When the target was invoked (RFC 3339, UTC).
    pub req_ts_utc: String,
}

/// What a fan-in (final) callback receives once every target finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FanInOutcome {
    /// The parallel invoke's correlation id.
    pub cid: String,
    /// The `svc.method` that made the call, when it was a handler.
    #[serde(default)]
    pub source: Option<String>,
    /// `true` when every target succeeded.
    pub ok: bool,
    /// One outcome per target, in the caller's order.
    pub outcomes: Vec<TargetOutcome>,
}

/// What a background invoke/retry's callback receives, exactly once, at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryOutcome {
    /// `true` when the target finally succeeded.
    pub ok: bool,
    /// The calling `svc.method` (or `"client"` for a call from outside a handler).
    pub source: String,
    /// The target, `svc.method`.
    pub target: String,
    /// Attempts in all that were allowed.
    pub retry_repeats: u32,
    /// Seconds between attempts.
    pub retry_seconds: f64,
    /// The cid the target was invoked with.
    pub call_cid: String,
    /// The caller's own cid.
    #[serde(default)]
    pub orig_cid: Option<String>,
    /// When the target was first invoked (RFC 3339, UTC).
    pub req_ts_utc: String,
    /// The caller's context JSON.
    #[serde(default)]
    pub context: Value,
    /// The attempt that ended it (succeeded, or the last one that failed).
    pub attempts: u32,
    /// The target's result when `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<Value>,
    /// The last failure when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
}

/// Formats milliseconds since the Unix epoch as RFC 3339 UTC with microseconds
/// (`2026-11-23T18:08:00.000000Z`).
#[must_use]
pub fn utc_timestamp(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_micros(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_and_shapes() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00.000000Z");
        let o = TargetOutcome {
            cid: "c".into(),
            source: None,
            target: "a.b".into(),
            index: 0,
            ok: true,
            response: Some(Value::from(3)),
            error: None,
            req_ts_utc: utc_timestamp(1),
        };
        let j = serde_json::to_value(&o).unwrap();
        assert_eq!(j["response"], 3);
        assert!(j.get("error").is_none());
        assert_eq!(serde_json::from_value::<TargetOutcome>(j).unwrap(), o);
    }
}
