//! [`RedisStore`]: task statuses in Redis (cargo feature `redis`).

use std::time::Duration;

use uuid::Uuid;

use super::{BoxFuture, StatusStore, StoreError, TaskStatus, DEFAULT_RETENTION};

/// Redis-backed [`StatusStore`]: `warren:status:<id>` holds the JSON status and
/// `warren:cid:<cid>` the set of task ids, both expiring `retention` after their last write.
/// Cancellations are `warren:cancel:id:<id>` / `warren:cancel:cid:<cid>` (expiring after
/// `retention`), unique keys `warren:unique:<svc.method>:<key>` (expiring after the task's
/// unique ttl, removed when the task ends).
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

    pub(crate) async fn conn(&self) -> Result<redis::aio::ConnectionManager, StoreError> {
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

    /// The store key recording a cancellation of `scope`.
    #[must_use]
    pub fn cancel_key(&self, scope: &crate::cancel::CancelScope) -> String {
        match scope {
            crate::cancel::CancelScope::Id(id) => format!("{}cancel:id:{id}", self.prefix),
            crate::cancel::CancelScope::Cid(cid) => format!("{}cancel:cid:{cid}", self.prefix),
        }
    }

    /// The store key of unique key `key` (qualified with its `svc.method`).
    #[must_use]
    pub fn unique_key(&self, key: &str) -> String {
        format!("{}unique:{key}", self.prefix)
    }
}

impl RedisStore {
    /// The key prefix (`warren:` unless [`RedisStore::with_prefix`] changed it).
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The deadline of each command.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// Claim-or-read in one step: the current holder, or nothing after setting it.
const UNIQUE_CLAIM: &str = r"
local held = redis.call('GET', KEYS[1])
if held then return held end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
";

/// Compare-and-delete: remove the key only while it holds this task id (its first 36
/// bytes; the rest is the holder's cid).
const UNIQUE_RELEASE: &str = r"
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, 36) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

pub(crate) fn unavailable(e: redis::RedisError) -> StoreError {
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

    /// `SET warren:cancel:{id|cid}:<x> <now ms> EX <retention>`.
    fn cancel<'a>(
        &'a self,
        scope: &'a crate::cancel::CancelScope,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut p = redis::pipe();
            p.cmd("SET")
                .arg(self.cancel_key(scope))
                .arg(crate::envelope::now_ms())
                .arg("EX")
                .arg(self.retention.as_secs().max(1))
                .ignore();
            self.run::<()>(p).await
        })
    }

    /// One `MGET` of the ids' and the cid's cancel keys.
    fn is_cancelled<'a>(
        &'a self,
        ids: &'a [Uuid],
        cid: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            use crate::cancel::CancelScope;
            let mut p = redis::pipe();
            let cmd = p.cmd("MGET");
            for id in ids {
                cmd.arg(self.cancel_key(&CancelScope::Id(*id)));
            }
            cmd.arg(self.cancel_key(&CancelScope::Cid(cid.to_owned())));
            let (found,): (Vec<Option<String>>,) = self.run(p).await?;
            Ok(found.iter().any(Option::is_some))
        })
    }

    /// A Lua claim-or-read (`SET … PX <ttl>` when free).
    fn unique_claim<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        Box::pin(async move {
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            let mut p = redis::pipe();
            p.cmd("EVAL")
                .arg(UNIQUE_CLAIM)
                .arg(1)
                .arg(self.unique_key(key))
                .arg(holder)
                .arg(ttl_ms);
            let (held,): (Option<String>,) = self.run(p).await?;
            Ok(held)
        })
    }

    /// A Lua compare-and-delete.
    fn unique_release<'a>(
        &'a self,
        key: &'a str,
        id: Uuid,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut p = redis::pipe();
            p.cmd("EVAL")
                .arg(UNIQUE_RELEASE)
                .arg(1)
                .arg(self.unique_key(key))
                .arg(id.to_string());
            let (n,): (i64,) = self.run(p).await?;
            Ok(n > 0)
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
