//! Task status and results that outlive the processes that produced them: a small
//! [`StatusStore`] trait and its Redis implementation, [`RedisStore`].
//!
//! Keyed storage with expiry is a database's job, not a queue's. Workers write a task's
//! status when it starts, when an attempt fails and when it ends; a client with a store
//! writes `pending` when it sends a task. Any process with the same store can then ask for
//! the status of a task id or of every task of a cid, until the retention runs out.
//!
//! Writes never hold up task execution: a store that fails or is slow (250 ms) is skipped
//! for the next second, and the task goes on. Reads return [`StoreError`] instead of
//! hanging.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::envelope::Failure;

/// A boxed future, so [`StatusStore`] can be used as `dyn StatusStore`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Sent, not started yet (or waiting for a retry: see `attempts` and `error`).
    Pending,
    /// A worker is running it.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Failed for good.
    Failed,
}

impl TaskState {
    /// The snake_case name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }
}

/// One task's status, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// Task id.
    pub id: Uuid,
    /// Correlation id.
    pub cid: String,
    /// `svc.method`.
    pub target: String,
    /// Where it is.
    pub state: TaskState,
    /// Attempts started so far.
    pub attempts: u32,
    /// The result, when succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The (last) failure, when failed or waiting for a retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
    /// When the task was created, ms since the epoch.
    pub created_ms: u64,
    /// When this status was written, ms since the epoch.
    pub updated_ms: u64,
}

/// How a task relates to the task that caused it (its `parent`), as the status store
/// records it: the task lookup lists a task's children apart from its hooks and callbacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Relation {
    /// A task the parent's handler enqueued or invoked (a parallel target, a published
    /// message included).
    Child,
    /// An `oncomplete` / `onerror` hook fired by the parent's outcome.
    Hook,
    /// A callback of a parallel invoke or fan-in (on-target, on-final, invoke/retry).
    Callback,
    /// A part of the parent's split job.
    Part,
    /// The next step of a chain (or the first step of a chain the parent started).
    Step,
}

impl Relation {
    /// The relation a task sent through `via` has to its parent; `None` for a retry or a
    /// join re-check (the first attempt recorded it) and unknown channels.
    #[must_use]
    pub fn of(via: crate::envelope::Via) -> Option<Self> {
        use crate::envelope::Via;
        match via {
            Via::Enqueue | Via::Invoke | Via::Parallel | Via::Publish => Some(Self::Child),
            Via::Hook => Some(Self::Hook),
            Via::OnTarget | Via::OnFinal | Via::RetryCallback => Some(Self::Callback),
            Via::Part => Some(Self::Part),
            Via::Chain => Some(Self::Step),
            Via::Retry | Via::Join | Via::Other => None,
        }
    }

    /// The snake_case name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Child => "child",
            Self::Hook => "hook",
            Self::Callback => "callback",
            Self::Part => "part",
            Self::Step => "step",
        }
    }

    /// `true` for hooks and callbacks (work warren runs on an outcome), `false` for tasks
    /// that are part of the parent's work (children, parts, chain steps).
    #[must_use]
    pub fn is_hook(self) -> bool {
        matches!(self, Self::Hook | Self::Callback)
    }

    /// The relation named `s` ([`Relation::as_str`]).
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "child" => Self::Child,
            "hook" => Self::Hook,
            "callback" => Self::Callback,
            "part" => Self::Part,
            "step" => Self::Step,
            _ => return None,
        })
    }
}

/// A chain in flight, as the status store keeps it from its send to its end: which step
/// runs (or waits), of how many.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainProgress {
    /// The chain's id.
    pub id: Uuid,
    /// Its correlation id.
    pub cid: String,
    /// The current step, 0-based (`index + 1` of `steps.len()`).
    pub index: u32,
    /// Every step's `svc.method`, in order.
    pub steps: Vec<String>,
    /// The current step's task id.
    pub step_task: Uuid,
    /// Where the current step is (`pending` before a worker started it, `running`).
    pub state: TaskState,
    /// When this was written, ms since the epoch.
    pub updated_ms: u64,
}

