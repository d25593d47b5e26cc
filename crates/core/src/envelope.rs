//! The wire format: one JSON [`Envelope`] per task, one JSON [`Reply`] per answered invoke.
//!
//! `docs/wire-format.md` specifies both for producers in other languages. Decoding goes in
//! two steps so that each way a body can be bad gets its own [`DecodeError`]: first "is it
//! JSON at all", then "is it envelope version 1", then "does it have version 1's fields".

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::names::Target;
use crate::patterns::FanOut;
use crate::retry::RetryPolicy;

/// The envelope version this build writes and reads.
pub const ENVELOPE_VERSION: u64 = 1;

/// How a task entered the system (the seed's "channel").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Via {
    /// Fire-and-forget enqueue.
    #[default]
    Enqueue,
    /// A request/response invoke; the reply goes to the message's `reply_to`.
    Invoke,
    /// A hook fired by another task's outcome.
    Hook,
    /// One part of a split job.
    Part,
    /// A target of a parallel invoke (or fan-out, or background invoke/retry).
    Parallel,
    /// A callback run after one target of a parallel invoke finished (the seed's
    /// `PARALLEL_EXEC_ON_TARGET`).
    OnTarget,
    /// A fan-in callback, run once after all targets of a parallel invoke finished.
    OnFinal,
    /// The callback of a background invoke/retry, run once at its end.
    RetryCallback,
    /// A retry of an earlier attempt.
    Retry,
    /// A delivery from a pub/sub topic.
    Publish,
    /// A step of a chain.
    Chain,
    /// A re-check of a split job's join (scheduled when a join could not finish at once).
    Join,
    /// A value this build does not know (written by a newer producer).
    #[serde(other)]
    Other,
}

/// A `svc.method` a hook invokes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookTarget {
    /// Service name.
    pub svc: String,
    /// Method name.
    pub method: String,
}

impl From<&Target> for HookTarget {
    fn from(t: &Target) -> Self {
        Self {
            svc: t.service().to_owned(),
            method: t.method().to_owned(),
        }
    }
}

/// Work warren runs on a task's outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hooks {
    /// Invoked with the result on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oncomplete: Option<HookTarget>,
    /// Invoked with the error on final failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onerror: Option<HookTarget>,
}

impl Hooks {
    /// `true` when no hook is set.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.oncomplete.is_none() && self.onerror.is_none()
    }
}

/// Marks a task as one part of a split job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartDecorator {
    /// This part's index, `0..total_parts`.
    pub part_id: u32,
    /// How many parts the job has.
    pub total_parts: u32,
    /// The job's part queue, `part.<svc>-<method>-<id>`.
    pub part_queue: String,
}

