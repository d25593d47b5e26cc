//! Cancellation (docs/cancellation.md) against the real broker and Redis: a queued task never
//! runs, a running handler is cancelled (and dropped after the grace), a cid stops a 200-part
//! split job and a chain mid-way (no hook, onerror once with `cancelled`), a cancellation
//! holds across a worker restart (real processes), without a store a listening worker still
//! stops what arrives, unknown ids are reported, and every key and queue goes away.

use crate::common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{config, poll, run_in_background, unique, Cleanup};
use serde_json::{json, Value};
use warren::{
    Chain, Client, ClientError, Context, FailureKind, Found, QueueType, RedisStore, RetryPolicy,
    Service, StatusStore, Task, TaskError, TaskState, Worker,
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
type Calls = Arc<Mutex<Vec<(String, String, Value)>>>;

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

struct Fixture {
    svc: String,
    prefix: String,
    client: Client,
    ran: Calls,
    hooks: Calls,
    dropped: Arc<AtomicBool>,
    store: Option<Arc<dyn StatusStore>>,
    _cleanup: Cleanup,
}

impl Fixture {
    async fn new(name: &str, with_store: bool) -> Self {
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
    async fn worker(&self, grace: Duration) -> (String, common::Running) {
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

    fn target(&self, method: &str) -> String {
        format!("{}.{method}", self.svc)
    }

    fn ran(&self, method: &str, cid: &str) -> usize {
        self.ran
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, c, _)| m == method && c == cid)
            .count()
    }

    fn hooks(&self, cid: &str) -> Vec<(String, Value)> {
        self.hooks
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, c, _)| c == cid)
            .map(|(m, _, v)| (m.clone(), v.clone()))
            .collect()
    }

    async fn finish(self, running: common::Running) {
        running.stop.cancel();
        running.handle.await.unwrap().unwrap();
        self.client.close().await;
        drop_keys(&self.prefix).await;
    }
}

/// `true` while queue `q` exists; an exclusive queue of another connection answers a
/// passive declare with RESOURCE_LOCKED, which also means it exists.
async fn exists(client: &Client, q: &str) -> bool {
    match client.broker().queue_stats(q).await {
        Ok(found) => found.is_some(),
        Err(e) => {
            assert!(format!("{e:?}").contains("RESOURCE_LOCKED"), "{e:?}");
            true
        }
    }
}

