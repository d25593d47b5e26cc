//! Invoke/retry: call a target and repeat the call if it fails, blocking or in background.
//! See [`InvokeRetry`].

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;
use warren_core::envelope::now_ms;
use warren_core::topology::{fanout_queue, QueueSpec};
use warren_core::{
    Envelope, FailureKind, FanOut, HookTarget, IntoTarget, PartDecorator, RetryCall, RetryPolicy,
    Target, Via,
};

use crate::args::Invalid;
use crate::parallel::{Origin, FANIN_QUEUE_EXPIRY_MS};
use crate::{Client, Error, Task};

/// A call that is repeated when the target fails by returning an error (a handler error;
/// bad payloads, unknown targets, rejections and panics are never repeated).
///
/// Three modes, by the method that runs it:
///
/// | method | first call | further attempts | returns |
/// |---|---|---|---|
/// | [`Client::invoke_retry`] | blocking | blocking | the response, or [`Error::RetriesExhausted`] |
/// | [`Client::invoke_retry_fallback`] | blocking | background | [`Retried::Done`], or [`Retried::Background`] with the cid |
/// | [`Client::invoke_retry_async`] | background | background | the cid at once |
///
/// `repeats` is the number of attempts in all (at least 1); the interval between attempts is
/// required (`.seconds`, `.minutes`, which add up, or `.interval`). Background attempts wait
/// on the broker in the delay levels (docs/time.md) and survive worker and broker restarts; the
/// optional callback then runs exactly once with a [`warren_core::RetryOutcome`] (`ok`,
/// `source`, `target`, `retry_repeats`, `retry_seconds`, `call_cid`, `orig_cid`,
/// `req_ts_utc`, `context`, `attempts`, and `response` or `error`).
///
/// ```no_run
/// # async fn demo(client: warren_client::Client) -> Result<(), warren_client::Error> {
/// use serde_json::json;
/// use warren_client::{InvokeRetry, Retried};
/// let call = InvokeRetry::new("crm.sync", &json!({"user": 7}))
///     .repeats(3)
///     .seconds(2)
///     .callback("crm.synced")
///     .context(&json!({"requested_by": "cron"}));
/// match client.invoke_retry_fallback::<u64>(call).await? {
///     Retried::Done(n) => println!("synced {n} records"),
///     Retried::Background { cid } => println!("still trying in background, cid {cid}"),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct InvokeRetry {
    invalid: Invalid,
    target: Option<Target>,
    payload: Value,
    repeats: u32,
    interval: Option<Duration>,
    callback: Option<HookTarget>,
    context: Value,
    cid: Option<String>,
    timeout: Option<Duration>,
    origin: Origin,
}

/// What [`Client::invoke_retry_fallback`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retried<R> {
    /// The first call succeeded.
    Done(R),
    /// The first call failed; the remaining attempts run in background under this cid.
    Background {
        /// The call's correlation id (the callback's `call_cid`).
        cid: String,
    },
}

impl InvokeRetry {
    /// A call of `target` (`"svc.method"`) with `payload`; 1 attempt until
    /// [`InvokeRetry::repeats`] says otherwise.
    pub fn new(target: impl IntoTarget, payload: &impl Serialize) -> Self {
        let mut invalid = Invalid::default();
        let target = invalid.target(target);
        let payload = invalid.json(payload);
        Self {
            invalid,
            target,
            payload,
            repeats: 1,
            interval: None,
            callback: None,
            context: Value::Null,
            cid: None,
            timeout: None,
            origin: Origin::default(),
        }
    }

    /// Attempts in all, the first included (0 is refused with [`Error::ZeroRepeats`]).
    pub fn repeats(mut self, n: u32) -> Self {
        self.repeats = n;
        self
    }

    /// Adds `s` seconds to the interval between attempts.
    pub fn seconds(mut self, s: u64) -> Self {
        let now = self.interval.unwrap_or_default();
        self.interval = Some(now.saturating_add(Duration::from_secs(s)));
        self
    }

