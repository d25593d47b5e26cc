//! Invoke/retry against the real broker, in its three modes: a target that succeeds on
//! attempt k, one that never does, the spacing between attempts, the callback's payload and
//! that it runs exactly once, and the typed errors for bad requests.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{config, poll, run_in_background, service_stats, unique, Cleanup};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use warren::{
    Client, ClientError, Context, FailureKind, InvokeRetry, QueueType, Retried, RetryOutcome,
    RetryPolicy, Service, TaskError, Via, Worker,
};

#[derive(Serialize, Deserialize)]
struct Flaky {
    key: String,
    ok_at: u32,
}

/// (key, attempt, when) of every attempt.
type Attempts = Arc<Mutex<Vec<(String, u32, Instant)>>>;
/// (via, cid, payload) of every callback run.
type Callbacks = Arc<Mutex<Vec<(Via, String, RetryOutcome)>>>;

struct Fixture {
    svc: String,
    client: Client,
    attempts: Attempts,
    callbacks: Callbacks,
    running: common::Running,
    _cleanup: Cleanup,
}

const INTERVAL: Duration = Duration::from_millis(300);

async fn fixture() -> Fixture {
    let svc = unique("ir");
    let cleanup = Cleanup::new(&[&svc]);
    let attempts: Attempts = Arc::default();
    let callbacks: Callbacks = Arc::default();
    let (a, c) = (attempts.clone(), callbacks.clone());
    let me = svc.clone();
    let service = Service::new(&svc)
        // Invoke/retry's own policy must win over this one (the task's policy comes first).
        .retry(RetryPolicy::fixed(5, Duration::ZERO))
        .method("flaky", move |ctx: Context, f: Flaky| {
            let attempts = a.clone();
            async move {
                attempts
                    .lock()
                    .unwrap()
                    .push((f.key.clone(), ctx.attempt(), Instant::now()));
                if ctx.attempt() < f.ok_at {
                    return Err(TaskError::fail(format!("{} not yet", f.key)));
                }
                Ok(format!("{}-ok", f.key))
            }
        })
        .method("cb", move |ctx: Context, o: RetryOutcome| {
            let callbacks = c.clone();
            async move {
                callbacks
                    .lock()
                    .unwrap()
                    .push((ctx.via(), ctx.cid().to_owned(), o));
                Ok::<_, TaskError>(())
            }
        })
        .method("caller", move |ctx: Context, key: String| {
            let svc = me.clone();
            async move {
                let call = InvokeRetry::new(format!("{svc}.flaky"), &Flaky { key, ok_at: 2 })
                    .repeats(3)
                    .interval(INTERVAL)
                    .callback(format!("{svc}.cb"));
                Ok::<_, TaskError>(ctx.invoke_retry_async(call).await?)
            }
        });
    let worker = Worker::builder()
        .amqp(config(QueueType::Quorum))
        .service(service)
        .completion_window(Duration::from_secs(30))
        // The per-call lease and done-marker queues of callbacks expire soon after the test.
        .part_queue_expiry(Duration::from_secs(20))
        .build()
        .await
        .unwrap();
    let client = Client::builder()
        .amqp(config(QueueType::Quorum))
        .connect()
        .await
        .unwrap();
    Fixture {
        svc,
        client,
        attempts,
        callbacks,
        running: run_in_background(worker),
        _cleanup: cleanup,
    }
}

impl Fixture {
    fn t(&self, m: &str) -> String {
        format!("{}.{m}", self.svc)
    }

    fn call(&self, key: &str, ok_at: u32, repeats: u32) -> InvokeRetry {
        InvokeRetry::new(
            self.t("flaky"),
            &Flaky {
                key: key.into(),
                ok_at,
            },
        )
        .repeats(repeats)
        .interval(INTERVAL)
    }

