//! The core paths against the real broker, on both queue types: enqueue exactly once over
//! 10k tasks, typed invoke, typed errors, deadlines, retries, name validation.

use crate::common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{config, poll, unique, Cleanup};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warren::{
    Client, ClientError, Context, FailureKind, QueueType, RetryPolicy, Service, Task, TaskError,
    Worker,
};

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Sum {
    a: i64,
    b: i64,
}

type Seen = Arc<Mutex<HashMap<u64, u32>>>;

async fn add(_: Context, s: Sum) -> Result<i64, TaskError> {
    s.a.checked_add(s.b)
        .ok_or_else(|| TaskError::reject("overflow"))
}

async fn fails(_: Context, msg: String) -> Result<(), TaskError> {
    Err(TaskError::fail(msg))
}

async fn slow(_: Context, ms: u64) -> Result<u64, TaskError> {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(ms)
}

fn service(svc: &str, seen: Seen) -> Service {
    let flaky_attempts: Arc<Mutex<Vec<u32>>> = Arc::default();
    Service::new(svc)
        .method("add", add)
        .method("fails", fails)
        .method("slow", slow)
        .method("record", move |_: Context, n: u64| {
            let seen = seen.clone();
            async move {
                *seen.lock().unwrap().entry(n).or_default() += 1;
                Ok::<_, TaskError>(())
            }
        })
        .method("flaky", move |ctx: Context, until: u32| {
            let attempts = flaky_attempts.clone();
            async move {
                attempts.lock().unwrap().push(ctx.attempt());
                if ctx.attempt() < until {
                    Err(TaskError::retry_after(
                        Duration::from_millis(100),
                        "not yet",
                    ))
                } else {
                    Ok(ctx.attempt())
                }
            }
        })
        .retry(RetryPolicy::fixed(4, Duration::ZERO))
}

struct Running {
    stop: CancellationToken,
    handle: JoinHandle<Result<(), warren::WorkerError>>,
    client: Client,
}

async fn start(svc: &str, qt: QueueType, seen: Seen) -> Running {
    let worker = Worker::builder()
        .amqp(config(qt))
        .service(service(svc, seen))
        .concurrency(64)
        .build()
        .await
        .expect("worker starts");
    let client = Client::builder()
        .amqp(config(qt))
        .invoke_timeout(Duration::from_secs(20))
        .connect()
        .await
        .expect("client connects");
    let common::Running { stop, handle } = common::run_in_background(worker);
    Running {
        stop,
        handle,
        client,
    }
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        self.handle
            .await
            .expect("worker task")
            .expect("worker ran cleanly");
        self.client.close().await;
    }
}