/// One task: which `svc.method` to run on which payload, and everything warren needs to
/// track it. Unknown fields are ignored, so newer producers can add optional fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Envelope version, always [`ENVELOPE_VERSION`].
    pub v: u64,
    /// Unique task id.
    pub id: Uuid,
    /// Correlation id, inherited by everything this task causes.
    pub cid: String,
    /// Service name.
    pub svc: String,
    /// Method name.
    pub method: String,
    /// The handler's input.
    #[serde(default)]
    pub payload: Value,
    /// Hooks to run on the outcome.
    #[serde(
        default,
        skip_serializing_if = "Hooks::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub hooks: Hooks,
    /// How the task was sent.
    #[serde(default)]
    pub channel: Via,
    /// 1 for the first attempt, incremented by each retry.
    #[serde(default = "first_attempt")]
    pub attempt: u32,
    /// The task that caused this one, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Uuid>,
    /// For a step of a chain: the chain, its position and its bog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<crate::chain::ChainState>,
    /// Split-job decorator (reserved for split jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<PartDecorator>,
    /// When the task was created, milliseconds since the Unix epoch.
    #[serde(default)]
    pub created_ms: u64,
    /// The task's own retry policy; overrides the method's, service's and worker's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Set on the targets of a parallel invoke: its callbacks and position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fanout: Option<FanOut>,
    /// The caller repeats this call itself if the handler fails (a blocking invoke/retry
    /// attempt that is not the last): a handler error is answered but not dead-lettered.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub caller_retries: bool,
    /// For a message published to a topic: the topic. On the wire its `svc` is `topic` and
    /// its `method` the topic name; each subscriber's worker runs its own `svc.method`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// A topic the task's final status (`succeeded` or `failed`) is published to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<String>,
    /// `true` when this task may have been sent before: a part task published again by a
    /// split task that was redelivered after a crash. A worker shows it to the handler as
    /// `ctx.redelivered()`, so a re-run part is always marked.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resent: bool,
    /// The task's own hard time limit per attempt, in ms (at least 1): the handler is
    /// stopped at this deadline and the attempt fails with kind `timeout`. When its method
    /// has a limit too, the smaller one applies (docs/time.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_limit_ms: Option<u64>,
    /// The task's concurrency key (`Task::key`, 1 to 255 bytes): a method with a per-key
    /// limit (`Service::key_concurrency`) runs at most that many tasks of one key at a time
    /// (docs/flow.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The task's priority (`Task::priority`), also sent as the AMQP `priority` property; only
    /// a service queue with a priority range orders by it (docs/flow.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// For a unique task (`Task::unique`): its key. While the task is pending or running,
    /// the store entry `warren:unique:<svc>.<method>:<key>` holds its id, and another
    /// enqueue with the same key gets this task's receipt instead of a new task; the worker
    /// removes the entry (if it still holds this id) when the task ends (docs/cancellation.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique: Option<String>,
}

fn first_attempt() -> u32 {
    1
}

/// `null` reads as the field's default (`"hooks": null` means no hooks).
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `true` when `text` holds a `\u` escape of a UTF-16 surrogate (`\ud800` to `\udfff`).
/// An escaped backslash followed by `ud8..` counts too: that only costs a second parse.
fn has_surrogate_escape(text: &str) -> bool {
    // Every body is scanned: memchr finds the (rare) backslashes with SIMD.
    let bytes = text.as_bytes();
    memchr::memchr_iter(b'\\', bytes).any(|i| {
        matches!(
            bytes.get(i + 1..i + 4),
            Some([b'u', b'd' | b'D', b'8'..=b'9' | b'a'..=b'f' | b'A'..=b'F'])
        )
    })
}

/// `true` when `text` may hold a number beyond `f64`'s range, which serde_json's `Value`
/// refuses ("number out of range") but skips unchecked in a field the envelope does not
/// know: a number with an exponent of three digits or more, or with 20 digits or more and
/// an exponent, or a run of 300 digits. Only digits that follow `:`, `,`, `[` or blank (a
/// number's place in JSON, not the inside of an id) count; a match inside a string only
/// costs a second parse.
fn may_hold_huge_number(text: &str) -> bool {
    let bytes = text.as_bytes();
    if bytes.len() >= 300 {
        let mut run = 0usize;
        for &c in bytes {
            run = if c.is_ascii_digit() { run + 1 } else { 0 };
            if run >= 300 {
                return true;
            }
        }
    }
    memchr::memchr2_iter(b'e', b'E', bytes).any(|e| {
        // The digits (and point) before the exponent, and what comes before them.
        let mantissa = bytes[..e]
            .iter()
            .rev()
            .take_while(|c| c.is_ascii_digit() || **c == b'.')
            .count();
        if mantissa == 0 {
            return false;
        }
        let mut start = e - mantissa;
        if start > 0 && bytes[start - 1] == b'-' {
            start -= 1;
        }
        let in_number = start == 0
            || matches!(
                bytes[start - 1],
                b':' | b',' | b'[' | b' ' | b'\t' | b'\n' | b'\r'
            );
        let mut digits = e + 1;
        if matches!(bytes.get(digits), Some(b'+' | b'-')) {
            digits += 1;
        }
        let exponent = bytes
            .get(digits..)
            .unwrap_or_default()
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        in_number && (exponent >= 3 || (exponent > 0 && mantissa >= 20))
    })
}