    fn attempts_of(&self, key: &str) -> Vec<(u32, Instant)> {
        self.attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.0 == key)
            .map(|a| (a.1, a.2))
            .collect()
    }

    async fn wait_callback(&self, cid: &str) -> (Via, RetryOutcome) {
        poll("the callback", Duration::from_secs(30), || async {
            self.callbacks
                .lock()
                .unwrap()
                .iter()
                .find(|c| c.1 == cid)
                .map(|c| (c.0, c.2.clone()))
        })
        .await
    }

    /// Drains the worker and checks nothing is left queued; returns the callback count per
    /// cid so "exactly once" is checked on final numbers.
    async fn drain_and_count(self, cid: &str) -> (usize, Attempts) {
        self.running.stop.cancel();
        self.running.handle.await.unwrap().unwrap();
        let stats = service_stats(self.client.broker(), &self.svc).await;
        assert_eq!(stats.ready, 0, "nothing left in the service queue");
        self.client.close().await;
        let n = self
            .callbacks
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.1 == cid)
            .count();
        (n, self.attempts)
    }
}

/// Attempts are numbered 1..=n and at least the interval apart.
fn check_spacing(attempts: &[(u32, Instant)], n: u32) {
    let numbers: Vec<u32> = attempts.iter().map(|a| a.0).collect();
    assert_eq!(
        numbers,
        (1..=n).collect::<Vec<_>>(),
        "attempts in order, once each"
    );
    for w in attempts.windows(2) {
        let gap = w[1].1 - w[0].1;
        assert!(
            gap >= INTERVAL - Duration::from_millis(5),
            "attempts {} and {} only {gap:?} apart",
            w[0].0,
            w[1].0
        );
    }
}

#[tokio::test]
async fn sync_sync_succeeds_on_attempt_k_and_exhausts_otherwise() {
    let f = fixture().await;
    let v: String = f.client.invoke_retry(f.call("a", 3, 4)).await.unwrap();
    assert_eq!(v, "a-ok");
    check_spacing(&f.attempts_of("a"), 3);
    let e = f
        .client
        .invoke_retry::<String>(f.call("b", 99, 3))
        .await
        .unwrap_err();
    match &e {
        ClientError::RetriesExhausted {
            attempts, failure, ..
        } => {
            assert_eq!(*attempts, 3);
            assert_eq!(failure.kind, FailureKind::Handler);
            assert!(failure.message.contains("b not yet"));
        }
        other => panic!("expected RetriesExhausted, got {other}"),
    }
    assert_eq!(e.failure_kind(), Some(FailureKind::Handler));
    check_spacing(&f.attempts_of("b"), 3);
    // Only the last failed attempt is dead: the earlier ones were the caller's to repeat.
    let dead = f
        .client
        .broker()
        .queue_stats(&format!("warren.dead.{}", f.svc))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead.ready, 1, "one dead letter for the exhausted call");
    let (_, attempts) = f.drain_and_count("-").await;
    assert_eq!(
        attempts.lock().unwrap().len(),
        6,
        "the worker never retried on its own"
    );
}

#[tokio::test]
async fn sync_async_returns_at_once_or_goes_on_in_background() {
    let f = fixture().await;
    let first = f
        .client
        .invoke_retry_fallback::<String>(f.call("ok", 1, 3).callback(f.t("cb")))
        .await
        .unwrap();
    assert_eq!(first, Retried::Done("ok-ok".to_owned()));
    let call = f
        .call("later", 3, 4)
        .callback(f.t("cb"))
        .context(&json!({"hi": "there"}))
        .with_cid(unique("cid"));
    let Retried::Background { cid } = f
        .client
        .invoke_retry_fallback::<String>(call)
        .await
        .unwrap()
    else {
        panic!("the first attempt fails, so the call goes on in background");
    };
    let (via, o) = f.wait_callback(&cid).await;
    assert_eq!(via, Via::RetryCallback);
    assert!(o.ok);
    assert_eq!(o.response, Some(json!("later-ok")));
    assert_eq!(o.attempts, 3);
    assert_eq!(o.retry_repeats, 4);
    assert!((o.retry_seconds - 0.3).abs() < 1e-9);
    assert_eq!(o.call_cid, cid);
    assert_eq!(o.orig_cid, None);
    assert_eq!(o.source, "client");
    assert_eq!(o.target, f.t("flaky"));
    assert_eq!(o.context, json!({"hi": "there"}));
    assert!(o.req_ts_utc.ends_with('Z'));
    check_spacing(&f.attempts_of("later"), 3);
    let (n, _) = f.drain_and_count(&cid).await;
    assert_eq!(n, 1, "the callback runs exactly once");
}

