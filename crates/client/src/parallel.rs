//! Parallel execution and fan-out/fan-in: [`Parallel`] and [`Client::parallel`].

use futures_util::{StreamExt, TryStreamExt};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;
use warren_core::topology::{fanout_queue, QueueSpec};
use warren_core::{Envelope, FanOut, HookTarget, IntoTarget, PartDecorator, Target, Via};

use crate::args::Invalid;

use crate::{Client, Error};

/// Target tasks published at once.
const IN_FLIGHT: usize = 256;

/// How long an abandoned fan-in's part queue lives (a job whose targets were never all sent).
pub(crate) const FANIN_QUEUE_EXPIRY_MS: u64 = 24 * 3600 * 1000;

/// Who started a pattern from inside a handler: set by the worker's `Context`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Origin {
    pub(crate) source: Option<String>,
    pub(crate) parent: Option<Uuid>,
    pub(crate) cid: Option<String>,
}

/// A set of targets to run in parallel, with callbacks after each target (`on_target`) and
/// after all of them (`on_final`, which makes it a fan-out/fan-in).
///
/// Every target runs independently, on whichever worker hosts its service, with its own
/// retry policy. After each target finishes (succeeded, or failed for good), every
/// `on_target` callback receives a [`warren_core::TargetOutcome`]; its handler context says
/// `Via::OnTarget`. Once all targets finished, every `on_final` callback receives one
/// [`warren_core::FanInOutcome`] with all outcomes in the order the targets were added
/// (`Via::OnFinal`); the final callbacks fire exactly once, through the same join as split
/// jobs.
///
/// ```no_run
/// # async fn demo(client: warren_client::Client) -> Result<(), warren_client::Error> {
/// use serde_json::json;
/// use warren_client::Parallel;
/// let receipt = client
///     .parallel(
///         Parallel::new()
///             .target("geo.lookup", &json!({"ip": "10.0.0.1"}))
///             .target("risk.score", &json!({"user": 7}))
///             .on_target("audit.step")
///             .on_final("orders.decide")
///             .with_cid("order-42"),
///     )
///     .await?;
/// assert_eq!(receipt.cid, "order-42");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct Parallel {
    invalid: Invalid,
    targets: Vec<(Target, Value)>,
    on_target: Vec<HookTarget>,
    on_final: Vec<HookTarget>,
    cid: Option<String>,
    origin: Origin,
    delay: Option<std::time::Duration>,
}

impl Parallel {
    /// An empty set (add targets with [`Parallel::target`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a target (`"svc.method"` or a [`Target`]) and its payload. The same target may
    /// appear twice. An invalid name or payload is returned by [`Client::parallel`].
    pub fn target(mut self, target: impl IntoTarget, payload: &impl Serialize) -> Self {
        let payload = self.invalid.json(payload);
        if let Some(t) = self.invalid.target(target) {
            self.targets.push((t, payload));
        }
        self
    }

    /// Adds a callback run after **each** target, success or failure.
    pub fn on_target(mut self, callback: impl IntoTarget) -> Self {
        if let Some(h) = self.invalid.hook(callback) {
            self.on_target.push(h);
        }
        self
    }

    /// Adds a callback run once after **all** targets finished (fan-in).
    pub fn on_final(mut self, callback: impl IntoTarget) -> Self {
        if let Some(h) = self.invalid.hook(callback) {
            self.on_final.push(h);
        }
        self
    }

    /// Uses the caller's correlation id for the targets and callbacks (the caller then owns
    /// its uniqueness); by default a fresh one is generated.
    pub fn with_cid(mut self, cid: impl Into<String>) -> Self {
        self.cid = Some(cid.into());
        self
    }

    /// Starts every target `delay` after the call (rounded up to 100 ms), through
    /// the same delay levels as [`crate::Task::delay`]; the callbacks follow as usual. A
    /// delay over [`warren_core::delay::MAX_DELAY`] is returned as [`Error::DelayTooLong`]
    /// by [`Client::parallel`], and nothing is sent.
    pub fn delay(mut self, delay: std::time::Duration) -> Self {
        self.delay = self.invalid.delay(delay).or(self.delay);
        self
    }

    /// Records who starts this invoke: `source` (`svc.method`, in every callback's payload)
    /// and the calling task `parent`. Handler contexts set it to their own task.
    pub fn with_origin(mut self, source: String, parent: Uuid) -> Self {
        self.origin.source = Some(source);
        self.origin.parent = Some(parent);
        self
    }
}

/// What [`Client::parallel`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParallelReceipt {
    /// The correlation id of every target and callback.
    pub cid: String,
    /// The invoke's id (its fan-in part queue is `part.fanout-<job>`).
    pub job: Uuid,
    /// The target tasks' ids, in the order the targets were added.
    pub tasks: Vec<Uuid>,
}

impl Client {
    /// Starts every target of `p` at once and returns when the broker confirmed them all;
    /// the callbacks run later, on the workers. See [`Parallel`].
    ///
    /// Errors: [`Error::NoTargets`] for an empty set; name and cid errors before anything is
    /// sent; broker errors. If publishing fails half-way, some targets may have been sent
    /// and the fan-in will not complete (its part queue expires after 24 h): send the
    /// invoke again.
    pub async fn parallel(&self, p: Parallel) -> Result<ParallelReceipt, Error> {
        p.invalid.check()?;
        if p.targets.is_empty() {
            return Err(Error::NoTargets);
        }
        let total = u32::try_from(p.targets.len()).map_err(|_| {
            Error::Broker(warren_core::Error::Config(
                "a parallel invoke has at most u32::MAX targets".into(),
            ))
        })?;
        let job = Uuid::now_v7();
        let cid = p.cid.unwrap_or_else(|| job.to_string());
        crate::task::check_cid(&cid)?;
        let part_queue = if p.on_final.is_empty() {
            None
        } else {
            let q = fanout_queue(&job);
            self.broker()
                .declare(&[QueueSpec::part(&q, FANIN_QUEUE_EXPIRY_MS)?])
                .await?;
            // The fan-in's total, for the web admin (its part queue counts the results in).
            if let Some(r) = self.recorder() {
                r.job_total(job, total).await;
            }
            Some(q)
        };
        let envs: Vec<Envelope> = p
            .targets
            .iter()
            .enumerate()
            .map(|(i, (target, payload))| {
                let index = u32::try_from(i).unwrap_or(u32::MAX);
                let mut env = Envelope::new(target, payload.clone(), Some(cid.clone()));
                env.channel = Via::Parallel;
                env.parent = p.origin.parent;
                env.fanout = Some(FanOut {
                    job,
                    index,
                    total,
                    source: p.origin.source.clone(),
                    on_target: p.on_target.clone(),
                    on_final: p.on_final.clone(),
                    retry_call: None,
                });
                env.part = part_queue.as_ref().map(|q| PartDecorator {
                    part_id: index,
                    total_parts: total,
                    part_queue: q.clone(),
                });
                env
            })
            .collect();
        let tasks = envs.iter().map(|e| e.id).collect();
        futures_util::stream::iter(envs)
            .map(|env| async move {
                match p.delay {
                    Some(d) => {
                        self.send_later(&env, d, None, self.publish_deadline())
                            .await
                    }
                    None => self.send_envelope(&env, None).await,
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<()>()
            .await?;
        tracing::debug!(%job, %cid, targets = total, "parallel invoke sent");
        Ok(ParallelReceipt { cid, job, tasks })
    }
}
