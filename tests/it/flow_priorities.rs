//! Priorities (docs/flow.md#priorities), flow limits without a store (per worker), and the
//! typed errors of flow control's bad input: nothing is published or declared.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{config, poll, run_in_background, unique, Cleanup};
use warren::{
    Client, ClientError, Context, QueueType, Service, Task, TaskError, Worker, WorkerError,
};
use warren_core::flow::KeyError;

type Seen = Arc<Mutex<Vec<(u8, u32)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priorities_run_first_from_a_backlog() {
    const N: u32 = 1_000;
    let svc = unique("prio");
    let _cleanup = Cleanup::new(&[&svc]);
    // The client declares the queue first (the backlog waits for the worker), so it needs
    // the service's range in its config.
    let client = Client::builder()
        .amqp(config(QueueType::Classic).with_priorities(&svc, 9).unwrap())
        .connect()
        .await
        .unwrap();
    for i in 0..N {
        let p = u8::try_from((i * 7) % 10).unwrap();
        client
            .enqueue(Task::new(format!("{svc}.run"), &serde_json::json!([p, i])).priority(p))
            .await
            .unwrap();
    }
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let service = Service::new(&svc)
        .method("run", move |_: Context, (p, i): (u8, u32)| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push((p, i));
                Ok::<_, TaskError>(())
            }
        })
        .priorities(9);
    // The worker learns the range from its service alone.
    let worker = Worker::builder()
        .amqp(config(QueueType::Classic))
        .service(service)
        .concurrency(1)
        .prefetch(1)
        .build()
        .await
        .unwrap();
    let running = run_in_background(worker);
    poll("every task to run", Duration::from_secs(60), || async {
        (seen.lock().unwrap().len() >= N as usize).then_some(())
    })
    .await;
    let order = seen.lock().unwrap().clone();
    assert_eq!(order.len(), N as usize, "each task ran once");
    // Highest priority first; first in, first out within one priority.
    let mut expected = order.clone();
    expected.sort_by_key(|(p, i)| (std::cmp::Reverse(*p), *i));
    let misplaced = order.iter().zip(&expected).filter(|(a, b)| a != b).count();
    assert_eq!(misplaced, 0, "run order {:?}", &order[..20]);
    running.stop.cancel();
    running.handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_on_quorum_queues_are_refused_before_anything_is_declared() {
    let svc = unique("prioq");
    let _cleanup = Cleanup::new(&[&svc]);
    let service = Service::new(&svc)
        .method("run", |_: Context, _: ()| async { Ok::<_, TaskError>(()) })
        .priorities(5);
    let built = Worker::builder()
        .amqp(config(QueueType::Quorum))
        .service(service)
        .build()
        .await;
    assert!(
        matches!(
            built,
            Err(WorkerError::Broker(warren_core::Error::PrioritiesNeedClassic { svc: ref s })) if *s == svc
        ),
        "{built:?}"
    );
    let client = Client::builder()
        .amqp(config(QueueType::Quorum).with_priorities(&svc, 5).unwrap())
        .connect()
        .await
        .unwrap();
    let sent = client.enqueue(Task::new(format!("{svc}.run"), &())).await;
    assert!(
        matches!(
            sent,
            Err(ClientError::Broker(
                warren_core::Error::PrioritiesNeedClassic { .. }
            ))
        ),
        "{sent:?}"
    );
    let q = client
        .broker()
        .queue_stats(&format!("warren.svc.{svc}"))
        .await
        .unwrap();
    assert!(q.is_none(), "the service queue was declared: {q:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flow_input_is_a_typed_error_and_nothing_is_sent() {
    let svc = unique("flowbad");
    let _cleanup = Cleanup::new(&[&svc]);
    let client = Client::builder()
        .amqp(config(QueueType::Classic).with_priorities(&svc, 3).unwrap())
        .connect()
        .await
        .unwrap();
    let task = || Task::new(format!("{svc}.run"), &());
    match client.enqueue(task().priority(4)).await {
        Err(ClientError::PriorityOutOfRange(e)) => assert_eq!((e.priority, e.max), (4, 3)),
        other => panic!("{other:?}"),
    }
    // A service without a range takes no priority above 0.
    let other = unique("flowbad-none");
    match client
        .enqueue(Task::new(format!("{other}.run"), &()).priority(1))
        .await
    {
        Err(ClientError::PriorityOutOfRange(e)) => assert_eq!(e.max, 0),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        client.enqueue(task().key("")).await,
        Err(ClientError::Key(KeyError::Empty))
    ));
    assert!(matches!(
        client.invoke::<()>(task().key("k".repeat(256))).await,
        Err(ClientError::Key(KeyError::TooLong(256)))
    ));
    for s in [&svc, &other] {
        let q = client
            .broker()
            .queue_stats(&format!("warren.svc.{s}"))
            .await
            .unwrap();
        assert!(q.is_none(), "a queue was declared for {s}");
    }
    // The worker side: every bad setting is reported by build, typed, before connecting.
    let service = Service::new(&svc)
        .method("run", |_: Context, _: ()| async { Ok::<_, TaskError>(()) })
        .rate_limit("run", 0, Duration::from_secs(1))
        .rate_limit("run", 10, Duration::ZERO)
        .key_concurrency("run", 0)
        .key_concurrency("nope", 1)
        .priorities(0);
    match Worker::builder().service(service).build().await {
        Err(WorkerError::Registration(errors)) => {
            assert_eq!(errors.len(), 5, "{errors:?}");
            assert!(matches!(errors[0], WorkerError::InvalidRate { .. }));
            assert!(matches!(errors[1], WorkerError::InvalidRate { .. }));
            assert!(matches!(errors[2], WorkerError::ZeroKeyConcurrency(_)));
            assert!(matches!(errors[3], WorkerError::ZeroPriorities(_)));
            assert!(matches!(errors[4], WorkerError::UnknownFlowMethod(_)));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_store_limits_hold_per_worker() {
    let svc = unique("flowlocal");
    let _cleanup = Cleanup::new(&[&svc]);
    let starts: Arc<Mutex<Vec<(String, std::time::Instant, std::time::Instant)>>> = Arc::default();
    let (s1, s2) = (starts.clone(), starts.clone());
    let service = Service::new(&svc)
        .method("tick", move |_: Context, n: u32| {
            let s = s1.clone();
            async move {
                let now = std::time::Instant::now();
                s.lock().unwrap().push((format!("tick{n}"), now, now));
                Ok::<_, TaskError>(())
            }
        })
        .method("keyed", move |_: Context, key: String| {
            let s = s2.clone();
            async move {
                let start = std::time::Instant::now();
                tokio::time::sleep(Duration::from_millis(30)).await;
                s.lock()
                    .unwrap()
                    .push((key, start, std::time::Instant::now()));
                Ok::<_, TaskError>(())
            }
        })
        .rate_limit("tick", 20, Duration::from_secs(1))
        .key_concurrency("keyed", 1);
    // Deferrals are counted (the recorder must be in place before the worker is built).
    let recorder = crate::metrics::recorder();
    let worker = Worker::builder()
        .amqp(config(QueueType::Classic))
        .service(service)
        .concurrency(16)
        .build()
        .await
        .unwrap();
    let running = run_in_background(worker);
    let client = Client::builder()
        .amqp(config(QueueType::Classic))
        .connect()
        .await
        .unwrap();
    for n in 0..40u32 {
        client
            .enqueue(Task::new(format!("{svc}.tick"), &n))
            .await
            .unwrap();
    }
    for n in 0..15u32 {
        let key = format!("key{}", n % 3);
        client
            .enqueue(Task::new(format!("{svc}.keyed"), &key).key(key.clone()))
            .await
            .unwrap();
    }
    poll("every task to run", Duration::from_secs(30), || async {
        (starts.lock().unwrap().len() >= 55).then_some(())
    })
    .await;
    let runs = starts.lock().unwrap().clone();
    assert_eq!(runs.len(), 55, "each task ran once");
    let mut ticks: Vec<_> = runs
        .iter()
        .filter(|r| r.0.starts_with("tick"))
        .map(|r| r.1)
        .collect();
    ticks.sort();
    let max = (0..ticks.len())
        .map(|i| {
            ticks[i..]
                .iter()
                .take_while(|t| **t < ticks[i] + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap();
    assert!(max <= 22, "{max} ticks in one second at 20/s");
    for k in 0..3 {
        let mut rs: Vec<_> = runs.iter().filter(|r| r.0 == format!("key{k}")).collect();
        assert_eq!(rs.len(), 5);
        rs.sort_by_key(|r| r.1);
        assert!(
            rs.windows(2).all(|w| w[0].2 <= w[1].1),
            "runs of key{k} overlap"
        );
    }
    // Deferrals show in `warren_tasks_deferred_total`, and none is a failure.
    let samples = crate::metrics::parse(&recorder.render());
    let deferred = |method: &str, reason: &str| {
        crate::metrics::value(
            &samples,
            warren::metrics::TASKS_DEFERRED,
            &[("service", &svc), ("method", method), ("reason", reason)],
        )
    };
    assert!(deferred("tick", "rate") > 0.0, "no rate deferral counted");
    assert!(
        deferred("keyed", "key") > 0.0,
        "no busy-key deferral counted"
    );
    let failed = crate::metrics::value(
        &samples,
        warren::metrics::TASKS_FAILED,
        &[("service", &svc)],
    );
    assert!(failed == 0.0, "{failed} failures");
    running.stop.cancel();
    running.handle.await.unwrap().unwrap();
}

/// A chain step deferred by a rate limit is not taken for a duplicate when it comes back
/// (with a status store, chain steps are claimed once per attempt: the claim is made only
/// once the step is admitted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_chain_steps_all_run() {
    let svc = unique("flowchain");
    let _cleanup = Cleanup::new(&[&svc]);
    // Statuses and step claims under the test's own prefix, kept a minute only.
    let redis_url =
        std::env::var("WARREN_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned());
    let store: Arc<dyn warren::StatusStore> = Arc::new(
        warren::RedisStore::new(&redis_url, Duration::from_secs(60))
            .unwrap()
            .with_prefix(format!("{svc}:")),
    );
    let ran = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let r = ran.clone();
    let service = Service::new(&svc)
        .method("step", move |_: Context, bog: serde_json::Value| {
            r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let n = bog["n"].as_u64().unwrap_or(0);
            async move { Ok::<_, TaskError>(serde_json::json!({"n": n + 1})) }
        })
        // One start every 400 ms: the steps after the first wait on the broker.
        .rate_limit("step", 5, Duration::from_secs(2));
    let worker = Worker::builder()
        .amqp(config(QueueType::Classic))
        .status_store(store.clone())
        .service(service)
        .build()
        .await
        .unwrap();
    let running = run_in_background(worker);
    let client = Client::builder()
        .amqp(config(QueueType::Classic))
        .status_store(store)
        .connect()
        .await
        .unwrap();
    let step = format!("{svc}.step");
    let chain = warren::Chain::new()
        .step(step.clone())
        .step(step.clone())
        .step(step.clone())
        .step(step.clone())
        .input("n", &0);
    let handle = client.enqueue_chain(chain).await.unwrap();
    let result = handle.wait_for(Duration::from_secs(30)).await.unwrap();
    assert_eq!(result.bog()["n"], serde_json::json!(4));
    assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 4);
    running.stop.cancel();
    running.handle.await.unwrap().unwrap();
}