/// `id` as its hyphenated lower-case text (`01934f7e-6c1e-7b8a-9a52-4c1f0e6f2a10`), the form
/// of every task id on the wire. Same text as `id.to_string()`, without the formatting
/// machinery (every publish writes one or two).
#[must_use]
pub fn id_string(id: &Uuid) -> String {
    id.hyphenated()
        .encode_lower(&mut Uuid::encode_buffer())
        .to_owned()
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
#[must_use]
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Envelope {
    /// A new first-attempt task for `target`, with a fresh id and the given (or a fresh) cid.
    #[must_use]
    pub fn new(target: &Target, payload: Value, cid: Option<String>) -> Self {
        let id = Uuid::now_v7();
        Self {
            v: ENVELOPE_VERSION,
            id,
            cid: cid.unwrap_or_else(|| id_string(&Uuid::now_v7())),
            svc: target.service().to_owned(),
            method: target.method().to_owned(),
            payload,
            hooks: Hooks::default(),
            channel: Via::Enqueue,
            attempt: 1,
            parent: None,
            chain: None,
            part: None,
            created_ms: now_ms(),
            retry: None,
            fanout: None,
            caller_retries: false,
            topic: None,
            notify: None,
            resent: false,
            time_limit_ms: None,
            key: None,
            priority: None,
            unique: None,
        }
    }

    /// The task's target, validated.
    pub fn target(&self) -> Result<Target, DecodeError> {
        Target::new(&self.svc, &self.method).map_err(|e| DecodeError::Invalid(e.to_string()))
    }

    /// Encodes to JSON bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        // A small task's envelope is about 250 bytes: one allocation instead of a doubling
        // series from serde_json's 128.
        let mut out = Vec::with_capacity(384);
        serde_json::to_writer(&mut out, self)?;
        Ok(out)
    }

    /// Decodes a body: JSON, then version, then fields, then names.
    ///
    /// The common case (a valid version-1 envelope) is decoded in one pass; only a body that
    /// fails is parsed again, to say precisely why.
    pub fn from_bytes(body: &[u8]) -> Result<Self, DecodeError> {
        // The whole body must be UTF-8, unknown fields included: serde_json skips over the
        // strings of fields it ignores without checking them.
        let text = std::str::from_utf8(body).map_err(DecodeError::NotUtf8)?;
        let env: Envelope = match serde_json::from_str(text) {
            Ok(env) => env,
            Err(_) => return Err(Self::diagnose(body)),
        };
        // Nor the `\u` escapes of those strings: a lone surrogate (`"\ud800"`) in an unknown
        // field would pass, and other readers refuse the body. A body with a surrogate escape
        // (rare: most producers write non-ASCII as UTF-8) is parsed whole once more.
        // The same for numbers too large for an f64 (`1e400`), which it skips unchecked too.
        if has_surrogate_escape(text) || may_hold_huge_number(text) {
            serde_json::from_str::<Value>(text).map_err(DecodeError::Malformed)?;
        }
        if env.v != ENVELOPE_VERSION {
            return Err(DecodeError::UnsupportedVersion(env.v.to_string()));
        }
        env.validate().map_err(DecodeError::Invalid)?;
        Ok(env)
    }

    /// Why `body` is not a version-1 envelope.
    fn diagnose(body: &[u8]) -> DecodeError {
        let value: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return DecodeError::Malformed(e),
        };
        let Some(v) = value.get("v") else {
            return DecodeError::MissingVersion;
        };
        if v.as_u64() != Some(ENVELOPE_VERSION) {
            return DecodeError::UnsupportedVersion(v.to_string());
        }
        match serde_json::from_value::<Envelope>(value) {
            Err(e) => DecodeError::Invalid(e.to_string()),
            Ok(_) => DecodeError::Invalid("unreadable envelope".to_owned()),
        }
    }
}

