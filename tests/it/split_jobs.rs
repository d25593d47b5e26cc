//! Split jobs against the real broker: `_part` splitters, hand-attached decorators, zero
//! parts, failing parts, simultaneous finishes, duplicated parts, and the name limit. Each
//! test checks a ledger of hook invocations: exactly one, with every result in order.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{config, poll, unique, Cleanup};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Barrier;
use tokio_util::sync::CancellationToken;
use warren::{
    Client, ClientError, Context, QueueType, RetryPolicy, Service, Target, Task, TaskError, Worker,
};

#[derive(Serialize, Deserialize, Clone)]
struct Job {
    n: u64,
    #[serde(default)]
    fail_at: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct Part {
    i: u64,
    fail: bool,
}

/// (hook method, cid, payload) for every hook call.
type Hooks = Arc<Mutex<Vec<(String, String, Value)>>>;

struct Fixture {
    svc: String,
    client: Client,
    hooks: Hooks,
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), warren::WorkerError>>,
    _cleanup: Cleanup,
}

async fn fixture(qt: QueueType, barrier: Option<Arc<Barrier>>) -> Fixture {
    let svc = unique("split");
    let cleanup = Cleanup::new(&[&svc]);
    let hooks: Hooks = Arc::default();
    let (h1, h2) = (hooks.clone(), hooks.clone());
    let service = Service::new(&svc)
        .method("square_part", |_: Context, job: Job| async move {
            Ok::<_, TaskError>(
                (0..job.n)
                    .map(|i| Part {
                        i,
                        fail: job.fail_at == Some(i),
                    })
                    .collect::<Vec<_>>(),
            )
        })
        .method("square", move |ctx: Context, p: Part| {
            let barrier = barrier.clone();
            async move {
                assert!(ctx.part().is_some(), "only parts run the method");
                if let Some(b) = barrier {
                    b.wait().await;
                }
                if p.fail {
                    return Err(TaskError::reject(format!("part {} refuses", p.i)));
                }
                Ok(p.i * p.i)
            }
        })
        .method("done", move |ctx: Context, results: Value| {
            let hooks = h1.clone();
            async move {
                hooks
                    .lock()
                    .unwrap()
                    .push(("done".into(), ctx.cid().to_owned(), results));
                Ok::<_, TaskError>(())
            }
        })
        .method("failed", move |ctx: Context, err: Value| {
            let hooks = h2.clone();
            async move {
                hooks
                    .lock()
                    .unwrap()
                    .push(("failed".into(), ctx.cid().to_owned(), err));
                Ok::<_, TaskError>(())
            }
        })
        .retry(RetryPolicy::none());
    let worker = Worker::builder()
        .amqp(config(qt))
        .service(service)
        .concurrency(64)
        .completion_window(Duration::from_secs(30))
        // Claim and done-marker queues of test jobs disappear a minute after use.
        .part_queue_expiry(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    let common::Running { stop, handle } = common::run_in_background(worker);
    let client = Client::builder().amqp(config(qt)).connect().await.unwrap();
    Fixture {
        svc,
        client,
        hooks,
        stop,
        handle,
        _cleanup: cleanup,
    }
}

impl Fixture {
    fn target(&self, m: &str) -> Target {
        Target::new(&self.svc, m).unwrap()
    }

    /// Enqueues a split job and waits until its hook ran and its part queue is gone.
    async fn run_job(&self, job: &Job) -> (String, Vec<(String, String, Value)>) {
        let cid = unique("cid");
        let task = Task::new(format!("{}.square", self.svc), job)
            .with_cid(&cid)
            .on_complete(self.target("done"))
            .on_error(self.target("failed"));
        let receipt = self.client.enqueue(task).await.unwrap();
        let part_queue = format!("part.{}-square-{}", self.svc, receipt.id);
        self.settle(&cid, &part_queue).await;
        let calls = self
            .hooks
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.1 == cid)
            .cloned()
            .collect();
        (cid, calls)
    }

    /// Waits for a hook for `cid`, the part queue's removal and an empty service queue, then
    /// removes the job's lease and done-marker queues.
    async fn settle(&self, cid: &str, part_queue: &str) {
        self.wait_settled(cid, part_queue).await;
        common::cleanup_job(&common::url(), part_queue).await;
    }

    /// Waits until a hook for `cid` ran.
    async fn wait_hook(&self, cid: &str) {
        poll("the job's hook", Duration::from_secs(60), || {
            let hooks = self.hooks.clone();
            let cid = cid.to_owned();
            async move {
                hooks
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|h| h.1 == cid)
                    .then_some(())
            }
        })
        .await;
    }

    /// Every hook call for `cid` so far.
    fn calls(&self, cid: &str) -> Vec<(String, String, Value)> {
        self.hooks
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.1 == cid)
            .cloned()
            .collect()
    }

    async fn wait_settled(&self, cid: &str, part_queue: &str) {
        self.wait_hook(cid).await;
        let broker = self.client.broker().clone();
        let (pq, sq) = (part_queue.to_owned(), format!("warren.svc.{}", self.svc));
        poll(
            "part queue removed and service queue empty",
            Duration::from_secs(30),
            || {
                let (broker, pq, sq) = (broker.clone(), pq.clone(), sq.clone());
                async move {
                    let gone = broker.queue_stats(&pq).await.ok()?.is_none();
                    let idle = broker.queue_stats(&sq).await.ok()??.ready == 0;
                    (gone && idle).then_some(())
                }
            },
        )
        .await;
    }

    async fn stop(self) {
        let client = self.client.clone();
        self.stop_worker().await;
        client.close().await;
    }

    /// Stops the worker (draining in-flight tasks); the client stays usable.
    async fn stop_worker(self) {
        self.stop.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

fn squares(n: u64) -> Value {
    Value::Array((0..n).map(|i| Value::from(i * i)).collect())
}

async fn split_sizes(qt: QueueType) {
    let f = fixture(qt, None).await;
    for n in [1u64, 7, 100] {
        let (_, calls) = f.run_job(&Job { n, fail_at: None }).await;
        assert_eq!(calls.len(), 1, "one hook for {n} parts: {calls:?}");
        assert_eq!(calls[0].0, "done");
        assert_eq!(
            calls[0].2,
            squares(n),
            "results complete and ordered by part_id"
        );
    }
    // Zero parts: oncomplete at once with an empty list.
    let cid = unique("cid");
    let task = Task::new(
        format!("{}.square", f.svc),
        &Job {
            n: 0,
            fail_at: None,
        },
    )
    .with_cid(&cid)
    .on_complete(f.target("done"));
    let receipt = f.client.enqueue(task).await.unwrap();
    let zero_queue = format!("part.{}-square-{}", f.svc, receipt.id);
    f.wait_hook(&cid).await;
    let calls = f.calls(&cid);
    assert_eq!(
        calls,
        vec![("done".to_owned(), cid.clone(), Value::Array(vec![]))]
    );
    assert!(
        f.client
            .broker()
            .queue_stats(&zero_queue)
            .await
            .unwrap()
            .is_none(),
        "no part queue for a job without parts"
    );
    common::cleanup_job(&common::url(), &zero_queue).await;
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_sizes_quorum() {
    split_sizes(QueueType::Quorum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_sizes_classic() {
    split_sizes(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_part_fires_onerror_once_and_oncomplete_never() {
    let f = fixture(QueueType::Quorum, None).await;
    let (_, calls) = f
        .run_job(&Job {
            n: 5,
            fail_at: Some(3),
        })
        .await;
    assert_eq!(calls.len(), 1, "{calls:?}");
    let (method, _, payload) = &calls[0];
    assert_eq!(method, "failed");
    assert_eq!(payload["error"]["kind"], "parts_failed");
    let failed = payload["failed_parts"].as_array().unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["part_id"], 3);
    assert!(failed[0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("part 3 refuses"));
    // The failed part is also visible as a dead letter.
    let dead = f
        .client
        .broker()
        .queue_stats(&format!("warren.dead.{}", f.svc))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead.ready, 1);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_finishing_at_the_same_instant_join_once() {
    const N: u64 = 40;
    let f = fixture(QueueType::Quorum, Some(Arc::new(Barrier::new(N as usize)))).await;
    let (_, calls) = f
        .run_job(&Job {
            n: N,
            fail_at: None,
        })
        .await;
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].2, squares(N));
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_attached_parts_with_a_duplicate_join_once() {
    let f = fixture(QueueType::Classic, None).await;
    let cid = unique("cid");
    let part_queue = format!("part.custom-{}", uuid::Uuid::new_v4());
    let part = |i: u64| {
        Task::new(format!("{}.square", f.svc), &Part { i, fail: false })
            .with_cid(&cid)
            .with_part(u32::try_from(i).unwrap(), 6, &part_queue)
            .on_complete(f.target("done"))
    };
    // Part 2 is sent twice (a duplicate), part 5 last.
    for i in [0, 1, 2, 3, 2, 4, 5] {
        f.client.enqueue(part(i)).await.unwrap();
    }
    f.wait_settled(&cid, &part_queue).await;
    let calls = f.calls(&cid);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].2, squares(6));
    // A late duplicate after the join neither recreates the part queue nor fires again.
    f.client.enqueue(part(4)).await.unwrap();
    let broker = f.client.broker().clone();
    let sq = format!("warren.svc.{}", f.svc);
    poll("late duplicate taken", Duration::from_secs(30), || {
        let (broker, sq) = (broker.clone(), sq.clone());
        async move { (broker.queue_stats(&sq).await.ok()??.ready == 0).then_some(()) }
    })
    .await;
    let (client, hooks) = (f.client.clone(), f.hooks.clone());
    f.stop_worker().await; // drains: the duplicate is fully handled after this
    assert!(client
        .broker()
        .queue_stats(&part_queue)
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        hooks.lock().unwrap().iter().filter(|h| h.1 == cid).count(),
        1
    );
    common::cleanup_job(&common::url(), &part_queue).await;
    client.close().await;
}

#[tokio::test]
async fn part_queue_name_limit_is_checked_at_enqueue() {
    let client = Client::builder()
        .amqp(config(QueueType::Classic))
        .connect()
        .await
        .unwrap();
    // part.<svc>-<method>-<36-char id> is 43 bytes + svc + method.
    let svc = unique("limit");
    let _cleanup = Cleanup::new(&[&svc]);
    let fits = "m".repeat(212 - svc.len());
    let over = "m".repeat(213 - svc.len());
    client
        .enqueue(Task::new(format!("{svc}.{fits}"), &1))
        .await
        .expect("255-byte part queue fits");
    let err = client
        .enqueue(Task::new(format!("{svc}.{over}"), &1))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Name(_)), "{err:?}");
    assert!(err.to_string().contains("part queue"), "{err}");
    let stats = common::service_stats(client.broker(), &svc).await;
    assert_eq!(stats.ready, 1, "only the task that fits was published");
    // A hand-attached part queue over the limit is refused too.
    let err = client
        .enqueue(Task::new(format!("{svc}.m"), &1).with_part(0, 1, "p".repeat(256)))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Name(_)), "{err:?}");
    client.close().await;
}
