//! Shared by the cancellation and unique-task tests (`cancel`, `cancel_jobs`,
//! `unique_tasks`): a Redis store under a test's own prefix, raw Redis access to look at and
//! remove its keys, and a fixture with an in-process worker whose handlers record what ran.

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{config, run_in_background, unique, Cleanup};
use serde_json::{json, Value};
use warren::{
    Client, Context, QueueType, RedisStore, RetryPolicy, Service, StatusStore, TaskError, Worker,
};

pub(crate) fn redis_url() -> String {
    std::env::var("WARREN_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

/// A Redis store under a prefix of the test's own.
pub(crate) fn store(prefix: &str) -> Arc<dyn StatusStore> {
    Arc::new(
        RedisStore::new(&redis_url(), Duration::from_secs(600))
            .unwrap()
            .with_prefix(prefix.to_owned()),
    )
}

/// A raw Redis connection, to look at (and remove) the test's keys.
pub(crate) async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Every key under `prefix`.
pub(crate) async fn keys(prefix: &str) -> Vec<String> {
    let mut c = redis().await;
    redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut c)
        .await
        .unwrap()
}

/// Removes every key under `prefix`.
pub(crate) async fn drop_keys(prefix: &str) {
    let mut c = redis().await;
    for k in keys(prefix).await {
        let _: Result<(), _> = redis::cmd("DEL").arg(k).query_async(&mut c).await;
    }
}

/// (method, cid, payload) of every hook call.
pub(crate) type Calls = Arc<Mutex<Vec<(String, String, Value)>>>;

/// The test service: `work` (records its key, sleeps `ms`), `polite` (waits for the
/// cancellation, then fails), `stubborn` (ignores it; flags when its future is dropped),
/// a splitter `sum_part`/`sum`, a chain `step`, and the hooks `done`/`failed`.
fn service(svc: &str, ran: Calls, hooks: Calls, dropped: Arc<AtomicBool>) -> Service {
    let (r1, r2, r3, r4, r5) = (ran.clone(), ran.clone(), ran.clone(), ran.clone(), ran);
    let (h1, h2) = (hooks.clone(), hooks);
    Service::new(svc)
        .retry(RetryPolicy::fixed(3, Duration::from_millis(100)))
        .method("work", move |ctx: Context, p: Value| {
            let ran = r1.clone();
            async move {
                ran.lock()
                    .unwrap()
                    .push(("work".into(), ctx.cid().to_owned(), p.clone()));
                let ms = p["ms"].as_u64().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, TaskError>(p)
            }
        })
        .method("polite", move |ctx: Context, _: Value| {
            let ran = r2.clone();
            async move {
                ran.lock().unwrap().push((
                    "polite".into(),
                    ctx.cid().to_owned(),
                    json!(ctx.attempt()),
                ));
                ctx.cancelled().await;
                assert!(ctx.is_cancelled());
                Err::<Value, _>(TaskError::fail("saw the cancellation; stopping"))
            }
        })
        .method("stubborn", move |ctx: Context, _: Value| {
            let ran = r3.clone();
            let dropped = dropped.clone();
            async move {
                struct OnDrop(Arc<AtomicBool>);
                impl Drop for OnDrop {
                    fn drop(&mut self) {
                        self.0.store(true, Ordering::SeqCst);
                    }
                }
                let _guard = OnDrop(dropped);
                ran.lock()
                    .unwrap()
                    .push(("stubborn".into(), ctx.cid().to_owned(), Value::Null));
                tokio::time::sleep(Duration::from_secs(120)).await;
                Ok::<_, TaskError>(Value::Null)
            }
        })
        .method("fails", move |ctx: Context, _: Value| {
            let ran = r5.clone();
            async move {
                ran.lock().unwrap().push((
                    "fails".into(),
                    ctx.cid().to_owned(),
                    json!(ctx.attempt()),
                ));
                Err::<Value, _>(TaskError::fail("always fails"))
            }
        })
        .method("sum_part", |_: Context, n: u64| async move {
            Ok::<_, TaskError>((0..n).collect::<Vec<_>>())
        })
        .method("sum", move |ctx: Context, i: u64| {
            let ran = r4.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(40)).await;
                ran.lock()
                    .unwrap()
                    .push(("sum".into(), ctx.cid().to_owned(), json!(i)));
                Ok::<_, TaskError>(i * i)
            }
        })
        .method("step", |ctx: Context, bog: Value| async move {
            let count = bog["count"].as_u64().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = ctx;
            Ok::<_, TaskError>(json!({"count": count + 1}))
        })
        .method("done", move |ctx: Context, v: Value| {
            let hooks = h1.clone();
            async move {
                hooks
                    .lock()
                    .unwrap()
                    .push(("done".into(), ctx.cid().to_owned(), v));
                Ok::<_, TaskError>(())
            }
        })
        .method("failed", move |ctx: Context, v: Value| {
            let hooks = h2.clone();
            async move {
                hooks
                    .lock()
                    .unwrap()
                    .push(("failed".into(), ctx.cid().to_owned(), v));
                Ok::<_, TaskError>(())
            }
        })
}