/// Why a message body is not a task warren can run. None of these can succeed on retry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The body is not UTF-8 (anywhere, unknown fields included).
    #[error("body is not UTF-8: {0}")]
    NotUtf8(#[source] std::str::Utf8Error),
    /// The body is not JSON.
    #[error("body is not valid JSON: {0}")]
    Malformed(#[source] serde_json::Error),
    /// The body has no `v` field.
    #[error("envelope has no version field `v`")]
    MissingVersion,
    /// The body's `v` is not one this build reads.
    #[error("envelope version {0} is not supported (this worker reads version 1)")]
    UnsupportedVersion(String),
    /// Version 1, but a field is missing, mistyped or invalid.
    #[error("invalid envelope: {0}")]
    Invalid(String),
}

/// What kind of failure a task ended in; callers can match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureKind {
    /// The handler returned an error (after its retries).
    Handler,
    /// The handler rejected the task for good.
    Rejected,
    /// The handler panicked.
    Panic,
    /// The message was not a valid envelope.
    BadEnvelope,
    /// The payload did not deserialize into the handler's input type.
    BadPayload,
    /// No such service or method on the worker that received it.
    UnknownTarget,
    /// One or more parts of a split job failed for good.
    PartsFailed,
    /// The handler ran past its hard time limit and was stopped (after its retries).
    Timeout,
    /// The task was cancelled (`Client::cancel`, by id or cid) before it ran or while it
    /// ran; never retried, never dead-lettered.
    Cancelled,
    /// The task ran, but what its outcome implies (a hook, a part result, a chain's next
    /// step, a reply) could not be published, and retrying cannot help.
    Undeliverable,
    /// A kind this build does not know.
    #[serde(other)]
    Other,
}

impl FailureKind {
    /// The snake_case name used on the wire and in dead-letter headers.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Handler => "handler",
            Self::Rejected => "rejected",
            Self::Panic => "panic",
            Self::BadEnvelope => "bad_envelope",
            Self::BadPayload => "bad_payload",
            Self::UnknownTarget => "unknown_target",
            Self::PartsFailed => "parts_failed",
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
            Self::Undeliverable => "undeliverable",
            Self::Other => "other",
        }
    }
}

/// A task's failure as reported to callers and hooks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{}: {message}", kind.as_str())]
pub struct Failure {
    /// What kind of failure.
    pub kind: FailureKind,
    /// Human-readable reason (the handler's error chain, the decode error, the panic text).
    pub message: String,
}

/// The answer to an invoke, published to the caller's reply queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Envelope version.
    pub v: u64,
    /// The task id this answers.
    pub id: Uuid,
    /// The task's cid.
    pub cid: String,
    /// `Ok(result)` or `Err(failure)`, as `{"ok": result}` / `{"error": failure}` on the wire.
    #[serde(flatten)]
    pub outcome: ReplyOutcome,
}

/// The answer to an `invoke` of a method that has a splitter (`<method>_part`): the split
/// job started, with this many parts. The job's result goes to its hooks at the join, not
/// to the caller. On the wire: `{"ok": {"job": "<split task id>", "parts": 10}}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitStarted {
    /// The split task's id (the parts' `parent`).
    pub job: Uuid,
    /// How many parts were sent.
    pub parts: u32,
}

