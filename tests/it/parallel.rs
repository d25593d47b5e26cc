//! Parallel execution and fan-out/fan-in against the real broker: on-target callbacks run
//! exactly once per target (success or failure) with the right payloads and context; final
//! callbacks once per job with every outcome in order; a caller's cid is kept end to end;
//! calls from inside a handler name it as their source.

use crate::common;
use warren::Task;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{cleanup_job, config, poll, run_in_background, service_stats, unique, Cleanup};
use serde_json::{json, Value};
use warren::{
    Client, ClientError, Context, FailureKind, FanInOutcome, Parallel, QueueType, RetryPolicy,
    Service, TargetOutcome, TaskError, Via, Worker,
};
use warren_core::topology::fanout_queue;

/// (callback method, via, cid, payload) of every callback run.
type Calls = Arc<Mutex<Vec<(String, Via, String, Value)>>>;

fn recorder(
    calls: &Calls,
    name: &'static str,
) -> impl Fn(Context, Value) -> futures_util::future::Ready<Result<(), TaskError>> + Send + Sync + 'static
{
    let calls = calls.clone();
    move |ctx: Context, v: Value| {
        if let Ok(mut c) = calls.lock() {
            c.push((name.to_owned(), ctx.via(), ctx.cid().to_owned(), v));
        }
        futures_util::future::ready(Ok(()))
    }
}

/// A service with targets `inc` (x+1), `double` (x*2), `boom` (fails), `fan` (starts a
/// parallel invoke from a handler) and callbacks `cb1`, `cb2`, `all1`, `all2`.
fn service(svc: &str, calls: &Calls) -> Service {
    let target_svc = svc.to_owned();
    Service::new(svc)
        .retry(RetryPolicy::none())
        .method("inc", |_: Context, x: i64| async move {
            Ok::<_, TaskError>(x + 1)
        })
        .method("double", |_: Context, x: i64| async move {
            Ok::<_, TaskError>(x * 2)
        })
        .method("boom", |_: Context, _: i64| async move {
            Err::<i64, _>(TaskError::fail("boom"))
        })
        .method("fan", move |ctx: Context, n: i64| {
            let svc = target_svc.clone();
            async move {
                let mut p = Parallel::new();
                for i in 0..n {
                    p = p.target(format!("{svc}.inc"), &i);
                }
                let p = p.on_final(format!("{svc}.all1"));
                let r = ctx.parallel(p).await?;
                Ok::<_, TaskError>(r.job.to_string())
            }
        })
        .method("cb1", recorder(calls, "cb1"))
        .method("cb2", recorder(calls, "cb2"))
        .method("all1", recorder(calls, "all1"))
        .method("all2", recorder(calls, "all2"))
}

struct Fixture {
    svc: String,
    client: Client,
    calls: Calls,
    running: common::Running,
    _cleanup: Cleanup,
}

async fn fixture(qt: QueueType) -> Fixture {
    let svc = unique("par");
    let cleanup = Cleanup::new(&[&svc]);
    let calls: Calls = Arc::default();
    let worker = Worker::builder()
        .amqp(config(qt))
        .service(service(&svc, &calls))
        .completion_window(Duration::from_secs(30))
        .build()
        .await
        .unwrap();
    let client = Client::builder().amqp(config(qt)).connect().await.unwrap();
    Fixture {
        svc,
        client,
        calls,
        running: run_in_background(worker),
        _cleanup: cleanup,
    }
}

impl Fixture {
    fn t(&self, m: &str) -> String {
        format!("{}.{m}", self.svc)
    }

    fn calls_of(&self, name: &str) -> Vec<(Via, String, Value)> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.0 == name)
            .map(|c| (c.1, c.2.clone(), c.3.clone()))
            .collect()
    }

    async fn wait_calls(&self, name: &str, n: usize) -> Vec<(Via, String, Value)> {
        poll(
            &format!("{n} calls of {name}"),
            Duration::from_secs(30),
            || async {
                let c = self.calls_of(name);
                (c.len() >= n).then_some(c)
            },
        )
        .await
    }

    /// Drains the worker (every started delivery finishes) and checks nothing is left
    /// queued, so the counts taken afterwards are final.
    async fn drain(self) -> (Calls, String) {
        self.running.stop.cancel();
        self.running.handle.await.unwrap().unwrap();
        let stats = service_stats(self.client.broker(), &self.svc).await;
        assert_eq!(stats.ready, 0, "nothing may be left in the service queue");
        self.client.close().await;
        (self.calls, self.svc)
    }
}

