//! Metrics against the real broker: a known workload on a service of its own, then the
//! Prometheus scrape must show exactly its counts (docs/operations.md#metrics).
//!
//! The recorder is process-global and the other tests of this binary run in parallel, so
//! it is installed once ([`recorder`]) and every assertion filters by this test's unique
//! service label.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren::metrics::{self as names, Prometheus};
use warren::testing::{unique, TestWorker};
use warren::{ClientError, Context, FailureKind, RetryPolicy, Service, Task, TaskError, Worker};

use crate::common::{config, poll};

/// warren's Prometheus recorder, installed once for the whole test binary.
pub fn recorder() -> &'static Prometheus {
    static RECORDER: OnceLock<Prometheus> = OnceLock::new();
    RECORDER.get_or_init(|| Prometheus::install().expect("install warren's Prometheus recorder"))
}

/// One sample of a scrape: name, labels, value.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

pub(crate) fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|kv| !kv.is_empty())
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_owned(), v.trim_matches('"').to_owned()))
                })
                .collect();
            Some(Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().ok()?,
            })
        })
        .collect()
}

/// The value of `name` for the series whose labels include all of `labels` (0 when absent).
pub(crate) fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// What the workload must leave: (metric, labels, exact value).
type Expected = Vec<(String, Vec<(&'static str, String)>, f64)>;

fn mismatches(samples: &[Sample], expected: &Expected) -> Vec<String> {
    expected
        .iter()
        .filter_map(|(name, labels, want)| {
            let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let got = value(samples, name, &labels);
            #[allow(clippy::float_cmp)] // counts are small integers
            (got != *want).then(|| format!("{name}{labels:?}: want {want}, got {got}"))
        })
        .collect()
}

/// A test worker hosting `service` on quorum queues.
async fn quorum_worker(service: Service) -> TestWorker {
    TestWorker::start(
        Worker::builder()
            .amqp(config(warren::QueueType::Quorum))
            .service(service),
    )
    .await
    .expect("worker starts")
}

#[tokio::test]
async fn a_known_workload_gives_exact_counts() {
    let prometheus = recorder();
    let svc = unique("metrics");
    let flaky_calls = Arc::new(AtomicU32::new(0));
    let calls = flaky_calls.clone();
    let service = Service::new(&svc)
        .method("ok", |_: Context, n: u32| async move {
            Ok::<_, TaskError>(n + 1)
        })
        .method("bad", |_: Context, _: u32| async move {
            Err::<u32, _>(TaskError::reject("never"))
        })
        // Fails its first two attempts, succeeds on the third.
        .method("flaky", move |ctx: Context, _: u32| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                if ctx.attempt() < 3 {
                    return Err(TaskError::fail("not yet"));
                }
                Ok::<_, TaskError>(ctx.attempt())
            }
        })
        .retry_method("flaky", RetryPolicy::fixed(3, Duration::from_millis(100)));
    let worker = quorum_worker(service).await;
    let client = worker.client().clone();

    for n in 0..5u32 {
        let out: u32 = client
            .invoke(Task::new(format!("{svc}.ok"), &n))
            .await
            .expect("ok answers");
        assert_eq!(out, n + 1);
    }
    for n in 0..3u32 {
        match client
            .invoke::<u32>(Task::new(format!("{svc}.bad"), &n))
            .await
        {
            Err(ClientError::Failed { failure, .. }) => {
                assert_eq!(failure.kind, FailureKind::Rejected);
            }
            other => panic!("bad must be rejected, got {other:?}"),
        }
    }
    let out: u32 = client
        .invoke(Task::new(format!("{svc}.flaky"), &0u32))
        .await
        .expect("flaky succeeds on its third attempt");
    assert_eq!(out, 3);
    assert_eq!(flaky_calls.load(Ordering::SeqCst), 3);
    // A method the worker does not host: counted under "_other", never under its name.
    client
        .enqueue(Task::new(format!("{svc}.nope"), &0u32))
        .await
        .expect("enqueued");

    let s = |v: &str| v.to_owned();
    let labels = |m: &str| vec![("service", svc.clone()), ("method", s(m))];
    let with = |m: &str, k: &'static str, v: &str| {
        let mut l = labels(m);
        l.push((k, s(v)));
        l
    };
    let expected: Expected = vec![
        (s(names::TASKS_RECEIVED), labels("ok"), 5.0),
        (s(names::TASKS_SUCCEEDED), labels("ok"), 5.0),
        (s(names::TASKS_FAILED), labels("ok"), 0.0),
        (s(names::TASKS_RECEIVED), labels("bad"), 3.0),
        (s(names::TASKS_SUCCEEDED), labels("bad"), 0.0),
        (s(names::TASKS_FAILED), with("bad", "kind", "rejected"), 3.0),
        (
            s(names::TASKS_DEAD_LETTERED),
            with("bad", "kind", "rejected"),
            3.0,
        ),
        (s(names::TASKS_RECEIVED), labels("flaky"), 3.0),
        (s(names::TASKS_RETRIED), labels("flaky"), 2.0),
        (s(names::TASKS_SUCCEEDED), labels("flaky"), 1.0),
        (s(names::TASKS_FAILED), labels("flaky"), 0.0),
        (s(names::TASKS_RECEIVED), labels("_other"), 1.0),
        (
            s(names::TASKS_FAILED),
            with("_other", "kind", "unknown_target"),
            1.0,
        ),
        (
            s(names::TASKS_DEAD_LETTERED),
            with("_other", "kind", "unknown_target"),
            1.0,
        ),
        (s(names::TASKS_RECEIVED), labels("nope"), 0.0),
        (
            s(names::TASKS_REQUEUED),
            vec![("service", svc.clone())],
            0.0,
        ),
        (
            s(names::TASKS_IN_FLIGHT),
            vec![("service", svc.clone())],
            0.0,
        ),
        // One handler run per attempt; queue waits of first attempts only.
        (format!("{}_count", names::TASK_DURATION), labels("ok"), 5.0),
        (
            format!("{}_count", names::TASK_DURATION),
            labels("flaky"),
            3.0,
        ),
        (
            format!("{}_count", names::TASK_QUEUE_WAIT),
            labels("ok"),
            5.0,
        ),
        (
            format!("{}_count", names::TASK_QUEUE_WAIT),
            labels("flaky"),
            1.0,
        ),
        // The client side (same process): what was sent, and the invokes' latency.
        (s(names::TASKS_SENT), with("ok", "via", "invoke"), 5.0),
        (s(names::TASKS_SENT), with("bad", "via", "invoke"), 3.0),
        (s(names::TASKS_SENT), with("flaky", "via", "retry"), 2.0),
        (s(names::TASKS_SENT), with("nope", "via", "enqueue"), 1.0),
        (
            format!("{}_count", names::INVOKE_DURATION),
            with("ok", "outcome", "ok"),
            5.0,
        ),
        (
            format!("{}_count", names::INVOKE_DURATION),
            with("bad", "outcome", "error"),
            3.0,
        ),
        (
            format!("{}_count", names::INVOKE_DURATION),
            with("flaky", "outcome", "ok"),
            1.0,
        ),
    ];
    // Invokes return before the worker acks; the counters follow the acks.
    let last = std::sync::Mutex::new(Vec::new());
    let settled = tokio::time::timeout(
        Duration::from_secs(20),
        poll("the counts", Duration::from_secs(20), || {
            let m = mismatches(&parse(&prometheus.render()), &expected);
            let done = m.is_empty();
            *last.lock().unwrap() = m;
            async move { done.then_some(()) }
        }),
    )
    .await;
    assert!(
        settled.is_ok(),
        "metrics differ: {:#?}",
        last.lock().unwrap()
    );
    // Bounded labels: no series carries the task ids or cids of this workload.
    let text = prometheus.render();
    assert!(!text.contains("cid="), "a cid label: {text}");
    assert!(
        !text.lines().any(|l| l.contains(&svc)
            && l.contains("method=\"nope\"")
            && !l.starts_with(names::TASKS_SENT)),
        "an unknown method became a label value"
    );
    worker.stop().await.expect("worker stops");
}

