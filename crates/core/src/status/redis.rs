//! [`RedisStore`]: task statuses in Redis (cargo feature `redis`).

use std::time::Duration;

use uuid::Uuid;

use super::{
    AdvertisedMethod, BoxFuture, ChainProgress, Relation, StatusStore, StoreError, TaskStatus,
    DEFAULT_RETENTION,
};

/// Redis-backed [`StatusStore`]: `warren:status:<id>` holds the JSON status and
/// `warren:cid:<cid>` the set of task ids, both expiring `retention` after their last write.
/// Cancellations are `warren:cancel:id:<id>` / `warren:cancel:cid:<cid>` (expiring after
/// `retention`), unique keys `warren:unique:<svc.method>:<key>` (expiring after the task's
/// unique ttl, removed when the task ends).
///
/// For the web admin: `warren:rel:<parent id>` (a hash: related task id → relation),
/// `warren:chain:<chain id>` (a chain's progress, JSON) with the index `warren:chains` (a
/// sorted set of chain ids by last progress, entries older than the retention pruned at
/// each write) and `warren:job:<job id>` (a split job's or fan-in's number of parts) all
/// expire `retention` after their last write; a chain's entries are removed when it ends.
/// `warren:methods:<svc>` (a sorted set of the methods workers host, by when they last
/// advertised them) expires after the advertisement's ttl (90 s) unless a worker refreshes it.
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

    fn rel_key(&self, parent: &Uuid) -> String {
        format!("{}rel:{parent}", self.prefix)
    }

    /// The store key of chain `id`'s progress.
    #[must_use]
    pub fn chain_key(&self, id: &Uuid) -> String {
        format!("{}chain:{id}", self.prefix)
    }

    /// The store key of the index of chains in flight.
    #[must_use]
    pub fn chains_key(&self) -> String {
        format!("{}chains", self.prefix)
    }

    /// The store key of job `id`'s number of parts.
    #[must_use]
    pub fn job_key(&self, id: &Uuid) -> String {
        format!("{}job:{id}", self.prefix)
    }

    /// The store key of the methods workers advertised for `svc`.
    #[must_use]
    pub fn methods_key(&self, svc: &str) -> String {
        format!("{}methods:{svc}", self.prefix)
    }

    fn add_relation(&self, p: &mut redis::Pipeline, parent: Uuid, child: Uuid, r: Relation) {
        let key = self.rel_key(&parent);
        p.cmd("HSET")
            .arg(&key)
            .arg(child.to_string())
            .arg(r.as_str())
            .ignore()
            .cmd("EXPIRE")
            .arg(&key)
            .arg(self.retention.as_secs().max(1))
            .ignore();
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
        self.put_linked(status, None)
    }

    /// One pipeline: the status, its cid index and, with a link, the parent's relations.
    fn put_linked<'a>(
        &'a self,
        status: &'a TaskStatus,
        link: Option<(Uuid, Relation)>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
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
            if let Some((parent, relation)) = link {
                self.add_relation(&mut p, parent, status.id, relation);
            }
            self.run::<()>(p).await
        })
    }

    fn relate(
        &self,
        parent: Uuid,
        child: Uuid,
        relation: Relation,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let mut p = redis::pipe();
            self.add_relation(&mut p, parent, child, relation);
            self.run::<()>(p).await
        })
    }

    fn related(&self, parent: Uuid) -> BoxFuture<'_, Result<Vec<(Uuid, Relation)>, StoreError>> {
        Box::pin(async move {
            let mut p = redis::pipe();
            p.cmd("HGETALL").arg(self.rel_key(&parent));
            let (all,): (Vec<(String, String)>,) = self.run(p).await?;
            Ok(all
                .into_iter()
                .filter_map(|(id, r)| Some((Uuid::parse_str(&id).ok()?, Relation::parse(&r)?)))
                .collect())
        })
    }

    /// `SET warren:chain:<id> <json> EX <retention>`, the id into `warren:chains` (scored by
    /// now), entries older than the retention pruned.
    fn chain_progress<'a>(
        &'a self,
        progress: &'a ChainProgress,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let json =
                serde_json::to_string(progress).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let ttl = self.retention.as_secs().max(1);
            let now = crate::envelope::now_ms();
            let oldest = now.saturating_sub(ttl.saturating_mul(1000));
            let index = self.chains_key();
            let mut p = redis::pipe();
            p.cmd("SET")
                .arg(self.chain_key(&progress.id))
                .arg(json)
                .arg("EX")
                .arg(ttl)
                .ignore()
                .cmd("ZADD")
                .arg(&index)
                .arg(now)
                .arg(progress.id.to_string())
                .ignore()
                .cmd("ZREMRANGEBYSCORE")
                .arg(&index)
                .arg("-inf")
                .arg(format!("({oldest}"))
                .ignore()
                .cmd("EXPIRE")
                .arg(&index)
                .arg(ttl)
                .ignore();
            self.run::<()>(p).await
        })
    }

    fn chain_ended(&self, id: Uuid) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let mut p = redis::pipe();
            p.cmd("DEL")
                .arg(self.chain_key(&id))
                .ignore()
                .cmd("ZREM")
                .arg(self.chains_key())
                .arg(id.to_string())
                .ignore();
            self.run::<()>(p).await
        })
    }

    fn chains(&self, limit: usize) -> BoxFuture<'_, Result<Vec<ChainProgress>, StoreError>> {
        Box::pin(async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let mut p = redis::pipe();
            p.cmd("ZREVRANGE")
                .arg(self.chains_key())
                .arg(0)
                .arg(limit.saturating_sub(1));
            let (ids,): (Vec<String>,) = self.run(p).await?;
            let ids: Vec<Uuid> = ids.iter().filter_map(|i| Uuid::parse_str(i).ok()).collect();
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let mut p = redis::pipe();
            let cmd = p.cmd("MGET");
            for id in &ids {
                cmd.arg(self.chain_key(id));
            }
            let (found,): (Vec<Option<String>>,) = self.run(p).await?;
            found
                .into_iter()
                .flatten()
                .map(|j| serde_json::from_str(&j).map_err(|e| StoreError::Corrupt(e.to_string())))
                .collect()
        })
    }

    /// `SET warren:job:<id> <total> EX <retention>`.
    fn job_total(&self, job: Uuid, total: u32) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let mut p = redis::pipe();
            p.cmd("SET")
                .arg(self.job_key(&job))
                .arg(total)
                .arg("EX")
                .arg(self.retention.as_secs().max(1))
                .ignore();
            self.run::<()>(p).await
        })
    }

    fn job_totals<'a>(
        &'a self,
        jobs: &'a [Uuid],
    ) -> BoxFuture<'a, Result<Vec<Option<u32>>, StoreError>> {
        Box::pin(async move {
            if jobs.is_empty() {
                return Ok(Vec::new());
            }
            let mut p = redis::pipe();
            let cmd = p.cmd("MGET");
            for j in jobs {
                cmd.arg(self.job_key(j));
            }
            let (found,): (Vec<Option<String>>,) = self.run(p).await?;
            Ok(found
                .into_iter()
                .map(|v| v.and_then(|v| v.parse().ok()))
                .collect())
        })
    }

    /// `ZADD warren:methods:<svc> <now> <method>…`, entries older than `ttl` pruned, the key
    /// expiring after `ttl`.
    fn advertise<'a>(
        &'a self,
        svc: &'a str,
        methods: &'a [String],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if methods.is_empty() {
                return Ok(());
            }
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            let now = crate::envelope::now_ms();
            let key = self.methods_key(svc);
            let mut p = redis::pipe();
            let add = p.cmd("ZADD").arg(&key);
            for m in methods {
                add.arg(now).arg(m);
            }
            add.ignore();
            p.cmd("ZREMRANGEBYSCORE")
                .arg(&key)
                .arg("-inf")
                .arg(format!("({}", now.saturating_sub(ttl_ms)))
                .ignore()
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(ttl_ms)
                .ignore();
            self.run::<()>(p).await
        })
    }

    fn advertised<'a>(
        &'a self,
        svc: &'a str,
    ) -> BoxFuture<'a, Result<Vec<AdvertisedMethod>, StoreError>> {
        Box::pin(async move {
            let mut p = redis::pipe();
            p.cmd("ZRANGE")
                .arg(self.methods_key(svc))
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES");
            let (all,): (Vec<(String, f64)>,) = self.run(p).await?;
            let mut out: Vec<AdvertisedMethod> = all
                .into_iter()
                .map(|(method, seen)| AdvertisedMethod {
                    method,
                    // Scores are ms since the epoch: whole numbers well within f64's range.
                    seen_ms: seen.max(0.0) as u64,
                })
                .collect();
            out.sort_by(|a, b| a.method.cmp(&b.method));
            Ok(out)
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