/// The two shapes of a [`Reply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyOutcome {
    /// The handler's result.
    Ok(Value),
    /// Why the task failed.
    Error(Failure),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_string_is_to_string() {
        let id = Uuid::now_v7();
        assert_eq!(id_string(&id), id.to_string());
    }

    #[test]
    fn round_trip_and_errors() {
        let t: Target = "svc.m".parse().unwrap();
        let e = Envelope::new(&t, serde_json::json!({"x": 1}), Some("c1".into()));
        let back = Envelope::from_bytes(&e.to_bytes().unwrap()).unwrap();
        assert_eq!(back, e);
        assert!(matches!(
            Envelope::from_bytes(b"{nope"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            Envelope::from_bytes(br#"{"id":1}"#),
            Err(DecodeError::MissingVersion)
        ));
        // A lone surrogate escape inside a field the envelope does not know is refused; a
        // surrogate pair there is fine.
        for (extra, ok) in [
            (r#""\ud800""#, false),
            (r#""a\uDC00b""#, false),
            (r#""\ud83d\ude00""#, true),
            (r#""\\ud800""#, true),
        ] {
            let mut body = e.to_bytes().unwrap();
            body.pop();
            body.extend_from_slice(format!(",\"extra\":{extra}}}").as_bytes());
            let res = Envelope::from_bytes(&body);
            assert_eq!(res.is_ok(), ok, "{extra}: {res:?}");
            if !ok {
                assert!(matches!(res, Err(DecodeError::Malformed(_))), "{extra}");
            }
        }
        // A number beyond f64 inside a field the envelope does not know is refused (fuzz
        // finding `body-is-json`, 2026-12-07); large numbers in range, and ids or strings
        // that look like exponents, are fine.
        for (extra, ok) in [
            ("11e400763900000000", false),
            ("1e309", false),
            ("-2.5E+400", false),
            ("[1, 1e999]", false),
            (&format!("{}e60", "1".repeat(250)), false),
            (&"9".repeat(400), false),
            ("1e308", true),
            ("1.5e-300", true),
            (r#""1e400""#, true),
            (r#""0192e400-0008-7000-8000-000000000000""#, true),
            (&format!("{}e5", "1".repeat(30)), true),
        ] {
            let mut body = e.to_bytes().unwrap();
            body.pop();
            body.extend_from_slice(format!(",\"extra\":{extra}}}").as_bytes());
            let res = Envelope::from_bytes(&body);
            assert_eq!(res.is_ok(), ok, "{extra}: {res:?}");
        }
        // Invalid UTF-8 inside a field the envelope does not know is still refused.
        let mut good = e.to_bytes().unwrap();
        good.pop();
        good.extend_from_slice(b",\"extra\":\"\xff\xfe\"}");
        assert!(matches!(
            Envelope::from_bytes(&good),
            Err(DecodeError::NotUtf8(_))
        ));
        assert!(matches!(
            Envelope::from_bytes(br#"{"v":2}"#),
            Err(DecodeError::UnsupportedVersion(_))
        ));
        assert!(matches!(
            Envelope::from_bytes(br#"{"v":1,"id":"x"}"#),
            Err(DecodeError::Invalid(_))
        ));
        let minimal = r#"{"v":1,"id":"0192e4a0-0000-7000-8000-000000000000","cid":"c","svc":"s","method":"m"}"#;
        let env = Envelope::from_bytes(minimal.as_bytes()).unwrap();
        assert_eq!(env.attempt, 1);
        assert_eq!(env.payload, Value::Null);
        let bad = minimal.replace("\"s\"", "\"S\"");
        assert!(Envelope::from_bytes(bad.as_bytes()).is_err()); // `resent` (docs/wire-format.md): absent means false, and false is not written.
        assert!(!env.resent);
        assert!(!String::from_utf8(env.to_bytes().unwrap())
            .unwrap()
            .contains("resent"));
        let resent = minimal.replace("\"m\"}", "\"m\",\"resent\":true}");
        assert!(Envelope::from_bytes(resent.as_bytes()).unwrap().resent);
    }

    #[test]
    fn reply_shape() {
        let r = Reply {
            v: 1,
            id: Uuid::nil(),
            cid: "c".into(),
            outcome: ReplyOutcome::Error(Failure {
                kind: FailureKind::Handler,
                message: "boom".into(),
            }),
        };
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["error"]["kind"], "handler");
        let back: Reply = serde_json::from_value(j).unwrap();
        assert_eq!(back, r);
    }
}