async fn three_targets_two_callbacks(qt: QueueType) {
    let f = fixture(qt).await;
    let cid = format!("caller-cid-{}", unique("c"));
    let receipt = f
        .client
        .parallel(
            Parallel::new()
                .target(f.t("inc"), &10)
                .target(f.t("double"), &10)
                .target(f.t("boom"), &10)
                .on_target(f.t("cb1"))
                .on_target(f.t("cb2"))
                .with_cid(cid.clone()),
        )
        .await
        .unwrap();
    assert_eq!(receipt.cid, cid, "the caller's cid is returned");
    assert_eq!(receipt.tasks.len(), 3);
    f.wait_calls("cb1", 3).await;
    f.wait_calls("cb2", 3).await;
    let (calls, svc) = f.drain().await;
    let calls = calls.lock().unwrap().clone();
    for cb in ["cb1", "cb2"] {
        let mut mine: Vec<TargetOutcome> = calls
            .iter()
            .filter(|c| c.0 == cb)
            .map(|(_, via, c, v)| {
                assert_eq!(*via, Via::OnTarget, "callbacks see they run on-target");
                assert_eq!(c, &cid, "the callback task carries the caller's cid");
                serde_json::from_value(v.clone()).unwrap()
            })
            .collect();
        assert_eq!(mine.len(), 3, "{cb} runs exactly once per target");
        mine.sort_by_key(|o| o.index);
        let expect = [
            ("inc", Some(json!(11))),
            ("double", Some(json!(20))),
            ("boom", None),
        ];
        for (o, (i, (m, resp))) in mine.iter().zip(expect.iter().enumerate()) {
            assert_eq!(o.index as usize, i);
            assert_eq!(o.cid, cid);
            assert_eq!(o.target, format!("{svc}.{m}"));
            assert_eq!(o.source, None, "sent from a client, not a handler");
            assert_eq!(&o.response, resp);
            assert_eq!(o.ok, resp.is_some());
            if *m == "boom" {
                let e = o.error.as_ref().expect("a failed target reports its error");
                assert_eq!(e.kind, FailureKind::Handler);
                assert!(e.message.contains("boom"));
            } else {
                assert!(o.error.is_none());
            }
            assert!(o.req_ts_utc.ends_with('Z') && o.req_ts_utc.len() > 20);
        }
    }
}

#[tokio::test]
async fn parallel_three_targets_one_failing_two_callbacks_quorum() {
    three_targets_two_callbacks(QueueType::Quorum).await;
}

#[tokio::test]
async fn parallel_three_targets_one_failing_two_callbacks_classic() {
    three_targets_two_callbacks(QueueType::Classic).await;
}

#[tokio::test]
async fn fan_in_runs_each_final_callback_once_with_every_outcome() {
    let f = fixture(QueueType::Quorum).await;
    let mut p = Parallel::new();
    for i in 0..20 {
        let m = if i == 7 { "boom" } else { "inc" };
        p = p.target(f.t(m), &i);
    }
    let p = p
        .on_target(f.t("cb1"))
        .on_final(f.t("all1"))
        .on_final(f.t("all2"));
    let receipt = f.client.parallel(p).await.unwrap();
    f.wait_calls("all1", 1).await;
    f.wait_calls("all2", 1).await;
    f.wait_calls("cb1", 20).await;
    let url = common::url();
    let (calls, svc) = f.drain().await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.iter().filter(|c| c.0 == "cb1").count(), 20);
    for name in ["all1", "all2"] {
        let finals: Vec<_> = calls.iter().filter(|c| c.0 == name).collect();
        assert_eq!(finals.len(), 1, "{name} fires exactly once");
        let (_, via, cid, payload) = finals[0];
        assert_eq!(*via, Via::OnFinal);
        assert_eq!(cid, &receipt.cid);
        let out: FanInOutcome = serde_json::from_value(payload.clone()).unwrap();
        assert!(!out.ok, "one target failed");
        assert_eq!(out.outcomes.len(), 20);
        for (i, o) in out.outcomes.iter().enumerate() {
            assert_eq!(o.index as usize, i, "outcomes in the caller's order");
            if i == 7 {
                assert!(!o.ok && o.error.is_some());
                assert_eq!(o.target, format!("{svc}.boom"));
            } else {
                assert!(o.ok);
                assert_eq!(o.response, Some(json!(i + 1)));
                assert_eq!(o.target, format!("{svc}.inc"));
            }
        }
    }
    // The part queue is gone once the join fired.
    let broker = warren_core::Broker::connect(config(QueueType::Classic))
        .await
        .unwrap();
    let part = fanout_queue(&receipt.job);
    assert!(broker.queue_stats(&part).await.unwrap().is_none());
    broker.close().await;
    cleanup_job(&url, &part).await;
}

#[tokio::test]
async fn fan_in_started_by_a_handler_names_its_source() {
    let f = fixture(QueueType::Quorum).await;
    let job: String = f.client.invoke(Task::new(f.t("fan"), &5)).await.unwrap();
    let finals = f.wait_calls("all1", 1).await;
    let out: FanInOutcome = serde_json::from_value(finals[0].2.clone()).unwrap();
    assert_eq!(out.source, Some(f.t("fan")));
    assert_eq!(out.outcomes.len(), 5);
    assert!(out.ok);
    let url = common::url();
    let (calls, _) = f.drain().await;
    assert_eq!(
        calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.0 == "all1")
            .count(),
        1
    );
    cleanup_job(&url, &fanout_queue(&job.parse().unwrap())).await;
}

#[tokio::test]
async fn parallel_refuses_bad_requests_before_sending() {
    let client = Client::builder()
        .amqp(config(QueueType::Quorum))
        .connect()
        .await
        .unwrap();
    let e = client.parallel(Parallel::new()).await.unwrap_err();
    assert!(matches!(e, ClientError::NoTargets), "{e}");
    // Invalid names are kept by the builder and returned before anything is sent.
    assert!(matches!(
        client.parallel(Parallel::new().target("NoDot", &1)).await,
        Err(ClientError::Name(_))
    ));
    assert!(matches!(
        client
            .parallel(Parallel::new().target("a.b", &1).on_final("bad name.x"))
            .await,
        Err(ClientError::Name(_))
    ));
    let long = "c".repeat(256);
    let p = Parallel::new().target("a.b", &1).with_cid(long);
    assert!(
        client.parallel(p).await.is_err(),
        "a cid over 255 bytes is refused"
    );
    client.close().await;
}