impl ChainProgress {
    /// The progress a step's envelope shows, if it is a chain step.
    #[must_use]
    pub fn of(env: &crate::Envelope, state: TaskState) -> Option<Self> {
        let c = env.chain.as_ref()?;
        Some(Self {
            id: c.id,
            cid: env.cid.clone(),
            index: c.index,
            steps: c
                .steps
                .iter()
                .map(|s| format!("{}.{}", s.svc, s.method))
                .collect(),
            step_task: env.id,
            state,
            updated_ms: crate::envelope::now_ms(),
        })
    }

    /// The current step's `svc.method`.
    #[must_use]
    pub fn target(&self) -> Option<&str> {
        self.steps.get(self.index as usize).map(String::as_str)
    }
}

/// A method a worker advertised for its service, and when it last did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertisedMethod {
    /// The method.
    pub method: String,
    /// When a worker last advertised it, ms since the epoch.
    pub seen_ms: u64,
}

/// Why the store could not answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store is unreachable or refused the command.
    #[error("status store unavailable: {0}")]
    Unavailable(String),
    /// The store did not answer in time.
    #[error("status store did not answer within {0:?}")]
    Timeout(Duration),
    /// A stored value could not be read.
    #[error("status store holds an unreadable value: {0}")]
    Corrupt(String),
    /// This store does not implement the feature.
    #[error("this status store does not support {0}")]
    Unsupported(&'static str),
}

