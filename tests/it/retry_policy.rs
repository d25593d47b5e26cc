//! Retry policies against the real broker: the precedence task > method > service > worker,
//! and delay queues without head-of-line blocking (a long delay enqueued first does not
//! hold back a short one).

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{config, poll, run_in_background, unique, Cleanup};
use warren::{
    Client, ClientError, Context, FailureKind, QueueType, RetryPolicy, Service, Task, TaskError,
    Worker,
};

/// (key, attempt, when) of every run.
type Runs = Arc<Mutex<Vec<(String, u32, Instant)>>>;

/// A method that records each run and fails while `attempt < fail_until`.
fn recording(
    runs: &Runs,
) -> impl Fn(Context, (String, u32)) -> futures_util::future::Ready<Result<String, TaskError>>
       + Send
       + Sync
       + 'static {
    let runs = runs.clone();
    move |ctx: Context, (key, fail_until): (String, u32)| {
        runs.lock()
            .unwrap()
            .push((key.clone(), ctx.attempt(), Instant::now()));
        futures_util::future::ready(if ctx.attempt() < fail_until {
            Err(TaskError::fail(format!("{key} fails")))
        } else {
            Ok(key)
        })
    }
}

fn count(runs: &Runs, key: &str) -> usize {
    runs.lock().unwrap().iter().filter(|r| r.0 == key).count()
}

#[tokio::test]
async fn precedence_is_task_then_method_then_service_then_worker() {
    let (with_policy, without) = (unique("rp-a"), unique("rp-b"));
    let _cleanup = Cleanup::new(&[&with_policy, &without]);
    let runs: Runs = Arc::default();
    let a = Service::new(&with_policy)
        .method("plain", recording(&runs))
        .method("special", recording(&runs))
        .retry(RetryPolicy::fixed(3, Duration::ZERO))
        .retry_method("special", RetryPolicy::fixed(4, Duration::ZERO));
    let b = Service::new(&without).method("plain", recording(&runs));
    let worker = Worker::builder()
        .amqp(config(QueueType::Quorum))
        .service(a)
        .service(b)
        .retry(RetryPolicy::fixed(2, Duration::ZERO))
        .build()
        .await
        .unwrap();
    let running = run_in_background(worker);
    let client = Client::builder()
        .amqp(config(QueueType::Quorum))
        .connect()
        .await
        .unwrap();
    let cases = [
        (format!("{with_policy}.plain"), None, 3, "service"),
        (format!("{with_policy}.special"), None, 4, "method"),
        (
            format!("{with_policy}.special"),
            Some(RetryPolicy::fixed(2, Duration::ZERO)),
            2,
            "task",
        ),
        (format!("{without}.plain"), None, 2, "worker"),
    ];
    for (target, task_policy, attempts, level) in cases {
        let key = format!("{level}-key");
        let mut task = Task::new(&target, &(key.clone(), 99u32));
        if let Some(p) = task_policy {
            task = task.with_retry(p);
        }
        let e = client.invoke::<String>(task).await.unwrap_err();
        assert!(matches!(e, ClientError::Failed { .. }), "{e}");
        assert_eq!(e.failure_kind(), Some(FailureKind::Handler));
        assert_eq!(count(&runs, &key), attempts, "the {level} policy applies");
        assert!(
            e.to_string()
                .contains(&format!("after {attempts} attempts")),
            "{e}"
        );
    }
    // A task that succeeds on its second attempt returns its value to the invoker.
    let v: String = client
        .invoke(Task::new(
            format!("{with_policy}.plain"),
            &("second".to_owned(), 2u32),
        ))
        .await
        .unwrap();
    assert_eq!(v, "second");
    assert_eq!(count(&runs, "second"), 2);
    running.stop.cancel();
    running.handle.await.unwrap().unwrap();
    client.close().await;
}

#[tokio::test]
async fn a_long_delay_does_not_hold_back_a_short_one() {
    let svc = unique("rp-hol");
    let _cleanup = Cleanup::new(&[&svc]);
    let runs: Runs = Arc::default();
    let service = Service::new(&svc).method("once", recording(&runs));
    let worker = Worker::builder()
        .amqp(config(QueueType::Quorum))
        .service(service)
        .build()
        .await
        .unwrap();
    let running = run_in_background(worker);
    let client = Client::builder()
        .amqp(config(QueueType::Quorum))
        .connect()
        .await
        .unwrap();
    let target = format!("{svc}.once");
    let send = |key: &str, delay: Duration| {
        let task =
            Task::new(&target, &(key.to_owned(), 2u32)).with_retry(RetryPolicy::fixed(2, delay));
        client.enqueue(task)
    };
    let at = |key: &str, attempt: u32| {
        runs.lock()
            .unwrap()
            .iter()
            .find(|r| r.0 == key && r.1 == attempt)
            .map(|r| r.2)
    };
    send("long", Duration::from_secs(5)).await.unwrap();
    let long1 = poll("long's first attempt", Duration::from_secs(10), || async {
        at("long", 1)
    })
    .await;
    send("short", Duration::from_millis(100)).await.unwrap();
    let short1 = poll("short's first attempt", Duration::from_secs(10), || async {
        at("short", 1)
    })
    .await;
    let short2 = poll("short's retry", Duration::from_secs(10), || async {
        at("short", 2)
    })
    .await;
    assert!(
        at("long", 2).is_none(),
        "the 5 s retry must still be waiting when the 100 ms one ran"
    );
    assert!(short1 > long1);
    assert!(
        short2 - short1 < Duration::from_secs(3),
        "the short retry ran after {:?}, held back by the long one",
        short2 - short1
    );
    assert!(short2 - short1 >= Duration::from_millis(95));
    let long2 = poll("long's retry", Duration::from_secs(15), || async {
        at("long", 2)
    })
    .await;
    assert!(
        long2 - long1 >= Duration::from_millis(4990),
        "long waited its 5 s"
    );
    running.stop.cancel();
    running.handle.await.unwrap().unwrap();
    assert_eq!(count(&runs, "long"), 2);
    assert_eq!(count(&runs, "short"), 2);
    client.close().await;
}
