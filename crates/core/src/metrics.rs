//! The names and labels of every metric warren records, and the helpers that record the
//! ones decided in this crate (publish retries, reconnects, tasks sent, invoke latency).
//!
//! warren records through the [`metrics`](https://docs.rs/metrics) facade: nothing is kept
//! until the application (or a worker's `WorkerBuilder::metrics_listen`) installs a
//! recorder, and without one every call here is a no-op. docs/operations.md lists each
//! metric with its labels and a sample Prometheus scrape; this module is the one place the
//! names are spelled, so the docs and the code agree.
//!
//! Labels stay bounded: a service and a method name (the worker uses [`OTHER_METHOD`] for
//! a method it does not host, so a stream of bad tasks cannot create label values), a
//! failure kind, a channel ([`via_label`]) or a fixed reason. Task ids and cids are never
//! labels.

use std::time::Duration;

use crate::envelope::{Envelope, FailureKind, Via};

/// Counter `{service, method}`: deliveries of tasks a worker took from a service or
/// subscription queue (one per attempt; join re-checks, dropped duplicate chain steps and
/// deliveries deferred by flow control, counted in [`TASKS_DEFERRED`], are not counted).
pub const TASKS_RECEIVED: &str = "warren_tasks_received_total";
/// Counter `{service, method}`: tasks whose handler succeeded (a splitter that split, a
/// chain step that returned), counted once the outcome was published and acked.
pub const TASKS_SUCCEEDED: &str = "warren_tasks_succeeded_total";
/// Counter `{service, method, kind}`: tasks that failed for good, by [`FailureKind`]
/// (`handler` after the last attempt, `rejected`, `panic`, `bad_payload`, `unknown_target`,
/// `bad_envelope`, `undeliverable`, `timeout`, `cancelled`).
pub const TASKS_FAILED: &str = "warren_tasks_failed_total";
/// Counter `{service, method}`: failed attempts whose next attempt was published (a retry,
/// now or through a delay queue).
pub const TASKS_RETRIED: &str = "warren_tasks_retried_total";
/// Counter `{service, method, kind}`: dead letters a worker published to
/// `warren.dead.<service>`.
pub const TASKS_DEAD_LETTERED: &str = "warren_tasks_dead_lettered_total";
/// Counter `{service, method}`: deliveries requeued because their outcome could not be
/// published yet (the broker or the store unreachable); each runs again.
pub const TASKS_REQUEUED: &str = "warren_tasks_requeued_total";
/// Histogram `{service, method}`, seconds: how long a handler ran (payload decoding
/// included).
pub const TASK_DURATION: &str = "warren_task_duration_seconds";
/// Histogram `{service, method}`, seconds: from the task's creation (`created_ms` of its
/// envelope, the sender's clock) to its handler's start, for first attempts only (a retry
/// keeps its first attempt's `created_ms`).
pub const TASK_QUEUE_WAIT: &str = "warren_task_queue_wait_seconds";
/// Gauge `{service, method}`: tasks running in this worker now (from delivery to ack).
pub const TASKS_IN_FLIGHT: &str = "warren_tasks_in_flight";
/// Counter `{service, method}`: part tasks (of split jobs and fan-ins) this worker received.
pub const PARTS_RECEIVED: &str = "warren_parts_received_total";
/// Counter `{service}`: joins this worker fired (a split job's or fan-in's hook or final
/// callbacks, exactly once per job over all workers); `service` is the job's.
pub const JOINS_FIRED: &str = "warren_joins_fired_total";
/// Counter `{reason}`: publishes sent again after a `nack`, a `returned` (unroutable, then
/// declared) message or a lost `connection`/channel.
pub const PUBLISH_RETRIES: &str = "warren_publish_retries_total";
/// Counter `{service, method}`: answers a worker could not deliver because the caller's
/// reply queue no longer existed (the caller closed or crashed, or the node holding its
/// queue died); the caller, if still waiting, times out.
pub const REPLIES_DROPPED: &str = "warren_replies_dropped_total";
/// Counter: connections to RabbitMQ replaced after they died.
pub const RECONNECTS: &str = "warren_reconnects_total";
/// Counter `{service, method, via}`: tasks sent and confirmed, by any process (a client's
/// enqueues and invokes, a worker's hooks, parts, retries, callbacks and chain steps).
pub const TASKS_SENT: &str = "warren_tasks_sent_total";
/// Counter `{service, method, reason}`: tasks flow control sent back to wait on the broker
/// before their handler ran (docs/flow.md): `reason` is `rate` (over the method's rate
/// limit), `key` (the task's key had no free slot) or `store` (the flow store did not
/// answer). Counted once the deferred copy was confirmed and the delivery acked.
pub const TASKS_DEFERRED: &str = "warren_tasks_deferred_total";
/// Histogram `{service, method, outcome}`, seconds: `Client::invoke` from the call to its
/// answer; `outcome` is `ok` or `error` (a failure answered by the worker). Calls that
/// time out are not in it.
pub const INVOKE_DURATION: &str = "warren_invoke_duration_seconds";