/// Storage for task statuses, with expiry. Implement it to keep statuses elsewhere than
/// Redis; warren calls it from many tasks at once.
pub trait StatusStore: Send + Sync + std::fmt::Debug + 'static {
    /// Stores `status` (replacing the task's previous one) and indexes it by cid.
    fn put<'a>(&'a self, status: &'a TaskStatus) -> BoxFuture<'a, Result<(), StoreError>>;
    /// The status of task `id`, if known (and not expired).
    fn get(&self, id: Uuid) -> BoxFuture<'_, Result<Option<TaskStatus>, StoreError>>;
    /// Every known task of `cid`, oldest first.
    fn by_cid<'a>(&'a self, cid: &'a str) -> BoxFuture<'a, Result<Vec<TaskStatus>, StoreError>>;
    /// Adds one to the counter `name` (e.g. messages published to a topic). Optional: the
    /// default keeps no counters.
    fn bump<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        let _ = name;
        Box::pin(async { Ok(()) })
    }
    /// The counter `name`, if the store keeps counters.
    fn counter<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        let _ = name;
        Box::pin(async { Ok(None) })
    }
    /// Claims `id` once: `true` for the first claim, `false` when it was already claimed
    /// (within the retention). Workers claim each chain step before running a first delivery
    /// of it, so a step re-sent by a redelivered predecessor runs once. Optional: the default
    /// claims everything (no deduplication).
    fn claim(&self, id: Uuid) -> BoxFuture<'_, Result<bool, StoreError>> {
        let _ = id;
        Box::pin(async { Ok(true) })
    }
    /// Records a cancellation of `scope` until the retention runs out
    /// (docs/cancellation.md). Optional: the default refuses with
    /// [`StoreError::Unsupported`], and cancellations then hold only in running workers.
    fn cancel<'a>(
        &'a self,
        scope: &'a crate::cancel::CancelScope,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let _ = scope;
        Box::pin(async { Err(StoreError::Unsupported("cancellations")) })
    }
    /// `true` when any of `ids` or `cid` was cancelled (within the retention). Workers ask
    /// once per task that arrives, in one round trip. Optional: the default knows of none.
    fn is_cancelled<'a>(
        &'a self,
        ids: &'a [Uuid],
        cid: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let _ = (ids, cid);
        Box::pin(async { Ok(false) })
    }
    /// Claims unique key `key` (already qualified with its `svc.method`) for `holder` for
    /// `ttl`, atomically: `Ok(None)` when this call claimed it, `Ok(Some(current holder))`
    /// when another holds it. Optional: the default refuses with [`StoreError::Unsupported`].
    fn unique_claim<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        let _ = (key, holder, ttl);
        Box::pin(async { Err(StoreError::Unsupported("unique tasks")) })
    }
    /// Removes unique key `key` if (and only if) its holder is task `id`; `true` when it was
    /// removed. Optional: the default removes nothing.
    fn unique_release<'a>(
        &'a self,
        key: &'a str,
        id: Uuid,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let _ = (key, id);
        Box::pin(async { Ok(false) })
    }
    /// Stores `status` like [`StatusStore::put`] and, when `link` is given, records that
    /// the task is related to task `link.0` as `link.1` (see [`StatusStore::related`]).
    /// The default writes the two one after the other.
    fn put_linked<'a>(
        &'a self,
        status: &'a TaskStatus,
        link: Option<(Uuid, Relation)>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.put(status).await?;
            if let Some((parent, relation)) = link {
                self.relate(parent, status.id, relation).await?;
            }
            Ok(())
        })
    }
    /// Records that `child` is related to `parent` as `relation` (within the retention).
    /// Optional: the default records nothing.
    fn relate(
        &self,
        parent: Uuid,
        child: Uuid,
        relation: Relation,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let _ = (parent, child, relation);
        Box::pin(async { Ok(()) })
    }
    /// The tasks recorded as related to `parent`, with their relation. Optional: the
    /// default knows of none.
    fn related(&self, parent: Uuid) -> BoxFuture<'_, Result<Vec<(Uuid, Relation)>, StoreError>> {
        let _ = parent;
        Box::pin(async { Ok(Vec::new()) })
    }
    /// Records where a chain in flight is. Optional: the default records nothing.
    fn chain_progress<'a>(
        &'a self,
        progress: &'a ChainProgress,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let _ = progress;
        Box::pin(async { Ok(()) })
    }
    /// Forgets chain `id`'s progress: it ended. Optional: the default does nothing.
    fn chain_ended(&self, id: Uuid) -> BoxFuture<'_, Result<(), StoreError>> {
        let _ = id;
        Box::pin(async { Ok(()) })
    }
    /// The chains in flight, most recently advanced first, at most `limit`. Optional: the
    /// default refuses with [`StoreError::Unsupported`].
    fn chains(&self, limit: usize) -> BoxFuture<'_, Result<Vec<ChainProgress>, StoreError>> {
        let _ = limit;
        Box::pin(async { Err(StoreError::Unsupported("chains in flight")) })
    }
    /// Records that job `job` (a split task's id, a fan-in's job id) has `total` parts.
    /// Optional: the default records nothing.
    fn job_total(&self, job: Uuid, total: u32) -> BoxFuture<'_, Result<(), StoreError>> {
        let _ = (job, total);
        Box::pin(async { Ok(()) })
    }
    /// The recorded totals of `jobs`, in order (`None`: not recorded). Optional: the
    /// default knows none.
    fn job_totals<'a>(
        &'a self,
        jobs: &'a [Uuid],
    ) -> BoxFuture<'a, Result<Vec<Option<u32>>, StoreError>> {
        Box::pin(async move { Ok(vec![None; jobs.len()]) })
    }
    /// Advertises that a worker hosts `methods` of service `svc`, for `ttl` (workers
    /// refresh it while they run). Optional: the default records nothing.
    fn advertise<'a>(
        &'a self,
        svc: &'a str,
        methods: &'a [String],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let _ = (svc, methods, ttl);
        Box::pin(async { Ok(()) })
    }
    /// The methods of `svc` some worker advertised within its ttl, by name. Optional: the
    /// default refuses with [`StoreError::Unsupported`].
    fn advertised<'a>(
        &'a self,
        svc: &'a str,
    ) -> BoxFuture<'a, Result<Vec<AdvertisedMethod>, StoreError>> {
        let _ = svc;
        Box::pin(async { Err(StoreError::Unsupported("advertised methods")) })
    }
}

/// How long a worker's advertisement of its methods lasts without a refresh (it refreshes
/// every third of it while it runs).
pub const ADVERTISE_TTL: Duration = Duration::from_secs(90);

/// Default retention of statuses.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

#[cfg(feature = "redis")]
pub(crate) mod redis;
#[cfg(feature = "redis")]
pub use self::redis::RedisStore;