/// The error kind of a failed hook payload (`{"error": {"kind": ..}}`).
fn kind_of(v: &Value) -> &str {
    v["error"]["kind"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn a_queued_task_never_runs_and_settles_cancelled_everywhere() {
    let f = Fixture::new("cancel-queued", true).await;
    // Queued before any worker exists: one by id (with an onerror hook), one invoked by a
    // waiting caller (cancelled by its cid), one delayed.
    let cid = unique("c");
    let by_id = f
        .client
        .enqueue(
            Task::new(f.target("work"), &json!({"key": "a"}))
                .with_cid(cid.clone())
                .on_error(f.target("failed")),
        )
        .await
        .unwrap();
    let delayed = f
        .client
        .enqueue(
            Task::new(f.target("work"), &json!({"key": "b"}))
                .with_cid(cid.clone())
                .delay(Duration::from_millis(600)),
        )
        .await
        .unwrap();
    let invoke_cid = unique("i");
    let invoker = {
        let client = f.client.clone();
        let task = Task::new(f.target("work"), &json!({"key": "c"}))
            .with_cid(invoke_cid.clone())
            .with_timeout(Duration::from_secs(30));
        tokio::spawn(async move { client.invoke::<Value>(task).await })
    };
    let s = f.store.clone().unwrap();
    let ic = invoke_cid.clone();
    poll("the invoke to be pending", Duration::from_secs(10), || {
        let s = s.clone();
        let ic = ic.clone();
        async move { (!s.by_cid(&ic).await.unwrap().is_empty()).then_some(()) }
    })
    .await;

    let out = f.client.cancel(by_id.id).await.unwrap();
    assert_eq!(out.found(), Found::Pending);
    assert!(out.recorded);
    let out = f.client.cancel(delayed.id).await.unwrap();
    assert_eq!(out.found(), Found::Pending);
    let out = f.client.cancel_cid(&invoke_cid).await.unwrap();
    assert_eq!(out.found(), Found::Pending);
    assert_eq!(out.tasks.len(), 1);

    let (_, running) = f.worker(Duration::from_secs(5)).await;
    // The waiting caller is answered `cancelled`.
    match invoker.await.unwrap() {
        Err(ClientError::Failed { failure, .. }) => {
            assert_eq!(failure.kind, FailureKind::Cancelled)
        }
        other => panic!("expected a cancelled failure, got {other:?}"),
    }
    // The onerror hook fires once with `cancelled`.
    let hooks = poll("the onerror hook", Duration::from_secs(20), || async {
        let h = f.hooks(&cid);
        (!h.is_empty()).then_some(h)
    })
    .await;
    assert_eq!(hooks.len(), 1, "{hooks:?}");
    assert_eq!(hooks[0].0, "failed");
    assert_eq!(kind_of(&hooks[0].1), "cancelled");
    // Statuses say cancelled, after one attempt (never retried); the delayed one too.
    for id in [by_id.id, delayed.id] {
        let st = poll("a cancelled status", Duration::from_secs(20), || {
            let s = s.clone();
            async move {
                s.get(id)
                    .await
                    .unwrap()
                    .filter(|st| st.state == TaskState::Failed)
            }
        })
        .await;
        assert_eq!(st.error.unwrap().kind, FailureKind::Cancelled);
        assert_eq!(st.attempts, 1);
    }
    // Nothing ran, and nothing was dead-lettered.
    assert_eq!(f.ran("work", &cid) + f.ran("work", &invoke_cid), 0);
    let dead = f
        .client
        .broker()
        .queue_stats(&format!("warren.dead.{}", f.svc))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead.ready, 0);
    f.finish(running).await;
}

#[tokio::test]
async fn a_running_handler_sees_the_cancellation_and_a_stubborn_one_is_dropped_after_the_grace() {
    let f = Fixture::new("cancel-running", true).await;
    let grace = Duration::from_millis(500);
    let (_, running) = f.worker(grace).await;
    let polite_cid = unique("p");
    let stubborn_cid = unique("s");
    let call = |method: &str, cid: &str| {
        let client = f.client.clone();
        let task = Task::new(f.target(method), &Value::Null)
            .with_cid(cid.to_owned())
            .with_timeout(Duration::from_secs(60));
        tokio::spawn(async move { client.invoke::<Value>(task).await })
    };
    let polite = call("polite", &polite_cid);
    let stubborn = call("stubborn", &stubborn_cid);
    poll("both handlers to run", Duration::from_secs(20), || async {
        (f.ran("polite", &polite_cid) == 1 && f.ran("stubborn", &stubborn_cid) == 1).then_some(())
    })
    .await;
    let out = f.client.cancel_cid(&polite_cid).await.unwrap();
    assert_eq!(out.found(), Found::Running);
    assert!(out.broadcast, "the worker's cancel queue took it");
    let started = tokio::time::Instant::now();
    f.client.cancel_cid(&stubborn_cid).await.unwrap();
    for (name, h) in [("polite", polite), ("stubborn", stubborn)] {
        match h.await.unwrap() {
            Err(ClientError::Failed { failure, .. }) => {
                assert_eq!(failure.kind, FailureKind::Cancelled, "{name}: {failure}");
            }
            other => panic!("{name}: expected cancelled, got {other:?}"),
        }
    }
    // The stubborn handler was dropped once its grace ran out, not before.
    assert!(f.dropped.load(Ordering::SeqCst));
    assert!(started.elapsed() >= grace, "{:?}", started.elapsed());
    // Neither was retried (3 attempts allowed): one run each.
    assert_eq!(f.ran("polite", &polite_cid), 1);
    assert_eq!(f.ran("stubborn", &stubborn_cid), 1);
    f.finish(running).await;
}

#[tokio::test]
async fn cancelling_a_cid_stops_a_200_part_split_job_with_one_onerror_and_no_hook() {
    let f = Fixture::new("cancel-split", true).await;
    let (_, running) = f.worker(Duration::from_secs(2)).await;
    let cid = unique("job");
    let receipt = f
        .client
        .enqueue(
            Task::new(f.target("sum"), &200u64)
                .with_cid(cid.clone())
                .on_complete(f.target("done"))
                .on_error(f.target("failed")),
        )
        .await
        .unwrap();
    poll("some parts to run", Duration::from_secs(30), || async {
        (f.ran("sum", &cid) >= 10).then_some(())
    })
    .await;
    let out = f.client.cancel_cid(&cid).await.unwrap();
    assert!(out.recorded);
    let hooks = poll("the onerror hook", Duration::from_secs(60), || async {
        let h = f.hooks(&cid);
        (!h.is_empty()).then_some(h)
    })
    .await;
    // The job's part queue is removed by the join.
    let part_queue = warren::topology::part_queue(&f.svc, "sum", &receipt.id).unwrap();
    poll(
        "the part queue to be gone",
        Duration::from_secs(30),
        || async {
            f.client
                .broker()
                .queue_stats(&part_queue)
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    let ran = f.ran("sum", &cid);
    assert!(
        ran < 200,
        "the cancellation stopped the remaining parts ({ran} ran)"
    );
    let hooks_now = f.hooks(&cid);
    assert_eq!(hooks_now.len(), 1, "exactly one hook: {hooks_now:?}");
    assert_eq!(hooks[0].0, "failed", "no oncomplete");
    assert_eq!(kind_of(&hooks[0].1), "cancelled", "{}", hooks[0].1);
    let dead = f
        .client
        .broker()
        .queue_stats(&format!("warren.dead.{}", f.svc))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead.ready, 0, "cancelled parts are not dead-lettered");
    f.finish(running).await;
}

#[tokio::test]
async fn cancelling_a_cid_stops_a_chain_mid_way() {
    let f = Fixture::new("cancel-chain", true).await;
    let (_, running) = f.worker(Duration::from_millis(100)).await;
    let cid = unique("chain");
    let chain = (0..5)
        .fold(Chain::new(), |c, _| c.step(f.target("step")))
        .with_cid(cid.clone())
        .with_timeout(Duration::from_secs(60));
    let handle = f.client.enqueue_chain(chain).await.unwrap();
    let chain_id = handle.id;
    // After the first step, cancel.
    let s = f.store.clone().unwrap();
    let c = cid.clone();
    poll("the first step to finish", Duration::from_secs(20), || {
        let s = s.clone();
        let c = c.clone();
        async move {
            s.by_cid(&c)
                .await
                .unwrap()
                .iter()
                .any(|st| st.state == TaskState::Succeeded)
                .then_some(())
        }
    })
    .await;
    f.client.cancel_cid(&cid).await.unwrap();
    match handle.wait().await {
        Err(e) => assert_eq!(e.failure_kind(), Some(FailureKind::Cancelled), "{e}"),
        Ok(r) => panic!("the chain ran to its end: {r:?}"),
    }
    // Steps that ran: at most the one running when cancelled, and never the last ones.
    let done = s
        .by_cid(&cid)
        .await
        .unwrap()
        .iter()
        .filter(|st| st.state == TaskState::Succeeded && st.target.ends_with(".step"))
        .count();
    assert!(done < 4, "{done} steps succeeded");
    let chain_status = s.get(chain_id).await.unwrap().unwrap();
    assert_eq!(chain_status.error.unwrap().kind, FailureKind::Cancelled);
    f.finish(running).await;
}

#[tokio::test]
async fn without_a_store_a_listening_worker_stops_what_arrives_later() {
    let f = Fixture::new("cancel-nostore", false).await;
    let (_, running) = f.worker(Duration::from_secs(1)).await;
    let cid = unique("c");
    let delayed = f
        .client
        .enqueue(
            Task::new(f.target("work"), &json!({"key": "late"}))
                .with_cid(cid.clone())
                .delay(Duration::from_millis(800))
                .on_error(f.target("failed")),
        )
        .await
        .unwrap();
    let control = unique("ok");
    f.client
        .enqueue(
            Task::new(f.target("work"), &json!({"key": "control"}))
                .with_cid(control.clone())
                .delay(Duration::from_millis(800)),
        )
        .await
        .unwrap();
    let out = f.client.cancel(delayed.id).await.unwrap();
    assert!(!out.recorded, "no store");
    assert_eq!(out.found(), Found::Unknown, "nothing to look it up in");
    assert!(out.broadcast);
    let hooks = poll("the onerror hook", Duration::from_secs(20), || async {
        let h = f.hooks(&cid);
        (!h.is_empty()).then_some(h)
    })
    .await;
    assert_eq!(kind_of(&hooks[0].1), "cancelled");
    poll("the control task", Duration::from_secs(20), || async {
        (f.ran("work", &control) == 1).then_some(())
    })
    .await;
    assert_eq!(f.ran("work", &cid), 0);
    f.finish(running).await;
}

#[tokio::test]
async fn unknown_and_finished_ids_are_reported_and_keys_and_queues_go_away() {
    let f = Fixture::new("cancel-report", true).await;
    let (queue, running) = f.worker(Duration::from_secs(1)).await;
    // The worker's cancel queue exists while it runs.
    assert!(exists(&f.client, &queue).await);
    let unknown = uuid::Uuid::now_v7();
    let out = f.client.cancel(unknown).await.unwrap();
    assert_eq!(out.found(), Found::Unknown);
    assert_eq!(out.tasks, vec![(unknown, Found::Unknown)]);
    assert!(out.recorded);
    let out = f.client.cancel_cid(&unique("nobody")).await.unwrap();
    assert_eq!(out.found(), Found::Unknown);
    assert!(out.tasks.is_empty());
    // A finished task: reported finished; its result stands.
    let done = f
        .client
        .enqueue(Task::new(f.target("work"), &json!({"key": "x"})))
        .await
        .unwrap()
        .id;
    let st = f.store.clone().unwrap();
    poll("a finished status", Duration::from_secs(10), || {
        let st = st.clone();
        async move {
            st.get(done)
                .await
                .unwrap()
                .filter(|s| s.state == TaskState::Succeeded)
        }
    })
    .await;
    let out = f.client.cancel(done).await.unwrap();
    assert_eq!(out.found(), Found::Finished(TaskState::Succeeded));
    // Bad input is typed, and nothing is recorded.
    assert!(matches!(
        f.client.cancel_cid("").await,
        Err(ClientError::Broker(_))
    ));
    assert!(f.client.cancel_cid(&"c".repeat(256)).await.is_err());
    // Cancel keys expire with the retention (600 s here).
    let mut c = redis().await;
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("{}cancel:id:{unknown}", f.prefix))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((1..=600).contains(&ttl), "ttl {ttl}");
    // The cancel queue goes with the worker.
    running.stop.cancel();
    running.handle.await.unwrap().unwrap();
    poll(
        "the cancel queue to be gone",
        Duration::from_secs(10),
        || async { (!exists(&f.client, &queue).await).then_some(()) },
    )
    .await;
    f.client.close().await;
    drop_keys(&f.prefix).await;
    assert!(keys(&f.prefix).await.is_empty());
}

#[tokio::test]
async fn a_cancellation_made_before_a_worker_restart_still_holds_after_it() {
    let url = common::url();
    let svc = unique("cancel-restart");
    let _cleanup = Cleanup::new(&[&svc]);
    let prefix = format!("{svc}:");
    let ledger = common::ledger_path("cancel-restart");
    let hooks = ledger.with_extension("hooks");
    let env = [
        ("FIXTURE_STATUS_PREFIX", prefix.clone()),
        ("FIXTURE_HOOKS", hooks.display().to_string()),
    ];
    let worker =
        common::FixtureWorker::start_with(&url, &svc, QueueType::Quorum, &ledger, 4, &env).await;
    let client = Client::builder()
        .amqp(config(QueueType::Quorum))
        .status_store(store(&prefix))
        .connect()
        .await
        .unwrap();
    // Two tasks due in 3 s; one is cancelled while the first worker runs (it hears it).
    let cid = unique("c");
    let cancelled = client
        .enqueue(
            Task::new(format!("{svc}.work"), &json!({"key": "cancelled"}))
                .with_cid(cid.clone())
                .delay(Duration::from_secs(3))
                .on_error(format!("{svc}.failed")),
        )
        .await
        .unwrap();
    client
        .enqueue(
            Task::new(format!("{svc}.work"), &json!({"key": "control"}))
                .delay(Duration::from_secs(3)),
        )
        .await
        .unwrap();
    let out = client.cancel(cancelled.id).await.unwrap();
    assert!(out.recorded && out.broadcast);
    // The worker dies (its memory of the cancellation with it); a new process takes over.
    worker.kill9().await;
    let worker =
        common::FixtureWorker::start_with(&url, &svc, QueueType::Quorum, &ledger, 4, &env).await;
    common::wait_keys(&ledger, 1, Duration::from_secs(30)).await;
    let lines = poll("the onerror hook", Duration::from_secs(30), || async {
        let l = common::hook_lines(&hooks, &cid);
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].0, "failed");
    assert_eq!(kind_of(&lines[0].1), "cancelled");
    let keys_ran: Vec<String> = common::read_ledger(&ledger)
        .into_iter()
        .map(|(k, _, _)| k)
        .collect();
    assert_eq!(keys_ran, vec!["control".to_owned()]);
    assert!(worker.terminate().await);
    client.close().await;
    drop_keys(&prefix).await;
}

#[tokio::test]
async fn every_handler_of_a_cid_running_at_once_is_reached_by_one_broadcast() {
    let f = Fixture::new("cancel-many", false).await;
    let (_, running) = f.worker(Duration::from_secs(5)).await;
    let cid = unique("c");
    let answers = Arc::new(AtomicUsize::new(0));
    let mut calls = Vec::new();
    for _ in 0..6 {
        let client = f.client.clone();
        let task = Task::new(f.target("polite"), &Value::Null)
            .with_cid(cid.clone())
            .with_timeout(Duration::from_secs(60));
        let answers = answers.clone();
        calls.push(tokio::spawn(async move {
            let r = client.invoke::<Value>(task).await;
            if matches!(&r, Err(e) if e.failure_kind() == Some(FailureKind::Cancelled)) {
                answers.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    poll("six handlers to run", Duration::from_secs(20), || async {
        (f.ran("polite", &cid) == 6).then_some(())
    })
    .await;
    f.client.cancel_cid(&cid).await.unwrap();
    for c in calls {
        c.await.unwrap();
    }
    assert_eq!(answers.load(Ordering::SeqCst), 6);
    f.finish(running).await;
}

#[tokio::test]
async fn a_retry_waiting_in_the_delay_levels_is_stopped_when_it_arrives() {
    let f = Fixture::new("cancel-retry", true).await;
    let (_, running) = f.worker(Duration::from_secs(1)).await;
    let cid = unique("c");
    let r = f
        .client
        .enqueue(
            Task::new(f.target("fails"), &Value::Null)
                .with_cid(cid.clone())
                .with_retry(RetryPolicy::fixed(5, Duration::from_millis(1500)))
                .on_error(f.target("failed")),
        )
        .await
        .unwrap();
    // The first attempt failed; the retry waits in the delay levels.
    let s = f.store.clone().unwrap();
    poll("the retry to wait", Duration::from_secs(20), || {
        let s = s.clone();
        async move {
            s.get(r.id)
                .await
                .unwrap()
                .filter(|st| st.state == TaskState::Pending && st.attempts == 1)
        }
    })
    .await;
    let out = f.client.cancel(r.id).await.unwrap();
    assert_eq!(out.found(), Found::Pending);
    let hooks = poll("the onerror hook", Duration::from_secs(20), || async {
        let h = f.hooks(&cid);
        (!h.is_empty()).then_some(h)
    })
    .await;
    assert_eq!(kind_of(&hooks[0].1), "cancelled");
    let st = s.get(r.id).await.unwrap().unwrap();
    assert_eq!(st.error.unwrap().kind, FailureKind::Cancelled);
    assert_eq!(st.attempts, 2, "attempt 2 arrived and was stopped");
    assert_eq!(f.ran("fails", &cid), 1, "only the first attempt ran");
    f.finish(running).await;
}

/// The arrival check's cost with a store: one `MGET` per task (id, parent, chain, cid keys).
/// A measurement, not a check (timings depend on the machine): run it with
/// `cargo test -p warren --test it cancel::measure_the_arrival_check -- --ignored --nocapture`;
/// docs/cancellation.md quotes its output.
#[tokio::test]
#[ignore = "a measurement; run by hand"]
async fn measure_the_arrival_check() {
    let prefix = format!("{}:", unique("cancel-cost"));
    let s = store(&prefix);
    let ids = [
        uuid::Uuid::now_v7(),
        uuid::Uuid::now_v7(),
        uuid::Uuid::now_v7(),
    ];
    s.is_cancelled(&ids, "warm-up").await.unwrap();
    let mut took = Vec::new();
    for _ in 0..5000 {
        let t = std::time::Instant::now();
        assert!(!s.is_cancelled(&ids, "some-cid").await.unwrap());
        took.push(t.elapsed());
    }
    took.sort();
    let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
    println!(
        "arrival check (MGET of 4 keys), 5000 sequential: p50 {:?}, p99 {:?}, max {:?}",
        at(0.5),
        at(0.99),
        took[took.len() - 1]
    );
    drop_keys(&prefix).await;
}

#[tokio::test]
async fn cancelling_a_cid_stops_a_fan_in_whose_final_callback_reports_it_once() {
    let f = Fixture::new("cancel-fanin", true).await;
    let (_, running) = f.worker(Duration::from_secs(5)).await;
    let cid = unique("fan");
    let receipt = f
        .client
        .parallel(
            warren::Parallel::new()
                .target(f.target("polite"), &Value::Null)
                .target(f.target("polite"), &Value::Null)
                .target(f.target("polite"), &Value::Null)
                .on_final(f.target("failed"))
                .with_cid(cid.clone()),
        )
        .await
        .unwrap();
    poll("three targets to run", Duration::from_secs(20), || async {
        (f.ran("polite", &cid) == 3).then_some(())
    })
    .await;
    let out = f.client.cancel_cid(&cid).await.unwrap();
    assert_eq!(out.found(), Found::Running);
    let hooks = poll("the final callback", Duration::from_secs(30), || async {
        let h = f.hooks(&cid);
        (!h.is_empty()).then_some(h)
    })
    .await;
    let fan_in: warren::FanInOutcome = serde_json::from_value(hooks[0].1.clone()).unwrap();
    assert!(!fan_in.ok);
    assert_eq!(fan_in.outcomes.len(), 3);
    for o in &fan_in.outcomes {
        assert_eq!(
            o.error.as_ref().map(|e| e.kind),
            Some(FailureKind::Cancelled),
            "{o:?}"
        );
    }
    // Exactly once: the fan-in's part queue is removed by its join, and no second callback.
    let part_queue = warren::topology::fanout_queue(&receipt.job);
    poll(
        "the fan-in's part queue to be gone",
        Duration::from_secs(30),
        || async { (!exists(&f.client, &part_queue).await).then_some(()) },
    )
    .await;
    assert_eq!(f.hooks(&cid).len(), 1);
    f.finish(running).await;
}
