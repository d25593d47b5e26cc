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
}

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
