//! Cancellation (docs/cancellation.md) against the real broker and Redis: a queued, delayed or
//! retrying task never runs, a running handler is cancelled (and dropped after the grace), a
//! cancellation holds across a worker restart (real processes), without a store a listening
//! worker still stops what arrives, unknown ids are reported, and every key and queue goes
//! away. Split jobs, chains and fan-ins: `cancel_jobs`.

use crate::cancel_common::{drop_keys, exists, keys, kind_of, redis, store, Fixture};
use crate::common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{config, poll, unique, Cleanup};
use serde_json::{json, Value};
use warren::{Client, ClientError, FailureKind, Found, QueueType, RetryPolicy, Task, TaskState};

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