/// Label: the service name.
pub const L_SERVICE: &str = "service";
/// Label: the method name (or [`OTHER_METHOD`]).
pub const L_METHOD: &str = "method";
/// Label: a [`FailureKind`] ([`FailureKind::as_str`]).
pub const L_KIND: &str = "kind";
/// Label: how a task was sent ([`via_label`]).
pub const L_VIA: &str = "via";
/// Label: `ok` or `error`.
pub const L_OUTCOME: &str = "outcome";
/// Label: why a publish was sent again.
pub const L_REASON: &str = "reason";

/// The method label of a task for a method the worker does not host, and of a message that
/// is not a task (a bad envelope): never the name the message carries.
pub const OTHER_METHOD: &str = "_other";

/// Histogram buckets (seconds) warren's own Prometheus recorder uses for its histograms:
/// from 1 ms to 5 min.
pub const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Describes every metric to the installed recorder (help text and unit), for exporters
/// that show them. Call after installing a recorder; calling it again is harmless.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(TASKS_RECEIVED, "Task deliveries a worker took, per attempt");
    describe_counter!(TASKS_SUCCEEDED, "Tasks whose handler succeeded (acked)");
    describe_counter!(TASKS_FAILED, "Tasks that failed for good, by failure kind");
    describe_counter!(
        TASKS_RETRIED,
        "Failed attempts whose next attempt was published"
    );
    describe_counter!(TASKS_DEAD_LETTERED, "Dead letters a worker published");
    describe_counter!(
        TASKS_REQUEUED,
        "Deliveries requeued: outcome not publishable yet"
    );
    describe_histogram!(TASK_DURATION, Unit::Seconds, "Handler run time");
    describe_histogram!(
        TASK_QUEUE_WAIT,
        Unit::Seconds,
        "From task creation to handler start (first attempts)"
    );
    describe_gauge!(TASKS_IN_FLIGHT, "Tasks running in this worker");
    describe_counter!(PARTS_RECEIVED, "Part tasks (split jobs, fan-ins) received");
    describe_counter!(JOINS_FIRED, "Joins fired by this worker");
    describe_counter!(
        PUBLISH_RETRIES,
        "Publishes sent again (nack, return, lost channel)"
    );
    describe_counter!(
        REPLIES_DROPPED,
        "Answers dropped: the caller's reply queue was gone"
    );
    describe_counter!(
        RECONNECTS,
        "Connections to RabbitMQ replaced after they died"
    );
    describe_counter!(TASKS_SENT, "Tasks sent and confirmed, by channel");
    describe_counter!(
        TASKS_DEFERRED,
        "Tasks deferred by flow control (rate limit, busy key, store down)"
    );
    describe_histogram!(
        INVOKE_DURATION,
        Unit::Seconds,
        "Client::invoke latency, call to answer"
    );
}

/// The `via` label of a channel (the envelope's `channel` field).
#[must_use]
pub fn via_label(via: Via) -> &'static str {
    match via {
        Via::Enqueue => "enqueue",
        Via::Invoke => "invoke",
        Via::Hook => "hook",
        Via::Part => "part",
        Via::Parallel => "parallel",
        Via::OnTarget => "on_target",
        Via::OnFinal => "on_final",
        Via::RetryCallback => "retry_callback",
        Via::Retry => "retry",
        Via::Publish => "publish",
        Via::Chain => "chain",
        Via::Join => "join",
        Via::Other => "other",
    }
}