/// `WorkerBuilder::metrics_listen` serves the scrape over HTTP (here on a free port,
/// reusing the binary's recorder, which warren installed).
#[tokio::test]
async fn metrics_listen_serves_the_scrape() {
    recorder();
    let svc = unique("metrics-http");
    let worker = Worker::builder()
        .amqp(config(warren::QueueType::Quorum))
        .service(
            Service::new(&svc).method(
                "ok",
                |_: Context, n: u32| async move { Ok::<_, TaskError>(n) },
            ),
        )
        .metrics_listen("127.0.0.1:0".parse().unwrap())
        .build()
        .await
        .expect("worker with a metrics endpoint");
    let addr = worker.metrics_addr().expect("a metrics address");
    let queues = worker.queue_names();
    let client = worker.client();
    let crate::common::Running { stop, handle } = crate::common::run_in_background(worker);
    let _: u32 = client
        .invoke(Task::new(format!("{svc}.ok"), &1u32))
        .await
        .unwrap();

    let get = |path: &'static str| async move {
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        conn.read_to_string(&mut out).await.unwrap();
        out
    };
    let want = format!(
        "{}{{service=\"{svc}\",method=\"ok\"}} 1",
        names::TASKS_SUCCEEDED
    );
    let page = poll("the served counter", Duration::from_secs(10), || async {
        let page = get("/metrics").await;
        page.contains(&want).then_some(page)
    })
    .await;
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
    assert!(
        page.contains("content-type: text/plain; version=0.0.4"),
        "{page}"
    );
    assert!(
        page.contains("# TYPE warren_task_duration_seconds histogram"),
        "{page}"
    );
    assert!(get("/other").await.starts_with("HTTP/1.1 404"));

    stop.cancel();
    handle.await.unwrap().unwrap();
    // The endpoint stops with the worker.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    client.close().await;
    crate::common::cleanup(&crate::common::url(), &[&svc]).await;
    let _ = queues;
}

