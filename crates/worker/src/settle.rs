//! How a delivery is settled: the one place that turns "what happened to its outcome" into
//! ack, requeue or dead-letter.
//!
//! A delivery is acked only once everything its outcome implies (reply, hooks, retry, part
//! result, chain step, dead letter) was published and confirmed. When that failed, the
//! answer depends on whether trying again can help ([`warren_client::Error::is_transient`]):
//!
//! - **transient** (broker or store unreachable, publish unconfirmed, a queue's node down):
//!   the delivery is requeued after a pause that grows with each consecutive failure of the
//!   same task in this worker (100 ms doubling to 10 s), so a broker that is down is not
//!   hammered in a hot loop;
//! - **permanent** (an invalid name, a refusal, a payload that does not encode): the
//!   delivery is dead-lettered once with kind `undeliverable` and the error as its reason,
//!   and a waiting caller is answered. It is never requeued.
//!
//! A delivery **acked early** (its handler ran close to the broker's `consumer_timeout`, see
//! docs/time.md) can no longer be requeued: a transient failure republishes the original
//! message to its queue instead ([`Settle::Republish`]), and a success needs no ack.
//!
//! A task that flow control holds back before its handler runs (a rate limit, a busy key:
//! docs/flow.md) is settled as [`Settle::Defer`] ([`before_run`]): the same envelope is
//! published again through the delay queues, and the delivery is acked only once that copy
//! is confirmed, by [`settle`] of that publish like any outcome (a transient failure
//! requeues the delivery, so nothing is lost; a crash between the two leaves a duplicate
//! whose original copy is marked redelivered).
//!
//! [`after_failure`] decides, just as purely, what an attempt that did not succeed leads
//! to: another attempt (a handler error or a time limit, while attempts are left) or a
//! final failure of its kind.

use std::time::Duration;

use warren_core::{Failure, FailureKind, RetryPolicy};

use crate::outcome::Action;

/// The shortest pause before a requeue.
pub(crate) const FIRST_PAUSE: Duration = Duration::from_millis(100);
/// The longest pause before a requeue.
pub(crate) const MAX_PAUSE: Duration = Duration::from_secs(10);

/// What to do with a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Everything was published: ack.
    Ack,
    /// A transient failure: requeue after this pause.
    Requeue {
        /// How long to hold the delivery before requeueing it.
        after: Duration,
    },
    /// Retrying cannot help: dead-letter with this failure (and answer a waiting caller).
    DeadLetter(Failure),
    /// Everything was published and the delivery was already acked early: nothing to do.
    AlreadyAcked,
    /// A transient failure of a delivery acked early: publish the original message to its
    /// queue again after this pause (it cannot be requeued any more).
    Republish {
        /// How long to wait before republishing.
        after: Duration,
    },
    /// Flow control holds the task back: publish it again through the delay queues to
    /// come back after `delay` (attempt unchanged), then settle that publish with
    /// [`settle`].
    Defer {
        /// How long it waits on the broker.
        delay: Duration,
    },
}

/// Where a delivery goes before its handler runs: `None` runs it; a flow-control wait
/// defers it ([`Settle::Defer`]).
pub(crate) fn before_run(wait: Option<Duration>) -> Option<Settle> {
    wait.map(|delay| Settle::Defer { delay })
}

/// Decides how to settle a delivery from the result of publishing its outcome, how many
/// times in a row (before this one) publishing this task's outcome failed transiently here,
/// and whether the delivery was acked early.
pub(crate) fn settle(
    published: &Result<(), warren_client::Error>,
    failed_before: u32,
    acked_early: bool,
) -> Settle {
    match published {
        Ok(()) if acked_early => Settle::AlreadyAcked,
        Ok(()) => Settle::Ack,
        Err(e) if e.is_transient() && acked_early => Settle::Republish {
            after: pause(failed_before),
        },
        Err(e) if e.is_transient() => Settle::Requeue {
            after: pause(failed_before),
        },
        Err(e) => Settle::DeadLetter(Failure {
            kind: FailureKind::Undeliverable,
            message: format!("the task's outcome cannot be published: {e}"),
        }),
    }
}

/// How an attempt did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failed {
    /// The handler returned an error asking for this.
    Handler(Action),
    /// The handler ran past its hard time limit and was stopped.
    TimedOut,
    /// The task was cancelled while its handler ran (the handler returned an error after
    /// it, or was dropped after the grace period).
    Cancelled,
}

/// What follows an attempt that did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Another attempt, after this delay.
    Retry(Duration),
    /// No attempt left (or a rejection): the task fails for good with this kind.
    Dead(FailureKind),
}

/// Decides what follows a failed attempt `attempt` under `policy`: a handler error or a
/// time limit is retried while attempts are left (a time limit waits like a handler
/// error, [`RetryPolicy::delay_after`]), a rejection never is. The final failure is of kind
/// `handler`, `timeout` or `rejected`.
pub(crate) fn after_failure(failed: Failed, attempt: u32, policy: &RetryPolicy) -> Next {
    let delay = match failed {
        Failed::Handler(Action::Reject) => return Next::Dead(FailureKind::Rejected),
        Failed::Cancelled => return Next::Dead(FailureKind::Cancelled),
        Failed::Handler(Action::Fail) | Failed::TimedOut => policy.delay_after(attempt),
        Failed::Handler(Action::RetryAfter(d)) => d,
    };
    if attempt < policy.max_attempts {
        Next::Retry(delay)
    } else if failed == Failed::TimedOut {
        Next::Dead(FailureKind::Timeout)
    } else {
        Next::Dead(FailureKind::Handler)
    }
}

