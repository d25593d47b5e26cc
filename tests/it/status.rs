//! Task status and results in Redis: read from a separate process after the worker and the
//! caller exited, expired after the retention, notification through a topic, and what
//! happens without a store or with Redis down.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{config, poll, run_in_background, unique, Cleanup};
use warren::RedisStore;
use warren::{
    Client, ClientError, Context, QueueType, RetryPolicy, Service, StatusStore, Task, TaskError,
    TaskState, TaskStatus, Worker,
};

fn store(prefix: &str, retention: Duration) -> Arc<dyn StatusStore> {
    Arc::new(
        RedisStore::new(&redis_url(), retention)
            .unwrap()
            .with_prefix(prefix.to_owned())
            .with_timeout(Duration::from_millis(500)),
    )
}

fn redis_url() -> String {
    std::env::var("WARREN_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

fn service(svc: &str) -> Service {
    Service::new(svc)
        .retry(RetryPolicy::none())
        .method("double", |_: Context, x: i64| async move {
            if x < 0 {
                return Err(TaskError::reject("negative"));
            }
            Ok::<_, TaskError>(x * 2)
        })
}

async fn worker(svc: &str, store: Option<Arc<dyn StatusStore>>) -> common::Running {
    let mut b = Worker::builder()
        .amqp(config(QueueType::Quorum))
        .service(service(svc));
    if let Some(s) = store {
        b = b.status_store(s);
    }
    run_in_background(b.build().await.unwrap())
}

async fn client(store: Option<Arc<dyn StatusStore>>) -> Client {
    let mut b = Client::builder().amqp(config(QueueType::Quorum));
    if let Some(s) = store {
        b = b.status_store(s);
    }
    b.connect().await.unwrap()
}

#[tokio::test]
async fn statuses_outlive_the_worker_and_the_caller() {
    let svc = unique("status");
    let _cleanup = Cleanup::new(&[&svc]);
    let prefix = format!("{}:", unique("st"));
    let st = store(&prefix, Duration::from_secs(600));
    let running = worker(&svc, Some(st.clone())).await;
    let c = client(Some(st.clone())).await;
    let cid = unique("cid");
    let ok = c
        .enqueue(Task::new(format!("{svc}.double"), &21).with_cid(cid.clone()))
        .await
        .unwrap();
    let bad = c
        .enqueue(Task::new(format!("{svc}.double"), &-1).with_cid(cid.clone()))
        .await
        .unwrap();
    poll("both tasks finished", Duration::from_secs(30), || async {
        let s = c.statuses(&cid).await.ok()?;
        (s.len() == 2
            && s.iter()
                .all(|t| t.state != TaskState::Pending && t.state != TaskState::Running))
        .then_some(())
    })
    .await;
    running.stop.cancel();
    running.handle.await.unwrap().unwrap();
    c.close().await;
    // A separate process, sharing nothing with those two but the store.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_warren-fixture-worker"))
        .env("FIXTURE_STATUS_OF", &cid)
        .env("FIXTURE_STATUS_PREFIX", &prefix)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let statuses: Vec<TaskStatus> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(statuses.len(), 2);
    let by_id = |id| statuses.iter().find(|s| s.id == id).unwrap();
    let s = by_id(ok.id);
    assert_eq!(s.state, TaskState::Succeeded);
    assert_eq!(s.result, Some(serde_json::json!(42)));
    assert_eq!(s.attempts, 1);
    assert_eq!(s.target, format!("{svc}.double"));
    assert!(s.updated_ms >= s.created_ms && s.created_ms > 0);
    let s = by_id(bad.id);
    assert_eq!(s.state, TaskState::Failed);
    assert_eq!(s.error.as_ref().unwrap().message, "negative");
}

#[tokio::test]
async fn statuses_expire_after_the_retention() {
    let svc = unique("status-ttl");
    let _cleanup = Cleanup::new(&[&svc]);
    let prefix = format!("{}:", unique("st"));
    let st = store(&prefix, Duration::from_secs(2));
    let running = worker(&svc, Some(st.clone())).await;
    let c = client(Some(st)).await;
    let cid = unique("cid");
    let task = Task::new(format!("{svc}.double"), &5).with_cid(cid.clone());
    let v: i64 = c.invoke(task).await.unwrap();
    assert_eq!(v, 10);
    let s = poll("the final status", Duration::from_secs(10), || async {
        c.statuses(&cid)
            .await
            .ok()?
            .into_iter()
            .find(|s| s.state == TaskState::Succeeded)
    })
    .await;
    assert_eq!(s.result, Some(serde_json::json!(10)));
    // Retention 2 s: the status and the cid index expire by themselves.
    poll("the status to expire", Duration::from_secs(10), || async {
        let gone = c.status(s.id).await.ok()?.is_none();
        let index_gone = c.statuses(&cid).await.ok()?.is_empty();
        (gone && index_gone).then_some(())
    })
    .await;
    running.stop.cancel();
    running.handle.await.unwrap().unwrap();
    c.close().await;
}

#[tokio::test]
async fn without_a_store_status_calls_say_so_and_with_redis_down_tasks_go_on() {
    let svc = unique("status-down");
    let _cleanup = Cleanup::new(&[&svc]);
    // Nothing listens on port 1: Redis is "down" for this worker and client.
    let down: Arc<dyn StatusStore> = Arc::new(
        RedisStore::new("redis://127.0.0.1:1/", Duration::from_secs(60))
            .unwrap()
            .with_timeout(Duration::from_millis(300)),
    );
    let running = worker(&svc, Some(down.clone())).await;
    let c = client(Some(down)).await;
    for i in 0..20 {
        let v: i64 = c
            .invoke(Task::new(format!("{svc}.double"), &i))
            .await
            .unwrap();
        assert_eq!(v, i * 2, "tasks run while the store is down");
    }
    let r = c
        .enqueue(Task::new(format!("{svc}.double"), &1))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let e = c.status(r.id).await.unwrap_err();
    assert!(matches!(e, ClientError::Store(_)), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a clear error, not a hang"
    );
    running.stop.cancel();
    running.handle.await.unwrap().unwrap();
    c.close().await;
    let plain = client(None).await;
    let e = plain.status(r.id).await.unwrap_err();
    assert!(matches!(e, ClientError::NoStatusStore), "{e}");
    assert!(e.to_string().contains("no status store"));
    plain.close().await;
}

#[tokio::test]
async fn a_task_can_notify_a_topic_of_its_end() {
    let svc = unique("status-note");
    let listener = unique("status-listen");
    let topic = unique("done-topic");
    let _cleanup = Cleanup::new(&[&svc, &listener]);
    let heard: Arc<Mutex<Vec<TaskStatus>>> = Arc::default();
    let h = heard.clone();
    let listen = Service::new(&listener)
        .method("heard", move |_: Context, s: TaskStatus| {
            let h = h.clone();
            async move {
                h.lock().unwrap().push(s);
                Ok::<_, TaskError>(())
            }
        })
        .subscribe(&topic, "heard");
    let w = Worker::builder()
        .amqp(config(QueueType::Quorum))
        .service(service(&svc))
        .service(listen)
        .build()
        .await
        .unwrap();
    let running = run_in_background(w);
    let c = client(None).await;
    let r = c
        .enqueue(Task::new(format!("{svc}.double"), &4).notify(topic.clone()))
        .await
        .unwrap();
    let got = poll("the notification", Duration::from_secs(30), || async {
        heard.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(got.id, r.id);
    assert_eq!(got.state, TaskState::Succeeded);
    assert_eq!(got.result, Some(serde_json::json!(8)));
    running.stop.cancel();
    running.handle.await.unwrap().unwrap();
    for q in [
        warren_core::topology::subscription_queue(&topic, &listener, "heard"),
        warren_core::topology::recent_queue(&topic),
    ] {
        let _ = c.broker().delete_queue(&q).await;
    }
    c.close().await;
}