    /// Adds `m` minutes to the interval between attempts.
    pub fn minutes(mut self, m: u64) -> Self {
        let now = self.interval.unwrap_or_default();
        self.interval = Some(now.saturating_add(Duration::from_secs(m.saturating_mul(60))));
        self
    }

    /// Sets the interval between attempts.
    pub fn interval(mut self, d: Duration) -> Self {
        self.interval = Some(d);
        self
    }

    /// The service method run once when background attempts end (success or not).
    pub fn callback(mut self, target: impl IntoTarget) -> Self {
        self.callback = self.invalid.hook(target);
        self
    }

    /// JSON handed to the callback as `context`.
    pub fn context(mut self, context: &impl Serialize) -> Self {
        self.context = self.invalid.json(context);
        self
    }

    /// The cid of the call (default: a fresh one).
    pub fn with_cid(mut self, cid: impl Into<String>) -> Self {
        self.cid = Some(cid.into());
        self
    }

    /// Deadline of each blocking attempt (default: the client's invoke timeout). A timeout
    /// ends the call with [`Error::Timeout`]; it is not repeated, as the target may still be
    /// running.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Records who makes the call: `source` (`svc.method`, echoed to the callback as
    /// `source`), the calling task `parent`, and the caller's own `cid` (echoed as
    /// `orig_cid`). Handler contexts set it to their own task.
    pub fn with_origin(mut self, source: String, parent: Uuid, cid: String) -> Self {
        self.origin = Origin {
            source: Some(source),
            parent: Some(parent),
            cid: Some(cid),
        };
        self
    }

    /// Checks the settings; returns the interval and the call's cid.
    fn checked(&self) -> Result<(Duration, String), Error> {
        self.target()?;
        if self.repeats == 0 {
            return Err(Error::ZeroRepeats);
        }
        let interval = self.interval.ok_or(Error::MissingInterval)?;
        let cid = self
            .cid
            .clone()
            .unwrap_or_else(|| Uuid::now_v7().to_string());
        crate::task::check_cid(&cid)?;
        Ok((interval, cid))
    }

    /// A blocking attempt; `last` when no attempt follows it (only then does a failure
    /// reach the dead-letter queue).
    fn attempt_task(&self, cid: &str, attempt: u32, last: bool) -> Result<Task, Error> {
        let target = self.target()?;
        let mut task = Task::new(target, &self.payload)
            .with_cid(cid)
            .with_retry(RetryPolicy::none());
        task.attempt = attempt;
        task.caller_retries = !last;
        if let Some(t) = self.timeout {
            task = task.with_timeout(t);
        }
        if let Some(p) = self.origin.parent {
            task = task.with_parent(p);
        }
        Ok(task)
    }
}

impl InvokeRetry {
    /// The call's target; `Err` with the refused name when there is none.
    fn target(&self) -> Result<&Target, Error> {
        // `target` is `None` only with a name error kept in `invalid`.
        self.invalid.check()?;
        self.target.as_ref().ok_or_else(|| {
            Error::Broker(warren_core::Error::Config("the call has no target".into()))
        })
    }
}

/// `true` for failures a repeat can fix (the handler's own error).
fn repeatable(e: &Error) -> bool {
    e.failure_kind() == Some(FailureKind::Handler)
}