/// The `kind` label of a failure.
#[must_use]
pub fn kind_label(kind: FailureKind) -> &'static str {
    kind.as_str()
}

/// Why the publisher sent a message again ([`PUBLISH_RETRIES`]'s `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetryReason {
    /// The broker nacked it.
    Nack,
    /// It came back unroutable; its queues were declared again.
    Returned,
    /// The connection or channel was lost before the confirm.
    Connection,
}

impl RetryReason {
    fn label(self) -> &'static str {
        match self {
            Self::Nack => "nack",
            Self::Returned => "returned",
            Self::Connection => "connection",
        }
    }
}

pub(crate) fn publish_retried(reason: RetryReason) {
    metrics::counter!(PUBLISH_RETRIES, L_REASON => reason.label()).increment(1);
}

pub(crate) fn reconnected() {
    metrics::counter!(RECONNECTS).increment(1);
}

/// Most distinct `(service, method)` label pairs a process gives the metrics that name
/// targets it did not register itself (tasks sent, invokes, joins): targets named by
/// messages (hooks, callbacks) could otherwise grow the label set without bound. Past it,
/// new pairs are counted as `(_other, _other)`.
pub const MAX_TARGET_LABELS: usize = 1000;

/// The labels of `svc.method` for metrics whose targets come from messages, bounded by
/// [`MAX_TARGET_LABELS`].
#[must_use]
pub fn target_labels(svc: &str, method: &str) -> (String, String) {
    use std::hash::{Hash, Hasher};
    static SEEN: std::sync::Mutex<Option<std::collections::HashSet<u64>>> =
        std::sync::Mutex::new(None);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (svc, method).hash(&mut h);
    let key = h.finish();
    let admitted = SEEN.lock().is_ok_and(|mut seen| {
        let seen = seen.get_or_insert_with(Default::default);
        seen.contains(&key) || (seen.len() < MAX_TARGET_LABELS && seen.insert(key))
    });
    if admitted {
        (svc.to_owned(), method.to_owned())
    } else {
        (OTHER_METHOD.to_owned(), OTHER_METHOD.to_owned())
    }
}

/// Counts a confirmed task publish ([`TASKS_SENT`]).
pub(crate) fn task_sent(env: &Envelope) {
    let (svc, method) = target_labels(&env.svc, &env.method);
    metrics::counter!(
        TASKS_SENT,
        L_SERVICE => svc,
        L_METHOD => method,
        L_VIA => via_label(env.channel),
    )
    .increment(1);
}

/// Records an answered invoke of `svc.method` ([`INVOKE_DURATION`]).
pub fn invoke_answered(svc: &str, method: &str, ok: bool, elapsed: Duration) {
    let (svc, method) = target_labels(svc, method);
    metrics::histogram!(
        INVOKE_DURATION,
        L_SERVICE => svc,
        L_METHOD => method,
        L_OUTCOME => if ok { "ok" } else { "error" },
    )
    .record(elapsed.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        for name in [
            TASKS_RECEIVED,
            TASKS_SUCCEEDED,
            TASKS_FAILED,
            TASKS_RETRIED,
            TASKS_DEAD_LETTERED,
            TASKS_REQUEUED,
            PARTS_RECEIVED,
            JOINS_FIRED,
            PUBLISH_RETRIES,
            REPLIES_DROPPED,
            RECONNECTS,
            TASKS_SENT,
        ] {
            assert!(
                name.starts_with("warren_") && name.ends_with("_total"),
                "{name}"
            );
        }
        for name in [TASK_DURATION, TASK_QUEUE_WAIT, INVOKE_DURATION] {
            assert!(name.ends_with("_seconds"), "{name}");
        }
        assert!(BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn target_labels_are_bounded() {
        let first = target_labels("bounded-test", "m0");
        assert_eq!(first, ("bounded-test".into(), "m0".into()));
        for i in 0..MAX_TARGET_LABELS {
            let _ = target_labels("bounded-test", &format!("m{i}"));
        }
        // Known pairs keep their labels; new ones past the bound do not get any.
        assert_eq!(target_labels("bounded-test", "m0").1, "m0");
        assert_eq!(
            target_labels("bounded-test", "one-too-many"),
            (OTHER_METHOD.into(), OTHER_METHOD.into())
        );
    }
}
