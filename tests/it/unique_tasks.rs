//! Unique tasks (`Task::unique`, docs/cancellation.md) against the real broker and Redis:
//! 50 concurrent enqueues with one key make one task and one receipt; after it ends the key's
//! entry is gone and the next enqueue queues a new task; bad keys, a missing store and
//! invoke are typed errors with nothing published.

use crate::cancel_common::{drop_keys, keys, redis, store};
use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{config, poll, run_in_background, unique, Cleanup};
use serde_json::{json, Value};
use warren::{
    Client, ClientError, Context, QueueType, Service, Task, TaskError, UniqueError, UniqueKeyError,
    Worker,
};

#[tokio::test]
async fn one_key_one_task_while_pending_then_a_new_one_after_it_ends() {
    let svc = unique("uniq");
    let _cleanup = Cleanup::new(&[&svc]);
    let prefix = format!("{svc}:");
    let client = Client::builder()
        .amqp(config(QueueType::Quorum))
        .status_store(store(&prefix))
        .connect()
        .await
        .unwrap();
    client.ensure_service(&svc).await.unwrap();
    // 50 concurrent enqueues with one key, before any worker runs: one task.
    let ttl = Duration::from_secs(60);
    let mut sends = Vec::new();
    for i in 0..50 {
        let client = client.clone();
        let task = Task::new(format!("{svc}.work"), &json!({"i": i})).unique("nightly", ttl);
        sends.push(tokio::spawn(async move { client.enqueue(task).await }));
    }
    let mut receipts = Vec::new();
    for s in sends {
        receipts.push(s.await.unwrap().unwrap());
    }
    let first = receipts[0].clone();
    assert!(receipts.iter().all(|r| *r == first), "one receipt for all");
    let stats = common::service_stats(client.broker(), &svc).await;
    assert_eq!(stats.ready, 1, "one task queued");
    let entry = format!("{prefix}unique:{svc}.work:nightly");
    assert_eq!(keys(&format!("{prefix}unique:")).await, vec![entry.clone()]);
    let mut c = redis().await;
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&entry)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((1..=60_000).contains(&pttl), "pttl {pttl}");

    // The worker runs it once and removes the entry.
    let ran: Arc<Mutex<Vec<Value>>> = Arc::default();
    let r = ran.clone();
    let worker = Worker::builder()
        .amqp(config(QueueType::Quorum))
        .status_store(store(&prefix))
        .service(
            Service::new(&svc).method("work", move |_: Context, p: Value| {
                let ran = r.clone();
                async move {
                    ran.lock().unwrap().push(p);
                    Ok::<_, TaskError>(())
                }
            }),
        )
        .build()
        .await
        .unwrap();
    let running = run_in_background(worker);
    poll("the key's entry to go", Duration::from_secs(20), || async {
        keys(&format!("{prefix}unique:"))
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    assert_eq!(ran.lock().unwrap().len(), 1);

    // Now the key is free: a new task with a new id runs.
    let again = client
        .enqueue(Task::new(format!("{svc}.work"), &json!({"i": "again"})).unique("nightly", ttl))
        .await
        .unwrap();
    assert_ne!(again.id, first.id);
    poll(
        "the second task to run",
        Duration::from_secs(20),
        || async { (ran.lock().unwrap().len() == 2).then_some(()) },
    )
    .await;
    poll(
        "the key's entry to go again",
        Duration::from_secs(20),
        || async {
            keys(&format!("{prefix}unique:"))
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;
    running.stop.cancel();
    running.handle.await.unwrap().unwrap();
    client.close().await;
    drop_keys(&prefix).await;
}

#[tokio::test]
async fn bad_unique_tasks_are_typed_errors_and_nothing_is_published() {
    let svc = unique("uniq-bad");
    let _cleanup = Cleanup::new(&[&svc]);
    let prefix = format!("{svc}:");
    let with_store = Client::builder()
        .amqp(config(QueueType::Quorum))
        .status_store(store(&prefix))
        .connect()
        .await
        .unwrap();
    let without = Client::builder()
        .amqp(config(QueueType::Quorum))
        .connect()
        .await
        .unwrap();
    with_store.ensure_service(&svc).await.unwrap();
    let t = || Task::new(format!("{svc}.work"), &1);
    let hour = Duration::from_secs(3600);
    assert!(matches!(
        with_store.enqueue(t().unique("", hour)).await,
        Err(ClientError::Unique(UniqueError::Key(UniqueKeyError::Empty)))
    ));
    assert!(matches!(
        with_store.enqueue(t().unique("k".repeat(256), hour)).await,
        Err(ClientError::Unique(UniqueError::Key(
            UniqueKeyError::TooLong(256)
        )))
    ));
    assert!(matches!(
        with_store.enqueue(t().unique("k", Duration::ZERO)).await,
        Err(ClientError::Unique(UniqueError::ZeroTtl))
    ));
    assert!(matches!(
        without.enqueue(t().unique("k", hour)).await,
        Err(ClientError::Unique(UniqueError::NoStore))
    ));
    assert!(matches!(
        with_store.invoke::<Value>(t().unique("k", hour)).await,
        Err(ClientError::Unique(UniqueError::Invoke))
    ));
    let stats = common::service_stats(with_store.broker(), &svc).await;
    assert_eq!(stats.ready, 0, "nothing was published");
    assert!(keys(&prefix).await.is_empty(), "nothing was claimed");
    with_store.close().await;
    without.close().await;
}