/// `true` when a task that failed for good with `kind` gets a copy in its service's
/// dead-letter queue. A cancelled task does not: nobody should replay it, and a cancelled
/// 200-part job would otherwise leave 200 dead letters.
pub(crate) fn dead_letters(kind: FailureKind) -> bool {
    kind != FailureKind::Cancelled
}

/// The `n`-th pause of a backon exponential backoff from [`FIRST_PAUSE`] to [`MAX_PAUSE`]
/// (no jitter, so the decision stays a pure function): `FIRST_PAUSE * 2^n`, capped.
fn pause(n: u32) -> Duration {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(FIRST_PAUSE)
        .with_max_delay(MAX_PAUSE)
        .without_max_times()
        .build()
        .nth(n.min(16) as usize)
        // Whole milliseconds: backon computes in floating point.
        .map_or(MAX_PAUSE, |d| {
            Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_core::NameError;

    fn transient() -> warren_client::Error {
        warren_client::Error::Broker(warren_core::Error::Timeout {
            what: "publishing".into(),
            after: Duration::from_secs(30),
        })
    }

    #[test]
    fn a_flow_wait_defers() {
        assert_eq!(before_run(None), None);
        let delay = Duration::from_millis(300);
        assert_eq!(before_run(Some(delay)), Some(Settle::Defer { delay }));
    }

    #[test]
    fn published_is_acked() {
        assert_eq!(settle(&Ok(()), 0, false), Settle::Ack);
        assert_eq!(settle(&Ok(()), 7, false), Settle::Ack);
    }

    #[test]
    fn transient_failures_requeue_with_growing_pauses() {
        let pauses: Vec<Duration> = (0..10)
            .map(|n| match settle(&Err(transient()), n, false) {
                Settle::Requeue { after } => after,
                other => panic!("expected a requeue, got {other:?}"),
            })
            .collect();
        assert_eq!(pauses[0], FIRST_PAUSE);
        assert_eq!(pauses[1], FIRST_PAUSE * 2);
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(pauses[9], MAX_PAUSE);
        assert_eq!(
            settle(&Err(transient()), u32::MAX, false),
            Settle::Requeue { after: MAX_PAUSE }
        );
    }

    #[test]
    fn permanent_failures_are_dead_lettered_never_requeued() {
        let permanent = [
            warren_client::Error::Name(NameError::Empty { kind: "topic" }),
            warren_client::Error::Broker(warren_core::Error::Config("bad".into())),
            warren_client::Error::NoTargets,
        ];
        for e in permanent {
            let text = e.to_string();
            match settle(&Err(e), 0, false) {
                Settle::DeadLetter(f) => {
                    assert_eq!(f.kind, FailureKind::Undeliverable);
                    assert!(f.message.contains(&text), "{} / {text}", f.message);
                }
                other => panic!("{text}: expected a dead letter, got {other:?}"),
            }
        }
    }

    #[test]
    fn other_transient_kinds() {
        for e in [
            warren_client::Error::Broker(warren_core::Error::Shutdown),
            warren_client::Error::Broker(warren_core::Error::Nacked {
                exchange: String::new(),
                routing_key: "q".into(),
            }),
            warren_client::Error::ReplyListener("gone".into()),
        ] {
            assert!(matches!(settle(&Err(e), 0, false), Settle::Requeue { .. }));
        }
    }

    #[test]
    fn acked_early_is_never_requeued_or_acked_again() {
        assert_eq!(settle(&Ok(()), 0, true), Settle::AlreadyAcked);
        assert_eq!(
            settle(&Err(transient()), 0, true),
            Settle::Republish { after: FIRST_PAUSE }
        );
        assert_eq!(
            settle(&Err(transient()), 20, true),
            Settle::Republish { after: MAX_PAUSE }
        );
        // A permanent failure is dead-lettered (a publish) whether or not it was acked.
        let permanent = warren_client::Error::NoTargets;
        assert!(matches!(
            settle(&Err(permanent), 0, true),
            Settle::DeadLetter(Failure {
                kind: FailureKind::Undeliverable,
                ..
            })
        ));
    }

    #[test]
    fn a_timeout_is_retried_like_a_handler_error_then_fails_as_timeout() {
        let policy = RetryPolicy::fixed(3, Duration::from_millis(200));
        let retry = Next::Retry(Duration::from_millis(200));
        assert_eq!(after_failure(Failed::TimedOut, 1, &policy), retry);
        assert_eq!(after_failure(Failed::TimedOut, 2, &policy), retry);
        assert_eq!(
            after_failure(Failed::TimedOut, 3, &policy),
            Next::Dead(FailureKind::Timeout)
        );
        assert_eq!(
            after_failure(Failed::Handler(Action::Fail), 3, &policy),
            Next::Dead(FailureKind::Handler)
        );
        assert_eq!(
            after_failure(Failed::Handler(Action::Reject), 1, &policy),
            Next::Dead(FailureKind::Rejected)
        );
        let after = Duration::from_secs(7);
        assert_eq!(
            after_failure(Failed::Handler(Action::RetryAfter(after)), 1, &policy),
            Next::Retry(after)
        );
        // A cancellation is final on any attempt, and not dead-lettered.
        assert_eq!(
            after_failure(Failed::Cancelled, 1, &policy),
            Next::Dead(FailureKind::Cancelled)
        );
        assert!(!dead_letters(FailureKind::Cancelled));
        assert!(dead_letters(FailureKind::Handler));
        // One attempt only: the first timeout is final.
        assert_eq!(
            after_failure(Failed::TimedOut, 1, &RetryPolicy::none()),
            Next::Dead(FailureKind::Timeout)
        );
    }
}