impl Client {
    /// Sync + sync: calls `r`'s target, repeating after each handler error until it succeeds
    /// or `repeats` attempts failed ([`Error::RetriesExhausted`]). Blocks throughout.
    pub async fn invoke_retry<R: DeserializeOwned>(&self, r: InvokeRetry) -> Result<R, Error> {
        let (interval, cid) = r.checked()?;
        let mut attempt = 1;
        loop {
            let last = attempt >= r.repeats;
            match self.invoke(r.attempt_task(&cid, attempt, last)?).await {
                Err(e) if repeatable(&e) && attempt < r.repeats => {
                    tracing::debug!(target = ?r.target, attempt, error = %e, "invoke/retry: attempt failed");
                    tokio::time::sleep(interval).await;
                    attempt += 1;
                }
                Err(Error::Failed { failure, .. }) if failure.kind == FailureKind::Handler => {
                    return Err(Error::RetriesExhausted {
                        target: r.target()?.to_string(),
                        cid,
                        attempts: attempt,
                        failure,
                    })
                }
                other => return other,
            }
        }
    }

    /// Sync + async: calls `r`'s target once, blocking; if that fails with a handler error,
    /// the remaining attempts go on in background (durably, on the broker) and this returns
    /// [`Retried::Background`] with the cid at once.
    pub async fn invoke_retry_fallback<R: DeserializeOwned>(
        &self,
        r: InvokeRetry,
    ) -> Result<Retried<R>, Error> {
        let (interval, cid) = r.checked()?;
        let started = now_ms();
        let last = r.repeats <= 1;
        match self.invoke(r.attempt_task(&cid, 1, last)?).await {
            Ok(v) => Ok(Retried::Done(v)),
            Err(e) if repeatable(&e) && r.repeats > 1 => {
                tracing::debug!(target = ?r.target, error = %e, "invoke/retry: first attempt failed; going on in background");
                self.background(&r, cid.clone(), 2, interval, started)
                    .await?;
                Ok(Retried::Background { cid })
            }
            Err(Error::Failed { failure, .. }) if failure.kind == FailureKind::Handler => {
                Err(Error::RetriesExhausted {
                    target: r.target()?.to_string(),
                    cid,
                    attempts: 1,
                    failure,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Async + async: sends `r`'s target for background execution with up to `repeats`
    /// attempts and returns the call's cid once the broker has it.
    pub async fn invoke_retry_async(&self, r: InvokeRetry) -> Result<String, Error> {
        let (interval, cid) = r.checked()?;
        self.background(&r, cid.clone(), 1, interval, now_ms())
            .await?;
        Ok(cid)
    }

    /// Sends attempt `first` (and, through the worker's retry machinery, the rest) with the
    /// call's own fixed retry policy; with a callback, as a job of one part so the callback
    /// fires exactly once.
    async fn background(
        &self,
        r: &InvokeRetry,
        cid: String,
        first: u32,
        interval: Duration,
        started_ms: u64,
    ) -> Result<(), Error> {
        let mut env = Envelope::new(r.target()?, r.payload.clone(), Some(cid));
        env.channel = if first > 1 { Via::Retry } else { Via::Parallel };
        env.attempt = first;
        env.parent = r.origin.parent;
        env.created_ms = started_ms;
        env.retry = Some(RetryPolicy::fixed(r.repeats, interval));
        if let Some(cb) = &r.callback {
            let job = Uuid::now_v7();
            let queue = fanout_queue(&job);
            self.broker()
                .declare(&[QueueSpec::part(&queue, FANIN_QUEUE_EXPIRY_MS)?])
                .await?;
            if let Some(rec) = self.recorder() {
                rec.job_total(job, 1).await;
            }
            env.fanout = Some(FanOut {
                job,
                index: 0,
                total: 1,
                source: r.origin.source.clone(),
                on_target: Vec::new(),
                on_final: vec![cb.clone()],
                retry_call: Some(RetryCall {
                    repeats: r.repeats,
                    seconds: interval.as_secs_f64(),
                    orig_cid: r.origin.cid.clone(),
                    context: r.context.clone(),
                }),
            });
            env.part = Some(PartDecorator {
                part_id: 0,
                total_parts: 1,
                part_queue: queue,
            });
        }
        let delay = if first > 1 { interval } else { Duration::ZERO };
        Ok(self
            .sender()
            .send_later(&env, delay, None, self.publish_deadline())
            .await?)
    }
}
