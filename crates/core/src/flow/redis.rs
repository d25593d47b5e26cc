//! [`FlowStore`] for [`RedisStore`]: rate reservations and key slots shared by every worker
//! using the same Redis (and key prefix). Each decision is one Lua script, atomic in Redis,
//! timed by Redis's own clock (`TIME`), so workers on different machines agree on time.
//!
//! Keys (prefix `warren:` by default), each with a TTL:
//! - `<prefix>flow:rate:<svc>.<method>`: the next free start (µs, Redis time); expires
//!   1 s after the last reserved start.
//! - `<prefix>flow:key:<svc>.<method>:<key>`: a sorted set of holders scored by lease end
//!   (ms); expires one lease after its last acquire or renewal, and is deleted with its
//!   last holder.

use std::time::Duration;

use super::FlowStore;
use crate::status::redis::unavailable;
use crate::status::{BoxFuture, RedisStore, StoreError};

/// GCRA reservation: KEYS[1] the rate key; ARGV[1] the interval in µs. Returns the wait in
/// µs until the reserved start (0: now).
const RESERVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local start = math.max(tat, now)
local next_tat = start + interval
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX',
  math.floor((next_tat - now) / 1000) + 1000)
return math.floor(start - now)
";

/// Leased slot: KEYS[1] the key's holder set; ARGV[1] holder, ARGV[2] limit, ARGV[3] lease
/// in ms. Drops expired holders, then takes (or renews) a slot if one is free or already
/// held. Returns 1 when held, 0 when the key is busy.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], lease)
  return 1
end
return 0
";

impl RedisStore {
    fn flow_key(&self, name: &str) -> String {
        format!("{}flow:{name}", self.prefix())
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let mut c = self.conn().await?;
        tokio::time::timeout(self.timeout(), inv.invoke_async(&mut c))
            .await
            .map_err(|_| StoreError::Timeout(self.timeout()))?
            .map_err(unavailable)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl FlowStore for RedisStore {
    fn reserve<'a>(
        &'a self,
        name: &'a str,
        interval: Duration,
    ) -> BoxFuture<'a, Result<Duration, StoreError>> {
        Box::pin(async move {
            let script = redis::Script::new(RESERVE);
            let mut inv = script.key(self.flow_key(name));
            inv.arg(u64::try_from(interval.as_micros()).unwrap_or(u64::MAX));
            let wait_us: i64 = self.invoke(inv).await?;
            Ok(Duration::from_micros(u64::try_from(wait_us).unwrap_or(0)))
        })
    }

    fn acquire<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        limit: u32,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let script = redis::Script::new(ACQUIRE);
            let mut inv = script.key(self.flow_key(name));
            inv.arg(holder).arg(limit).arg(millis(lease));
            let held: i64 = self.invoke(inv).await?;
            Ok(held == 1)
        })
    }

    fn release<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut c = self.conn().await?;
            let mut cmd = redis::cmd("ZREM");
            cmd.arg(self.flow_key(name)).arg(holder);
            tokio::time::timeout(self.timeout(), cmd.query_async::<i64>(&mut c))
                .await
                .map_err(|_| StoreError::Timeout(self.timeout()))?
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn is_shared(&self) -> bool {
        true
    }
}