pub(crate) struct Fixture {
    pub(crate) svc: String,
    pub(crate) prefix: String,
    pub(crate) client: Client,
    pub(crate) ran: Calls,
    pub(crate) hooks: Calls,
    pub(crate) dropped: Arc<AtomicBool>,
    pub(crate) store: Option<Arc<dyn StatusStore>>,
    _cleanup: Cleanup,
}

impl Fixture {
    pub(crate) async fn new(name: &str, with_store: bool) -> Self {
        let svc = unique(name);
        let prefix = format!("{svc}:");
        let store = with_store.then(|| store(&prefix));
        let mut b = Client::builder().amqp(config(QueueType::Quorum));
        if let Some(s) = &store {
            b = b.status_store(s.clone());
        }
        let client = b.connect().await.unwrap();
        client.ensure_service(&svc).await.unwrap();
        Self {
            _cleanup: Cleanup::new(&[&svc]),
            svc,
            prefix,
            client,
            ran: Calls::default(),
            hooks: Calls::default(),
            dropped: Arc::default(),
            store,
        }
    }

    /// Starts an in-process worker; returns its cancel queue's name and its handle.
    pub(crate) async fn worker(&self, grace: Duration) -> (String, common::Running) {
        let mut b = Worker::builder()
            .amqp(config(QueueType::Quorum))
            .concurrency(8)
            .cancel_grace(grace)
            .completion_window(Duration::from_secs(3))
            .service(service(
                &self.svc,
                self.ran.clone(),
                self.hooks.clone(),
                self.dropped.clone(),
            ));
        if let Some(s) = &self.store {
            b = b.status_store(s.clone());
        }
        let w = b.build().await.unwrap();
        let queue = w.cancel_queue().to_owned();
        (queue, run_in_background(w))
    }

    pub(crate) fn target(&self, method: &str) -> String {
        format!("{}.{method}", self.svc)
    }

    pub(crate) fn ran(&self, method: &str, cid: &str) -> usize {
        self.ran
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, c, _)| m == method && c == cid)
            .count()
    }

    pub(crate) fn hooks(&self, cid: &str) -> Vec<(String, Value)> {
        self.hooks
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, c, _)| c == cid)
            .map(|(m, _, v)| (m.clone(), v.clone()))
            .collect()
    }

    pub(crate) async fn finish(self, running: common::Running) {
        running.stop.cancel();
        running.handle.await.unwrap().unwrap();
        self.client.close().await;
        drop_keys(&self.prefix).await;
    }
}

/// `true` while queue `q` exists; an exclusive queue of another connection answers a
/// passive declare with RESOURCE_LOCKED, which also means it exists.
pub(crate) async fn exists(client: &Client, q: &str) -> bool {
    match client.broker().queue_stats(q).await {
        Ok(found) => found.is_some(),
        Err(e) => {
            assert!(format!("{e:?}").contains("RESOURCE_LOCKED"), "{e:?}");
            true
        }
    }
}

/// The error kind of a failed hook payload (`{"error": {"kind": ..}}`).
pub(crate) fn kind_of(v: &Value) -> &str {
    v["error"]["kind"].as_str().unwrap_or_default()
}