/// An answer whose caller's reply queue is gone (here the client closed while its call ran)
/// is dropped and counted in `warren_replies_dropped_total`, under the task's service and
/// method.
#[tokio::test]
async fn a_reply_to_a_gone_caller_is_counted_as_dropped() {
    let prometheus = recorder();
    let svc = unique("metrics-drop");
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let started_tx = Arc::new(std::sync::Mutex::new(Some(started_tx)));
    let release = Arc::new(tokio::sync::Notify::new());
    let released = release.clone();
    let service = Service::new(&svc).method("slow", move |_: Context, n: u32| {
        let (started, released) = (started_tx.clone(), released.clone());
        async move {
            if let Some(tx) = started.lock().ok().and_then(|mut g| g.take()) {
                let _ = tx.send(());
            }
            released.notified().await;
            Ok::<_, TaskError>(n)
        }
    });
    let worker = quorum_worker(service).await;
    let caller = warren::Client::builder()
        .amqp(config(warren::QueueType::Quorum))
        .connect()
        .await
        .expect("caller connects");
    let call = {
        let (caller, svc) = (caller.clone(), svc.clone());
        tokio::spawn(async move {
            caller
                .invoke::<u32>(
                    Task::new(format!("{svc}.slow"), &7).with_timeout(Duration::from_secs(30)),
                )
                .await
        })
    };
    tokio::time::timeout(Duration::from_secs(20), started_rx)
        .await
        .expect("the handler starts within 20 s")
        .expect("the handler signals its start");
    // The caller goes away (its reply queue is deleted) before the handler answers.
    caller.close().await;
    release.notify_one();
    let ended = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("the call ends once its client closed")
        .expect("invoke task");
    assert!(
        ended.is_err(),
        "a closed client's call cannot succeed: {ended:?}"
    );

    let labels = [("service", svc.as_str()), ("method", "slow")];
    let counted = tokio::time::timeout(
        Duration::from_secs(20),
        poll("the dropped reply", Duration::from_secs(20), || {
            let got = value(
                &parse(&prometheus.render()),
                names::REPLIES_DROPPED,
                &labels,
            );
            async move { (got >= 1.0).then_some(got) }
        }),
    )
    .await;
    match counted {
        Ok(got) => assert!(
            (got - 1.0).abs() < f64::EPSILON,
            "one reply dropped, got {got}"
        ),
        Err(_) => panic!("no dropped reply counted within 20 s"),
    }
    worker.stop().await.expect("worker stops");
}