#[tokio::test]
async fn background_call_that_never_succeeds_reports_once() {
    let f = fixture().await;
    let call = f.call("never", 99, 3).callback(f.t("cb"));
    let Retried::Background { cid } = f
        .client
        .invoke_retry_fallback::<String>(call)
        .await
        .unwrap()
    else {
        panic!("expected background");
    };
    let (_, o) = f.wait_callback(&cid).await;
    assert!(!o.ok);
    assert_eq!(o.attempts, 3);
    assert_eq!(o.response, None);
    let e = o.error.expect("the last failure is reported");
    assert_eq!(e.kind, FailureKind::Handler);
    check_spacing(&f.attempts_of("never"), 3);
    // The failed call was also dead-lettered, once (before its callback was sent).
    let dead = f
        .client
        .broker()
        .queue_stats(&format!("warren.dead.{}", f.svc))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead.ready, 1, "the final failure is dead-lettered once");
    let (n, _) = f.drain_and_count(&cid).await;
    assert_eq!(n, 1, "the callback runs exactly once");
}

#[tokio::test]
async fn async_async_returns_a_cid_at_once() {
    let f = fixture().await;
    let cid = f
        .client
        .invoke_retry_async(f.call("bg", 2, 3).callback(f.t("cb")))
        .await
        .unwrap();
    let (via, o) = f.wait_callback(&cid).await;
    assert_eq!(via, Via::RetryCallback);
    assert!(o.ok);
    assert_eq!(o.attempts, 2);
    check_spacing(&f.attempts_of("bg"), 2);
    let cid2 = f
        .client
        .invoke_retry_async(f.call("bg-never", 99, 2).callback(f.t("cb")))
        .await
        .unwrap();
    let (_, o) = f.wait_callback(&cid2).await;
    assert!(!o.ok);
    assert_eq!(o.attempts, 2);
    check_spacing(&f.attempts_of("bg-never"), 2);
    // From a handler: the callback names the handler as source and its cid as orig_cid.
    let caller_cid = unique("outer");
    let inner: String = f
        .client
        .invoke(warren::Task::new(f.t("caller"), &"from-handler").with_cid(caller_cid.clone()))
        .await
        .unwrap();
    let (_, o) = f.wait_callback(&inner).await;
    assert!(o.ok);
    assert_eq!(o.source, f.t("caller"));
    assert_eq!(o.orig_cid.as_deref(), Some(caller_cid.as_str()));
    let (n, _) = f.drain_and_count(&cid).await;
    assert_eq!(n, 1);
}

#[tokio::test]
async fn bad_requests_get_typed_errors_and_bad_targets_are_not_retried() {
    let f = fixture().await;
    let no_interval = InvokeRetry::new(f.t("flaky"), &1).repeats(3);
    for e in [
        f.client
            .invoke_retry::<Value>(no_interval.clone())
            .await
            .unwrap_err(),
        f.client.invoke_retry_async(no_interval).await.unwrap_err(),
    ] {
        assert!(matches!(e, ClientError::MissingInterval), "{e}");
    }
    let zero = f.call("z", 1, 0);
    let e = f
        .client
        .invoke_retry_fallback::<Value>(zero)
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::ZeroRepeats), "{e}");
    // An invalid name is kept by the builder and returned before anything is sent.
    let bad = InvokeRetry::new("nodot", &1).repeats(2).seconds(1);
    assert!(matches!(
        f.client.invoke_retry_async(bad).await,
        Err(ClientError::Name(_))
    ));
    // An unknown method fails at once, whatever the repeats: it cannot succeed.
    let unknown = InvokeRetry::new(f.t("nope"), &1).repeats(5).seconds(1);
    let e = f
        .client
        .invoke_retry::<Value>(unknown.clone())
        .await
        .unwrap_err();
    assert_eq!(e.failure_kind(), Some(FailureKind::UnknownTarget), "{e}");
    let cid = f
        .client
        .invoke_retry_async(unknown.callback(f.t("cb")))
        .await
        .unwrap();
    let (_, o) = f.wait_callback(&cid).await;
    assert!(!o.ok);
    assert_eq!(o.attempts, 1, "bad input is never retried");
    assert_eq!(o.error.unwrap().kind, FailureKind::UnknownTarget);
    let (n, _) = f.drain_and_count(&cid).await;
    assert_eq!(n, 1);
}
