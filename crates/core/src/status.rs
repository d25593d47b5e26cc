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
}

/// Redis-backed [`StatusStore`]: `warren:status:<id>` holds the JSON status and
/// `warren:cid:<cid>` the set of task ids, both expiring `retention` after their last write.
/// Connects lazily and reconnects by itself; every command has a deadline.
///
/// ```no_run
/// # fn demo() -> Result<(), warren_core::status::StoreError> {
/// use std::time::Duration;
/// use warren_core::status::RedisStore;
/// let store = RedisStore::new("redis://127.0.0.1:6379/", Duration::from_secs(24 * 3600))?;
/// # let _ = store; Ok(()) }
/// ```
pub struct RedisStore {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<redis::aio::ConnectionManager>>,
    retention: Duration,
    timeout: Duration,
    prefix: String,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: show only where it points.
        let info = self.client.get_connection_info();
        f.debug_struct("RedisStore")
            .field("addr", &info.addr().to_string())
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

/// Default retention of statuses.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

impl RedisStore {
    /// A store at `url` (`redis://[:password@]host:port/[db]`) keeping statuses for
    /// `retention`. Does not connect yet.
    pub fn new(url: &str, retention: Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)
            .map_err(|e| StoreError::Unavailable(format!("invalid Redis URL: {:?}", e.kind())))?;
        Ok(Self {
            client,
            conn: tokio::sync::Mutex::new(None),
            retention: retention.max(Duration::from_secs(1)),
            timeout: Duration::from_secs(2),
            prefix: "warren:".to_owned(),
        })
    }

    /// `WARREN_REDIS_URL` (default `redis://127.0.0.1:6379/`), default retention (24 h).
    pub fn from_env() -> Result<Self, StoreError> {
        let url = std::env::var("WARREN_REDIS_URL")
            .ok()
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| "redis://127.0.0.1:6379/".to_owned());
        Self::new(&url, DEFAULT_RETENTION)
    }

    /// Prefixes every key with `prefix` instead of `warren:` (tests isolate themselves so).
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Deadline of each command (default 2 s).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn conn(&self) -> Result<redis::aio::ConnectionManager, StoreError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let c = tokio::time::timeout(
            self.timeout,
            self.client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| StoreError::Timeout(self.timeout))?
        .map_err(unavailable)?;
        *guard = Some(c.clone());
        Ok(c)
    }

    async fn run<T: redis::FromRedisValue>(&self, cmd: redis::Pipeline) -> Result<T, StoreError> {
        let mut c = self.conn().await?;
        tokio::time::timeout(self.timeout, cmd.query_async(&mut c))
            .await
            .map_err(|_| StoreError::Timeout(self.timeout))?
            .map_err(unavailable)
    }

    fn key(&self, id: &Uuid) -> String {
        format!("{}status:{id}", self.prefix)
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("{}: {}", e.category(), e.detail().unwrap_or("")))
}

impl StatusStore for RedisStore {
    fn put<'a>(&'a self, status: &'a TaskStatus) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let json =
                serde_json::to_string(status).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let ttl = self.retention.as_secs();
            let cid_key = format!("{}cid:{}", self.prefix, status.cid);
            let mut p = redis::pipe();
            p.cmd("SET")
                .arg(self.key(&status.id))
                .arg(json)
                .arg("EX")
                .arg(ttl)
                .ignore()
                .cmd("SADD")
                .arg(&cid_key)
                .arg(status.id.to_string())
                .ignore()
                .cmd("EXPIRE")
                .arg(&cid_key)
                .arg(ttl)
                .ignore();
            self.run::<()>(p).await
        })
    }

    fn get(&self, id: Uuid) -> BoxFuture<'_, Result<Option<TaskStatus>, StoreError>> {
        Box::pin(async move {
            let mut p = redis::pipe();
            p.cmd("GET").arg(self.key(&id));
            let (json,): (Option<String>,) = self.run(p).await?;
            json.map(|j| serde_json::from_str(&j).map_err(|e| StoreError::Corrupt(e.to_string())))
                .transpose()
        })
    }

    fn by_cid<'a>(&'a self, cid: &'a str) -> BoxFuture<'a, Result<Vec<TaskStatus>, StoreError>> {
        Box::pin(async move {
            let mut p = redis::pipe();
            p.cmd("SMEMBERS").arg(format!("{}cid:{cid}", self.prefix));
            let (ids,): (Vec<String>,) = self.run(p).await?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Ok(id) = Uuid::parse_str(&id) {
                    if let Some(s) = self.get(id).await? {
                        out.push(s);
                    }
                }
            }
            out.sort_by_key(|s| (s.created_ms, s.id));
            Ok(out)
        })
    }

    /// Counters do not expire (`warren:count:<name>`).
    fn bump<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut p = redis::pipe();
            p.cmd("INCR")
                .arg(format!("{}count:{name}", self.prefix))
                .ignore();
            self.run::<()>(p).await
        })
    }

    fn counter<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            let mut p = redis::pipe();
            p.cmd("GET").arg(format!("{}count:{name}", self.prefix));
            let (v,): (Option<u64>,) = self.run(p).await?;
            Ok(Some(v.unwrap_or(0)))
        })
    }

    /// `SET warren:claim:<id> 1 NX EX <retention>`.
    fn claim(&self, id: Uuid) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut p = redis::pipe();
            p.cmd("SET")
                .arg(format!("{}claim:{id}", self.prefix))
                .arg(1)
                .arg("NX")
                .arg("EX")
                .arg(self.retention.as_secs().max(1));
            let (v,): (Option<String>,) = self.run(p).await?;
            Ok(v.is_some())
        })
    }
}

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