/// Wraps a store for writers that must never wait on it: each write has a short deadline,
/// and after a failure writes are skipped for a second (logged once per outage).
#[derive(Debug)]
pub struct Recorder {
    store: std::sync::Arc<dyn StatusStore>,
    down_until: Mutex<Option<Instant>>,
}

impl Recorder {
    /// Records into `store`.
    #[must_use]
    pub fn new(store: std::sync::Arc<dyn StatusStore>) -> Self {
        Self {
            store,
            down_until: Mutex::new(None),
        }
    }

    /// The store.
    #[must_use]
    pub fn store(&self) -> &std::sync::Arc<dyn StatusStore> {
        &self.store
    }

    /// Writes `status` unless the store failed in the last second; never fails.
    pub async fn record(&self, status: &TaskStatus) {
        self.guarded(self.store.put(status)).await;
    }

    /// Bumps counter `name` the same way (best effort).
    pub async fn bump(&self, name: &str) {
        self.guarded(self.store.bump(name)).await;
    }

    /// Writes `status` with its relation to the task that caused it (from `env`'s
    /// `parent` and channel), the same way.
    pub async fn record_linked(&self, status: &TaskStatus, env: &crate::Envelope) {
        let link = env
            .parent
            .filter(|p| *p != status.id)
            .and_then(|p| Relation::of(env.channel).map(|r| (p, r)));
        self.guarded(self.store.put_linked(status, link)).await;
    }

    /// Records a chain's progress the same way (best effort).
    pub async fn chain_progress(&self, progress: &ChainProgress) {
        self.guarded(self.store.chain_progress(progress)).await;
    }

    /// Forgets an ended chain's progress the same way (best effort).
    pub async fn chain_ended(&self, id: Uuid) {
        self.guarded(self.store.chain_ended(id)).await;
    }

    /// Records a job's number of parts the same way (best effort).
    pub async fn job_total(&self, job: Uuid, total: u32) {
        self.guarded(self.store.job_total(job, total)).await;
    }

    /// Advertises a service's methods the same way (best effort).
    pub async fn advertise(&self, svc: &str, methods: &[String], ttl: Duration) {
        self.guarded(self.store.advertise(svc, methods, ttl)).await;
    }

    async fn guarded(&self, op: BoxFuture<'_, Result<(), StoreError>>) {
        if self
            .down_until
            .lock()
            .is_ok_and(|d| d.is_some_and(|t| Instant::now() < t))
        {
            return;
        }
        let r = tokio::time::timeout(Duration::from_millis(250), op).await;
        let failed = match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("timed out after 250 ms".to_owned()),
        };
        if let Ok(mut d) = self.down_until.lock() {
            match failed {
                None => *d = None,
                Some(e) => {
                    if d.is_none() {
                        tracing::warn!(error = %e, "status store unavailable; statuses are not recorded until it is back (tasks go on)");
                    }
                    *d = Some(Instant::now() + Duration::from_secs(1));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Via;

    #[test]
    fn relations_follow_the_channel_and_read_back() {
        assert_eq!(Relation::of(Via::Enqueue), Some(Relation::Child));
        assert_eq!(Relation::of(Via::Invoke), Some(Relation::Child));
        assert_eq!(Relation::of(Via::Hook), Some(Relation::Hook));
        assert_eq!(Relation::of(Via::OnFinal), Some(Relation::Callback));
        assert_eq!(Relation::of(Via::Part), Some(Relation::Part));
        assert_eq!(Relation::of(Via::Chain), Some(Relation::Step));
        // A retry keeps the relation its first attempt recorded.
        assert_eq!(Relation::of(Via::Retry), None);
        for r in [
            Relation::Child,
            Relation::Hook,
            Relation::Callback,
            Relation::Part,
            Relation::Step,
        ] {
            assert_eq!(Relation::parse(r.as_str()), Some(r));
            assert_eq!(
                serde_json::to_value(r).ok(),
                Some(serde_json::Value::from(r.as_str()))
            );
        }
        assert!(Relation::Hook.is_hook() && Relation::Callback.is_hook());
        assert!(!Relation::Child.is_hook() && !Relation::Step.is_hook());
        assert_eq!(Relation::parse("other"), None);
    }
}