async fn enqueue_10k_exactly_once(qt: QueueType) {
    let svc = unique("10k");
    let _cleanup = Cleanup::new(&[&svc]);
    let seen: Seen = Arc::default();
    let run = start(&svc, qt, seen.clone()).await;
    const N: u64 = 10_000;
    let mut senders = tokio::task::JoinSet::new();
    for lane in 0..32u64 {
        let (client, target) = (run.client.clone(), format!("{svc}.record"));
        senders.spawn(async move {
            let mut ids = Vec::new();
            for n in (lane..N).step_by(32) {
                ids.push(
                    client
                        .enqueue(Task::new(&target, &n))
                        .await
                        .expect("enqueue")
                        .id,
                );
            }
            ids
        });
    }
    let mut ids = std::collections::HashSet::new();
    while let Some(r) = senders.join_next().await {
        ids.extend(r.expect("sender"));
    }
    assert_eq!(ids.len(), N as usize, "every enqueue got its own task id");
    poll("all 10k tasks handled", Duration::from_secs(120), || {
        let seen = seen.clone();
        async move { (seen.lock().unwrap().len() as u64 == N).then_some(()) }
    })
    .await;
    let broker = run.client.broker().clone();
    let q = format!("warren.svc.{svc}");
    poll("service queue drained", Duration::from_secs(30), || {
        let (broker, q) = (broker.clone(), q.clone());
        async move { (broker.queue_stats(&q).await.ok()??.ready == 0).then_some(()) }
    })
    .await;
    run.stop().await;
    let seen = seen.lock().unwrap();
    assert!(
        (0..N).all(|n| seen.get(&n) == Some(&1)),
        "each task ran exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_10k_exactly_once_quorum() {
    enqueue_10k_exactly_once(QueueType::Quorum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_10k_exactly_once_classic() {
    enqueue_10k_exactly_once(QueueType::Classic).await;
}

async fn invoke_results_errors_deadlines(qt: QueueType) {
    let svc = unique("invoke");
    let _cleanup = Cleanup::new(&[&svc]);
    let run = start(&svc, qt, Arc::default()).await;
    let c = &run.client;

    let sum: i64 = c
        .invoke(Task::new(format!("{svc}.add"), &Sum { a: 40, b: 2 }))
        .await
        .unwrap();
    assert_eq!(sum, 42);

    // A caller-supplied cid comes back in errors; a rejection is typed and not retried.
    let err = c
        .invoke::<i64>(
            Task::new(format!("{svc}.add"), &Sum { a: i64::MAX, b: 1 }).with_cid("my-cid"),
        )
        .await
        .unwrap_err();
    match &err {
        ClientError::Failed { cid, failure, .. } => {
            assert_eq!(cid, "my-cid");
            assert_eq!(failure.kind, FailureKind::Rejected);
            assert_eq!(failure.message, "overflow");
        }
        other => panic!("expected a typed failure, got {other:?}"),
    }

    // A failing handler is retried (policy: 4 attempts, no delay) then reported.
    let err = c
        .invoke::<()>(Task::new(format!("{svc}.fails"), &"disk full"))
        .await
        .unwrap_err();
    assert_eq!(err.failure_kind(), Some(FailureKind::Handler));
    assert!(err.to_string().contains("disk full"), "{err}");
    assert!(err.to_string().contains("after 4 attempts"), "{err}");

    // Payload that does not fit the handler's type.
    let err = c
        .invoke::<i64>(Task::new(format!("{svc}.add"), &"not a sum"))
        .await
        .unwrap_err();
    assert_eq!(err.failure_kind(), Some(FailureKind::BadPayload));

    // Unknown method on a hosted service.
    let err = c
        .invoke::<i64>(Task::new(format!("{svc}.nope"), &1))
        .await
        .unwrap_err();
    assert_eq!(err.failure_kind(), Some(FailureKind::UnknownTarget));

    // A reply of the wrong type is a decode error, not a panic.
    let err = c
        .invoke::<String>(Task::new(format!("{svc}.add"), &Sum { a: 1, b: 1 }))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Decode { .. }), "{err:?}");

    // The deadline expires cleanly, and the client still works afterwards.
    let started = std::time::Instant::now();
    let err = c
        .invoke::<u64>(
            Task::new(format!("{svc}.slow"), &3_000u64).with_timeout(Duration::from_millis(300)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    let v: u64 = c
        .invoke(Task::new(format!("{svc}.slow"), &1u64))
        .await
        .unwrap();
    assert_eq!(v, 1);

    // retry_after: attempts 1 and 2 ask for a 100 ms delay, attempt 3 succeeds.
    let attempt: u32 = c
        .invoke(Task::new(format!("{svc}.flaky"), &3u32))
        .await
        .unwrap();
    assert_eq!(attempt, 3);

    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoke_quorum() {
    invoke_results_errors_deadlines(QueueType::Quorum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoke_classic() {
    invoke_results_errors_deadlines(QueueType::Classic).await;
}

#[tokio::test]
async fn names_are_checked_before_anything_is_sent() {
    let client = Client::builder()
        .amqp(config(QueueType::Quorum))
        .connect()
        .await
        .unwrap();
    for bad in [
        "Images.resize",
        "images",
        "images.",
        ".resize",
        "im ages.resize",
        "imagés.resize",
    ] {
        let err = client.enqueue(Task::new(bad, &1)).await.unwrap_err();
        assert!(matches!(err, ClientError::Name(_)), "{bad}: {err:?}");
    }
    let long_svc = "s".repeat(250);
    let err = client
        .enqueue(Task::new(format!("{long_svc}.m"), &1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("255"), "{err}");
    let long_method = "m".repeat(300);
    assert!(client
        .enqueue(Task::new(format!("svc.{long_method}"), &1))
        .await
        .is_err());
    let err = client
        .enqueue(Task::new("svc.m", &1).with_cid("c".repeat(256)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cid"), "{err}");
    assert!(!Service::new("x".repeat(256)).errors().is_empty());
    assert!(!Service::new("ok").method("Bad", add).errors().is_empty());
    client.close().await;
}

#[tokio::test]
async fn queue_type_mismatch_is_a_clear_error() {
    let svc = unique("mismatch");
    let _cleanup = Cleanup::new(&[&svc]);
    let q = Client::builder()
        .amqp(config(QueueType::Quorum))
        .connect()
        .await
        .unwrap();
    q.ensure_service(&svc).await.unwrap();
    let c = Client::builder()
        .amqp(config(QueueType::Classic))
        .connect()
        .await
        .unwrap();
    let err = c.ensure_service(&svc).await.unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
    q.close().await;
    c.close().await;
}

#[tokio::test]
async fn fails_over_to_the_next_url_and_never_shows_the_password() {
    // Port 1 refuses connections; the second URL is the real broker.
    let urls = format!("amqp://guest:guest@127.0.0.1:1/%2f,{}", common::url());
    let cfg = warren::AmqpConfig::new(&urls)
        .unwrap()
        .with_queue_type(QueueType::Classic);
    let client = Client::builder().amqp(cfg).connect().await.unwrap();
    let svc = unique("failover");
    let _cleanup = Cleanup::new(&[&svc]);
    client.ensure_service(&svc).await.unwrap();
    let shown = format!("{client:?}");
    assert!(
        shown.contains("127.0.0.1:1") && !shown.contains("guest:guest"),
        "{shown}"
    );
    client.close().await;

    // Nothing answers at all: a clear error after the reconnect policy gives up.
    let cfg = warren::AmqpConfig::new("amqp://guest:secret@127.0.0.1:1/%2f")
        .unwrap()
        .with_reconnect(warren::ReconnectPolicy {
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(100),
            give_up_after: Some(Duration::from_millis(500)),
        });
    let err = Client::builder().amqp(cfg).connect().await.unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(text.contains("could not connect"), "{text}");
    assert!(!text.contains("secret"), "{text}");
}
