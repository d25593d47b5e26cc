//! Task-level retries across a worker crash: a failed attempt's retry waits in the durable
//! delay levels on the broker while the worker that scheduled it is SIGKILLed; a new worker
//! runs the retry when the delay expires, exactly once per scheduled retry.

use crate::common;

use std::path::PathBuf;
use std::time::Duration;

use common::{config, ledger_path, unique, Cleanup, FixtureWorker, TestLevels};
use warren::{Client, QueueType, RetryPolicy, Task};
use warren_core::Broker;

struct Setup {
    url: String,
    svc: String,
    ledger: PathBuf,
    client: Client,
    broker: Broker,
    levels: TestLevels,
    _cleanup: Cleanup,
}

impl Setup {
    /// A unique service whose retries wait in delay levels of its own (so the test can
    /// count them), deleted at the end.
    async fn new(what: &str) -> Self {
        let url = common::url();
        let svc = unique(what);
        let cleanup = Cleanup::new(&[&svc]);
        let levels = TestLevels::new(&svc, 1);
        let client = Client::builder()
            .amqp(config(QueueType::Quorum))
            .connect()
            .await
            .unwrap();
        let broker = Broker::connect(config(QueueType::Quorum)).await.unwrap();
        Self {
            url,
            ledger: ledger_path(&svc),
            svc,
            client,
            broker,
            levels,
            _cleanup: cleanup,
        }
    }

    async fn worker(&self) -> FixtureWorker {
        FixtureWorker::start_with(
            &self.url,
            &self.svc,
            QueueType::Quorum,
            &self.ledger,
            8,
            &[self.levels.fixture_env()],
        )
        .await
    }

    /// Sends `flaky` for `key`: attempt 1 fails, attempt 2 (after `delay`) succeeds.
    async fn send_flaky(&self, key: &str, delay: Duration) {
        let task = Task::new(
            format!("{}.flaky", self.svc),
            &serde_json::json!({"key": key, "fail_until": 2}),
        )
        .with_retry(RetryPolicy::fixed(2, delay));
        self.client.enqueue(task).await.unwrap();
    }

    /// Ready messages in a queue (0 when it does not exist).
    async fn ready(&self, queue: &str) -> u32 {
        self.broker
            .queue_stats(queue)
            .await
            .unwrap()
            .map_or(0, |s| s.ready)
    }

    /// The (attempt, redelivered) of each execution of `key`, in ledger order.
    fn runs(&self, key: &str) -> Vec<(u32, bool)> {
        common::read_ledger(&self.ledger)
            .into_iter()
            .filter(|(k, _, _)| k == key)
            .map(|(_, a, r)| (a, r))
            .collect()
    }

    /// Waits until nothing is due any more (delay levels, service queue empty), then stops
    /// the worker gracefully: it drains, so a duplicate still in flight would be recorded.
    async fn settle(&self, worker: FixtureWorker) {
        let svc_queue = format!("warren.svc.{}", self.svc);
        common::poll("no retry left waiting", Duration::from_secs(60), || {
            let svc_queue = &svc_queue;
            async move {
                (self.levels.waiting(&self.broker).await == 0 && self.ready(svc_queue).await == 0)
                    .then_some(())
            }
        })
        .await;
        assert!(worker.terminate().await, "worker exits cleanly");
        assert_eq!(
            common::service_stats(&self.broker, &self.svc).await.ready,
            0,
            "nothing left for the service after the worker drained"
        );
        assert_eq!(
            self.ready(&format!("warren.dead.{}", self.svc)).await,
            0,
            "no task failed for good"
        );
    }

    /// Checks `key`'s executions: attempt 1 ran (again only as a marked redelivery, which
    /// schedules one more retry), and attempt 2 ran exactly once per attempt-1 execution,
    /// never as a redelivery (it only ever reached the new worker); returns the attempt-1
    /// count.
    fn check(&self, key: &str) -> usize {
        let runs = self.runs(key);
        let first: Vec<bool> = runs.iter().filter(|(a, _)| *a == 1).map(|r| r.1).collect();
        let second: Vec<bool> = runs.iter().filter(|(a, _)| *a == 2).map(|r| r.1).collect();
        assert!(!first.is_empty(), "{key}: attempt 1 ran: {runs:?}");
        assert!(
            !first[0] && first[1..].iter().all(|r| *r),
            "{key}: attempt 1 ran again only as a marked redelivery: {runs:?}"
        );
        assert!(first.len() <= 2, "{key}: one kill, at most one redelivery");
        assert_eq!(
            second.len(),
            first.len(),
            "{key}: exactly one attempt 2 per attempt-1 execution: {runs:?}"
        );
        assert!(
            second.iter().all(|r| !r),
            "{key}: attempt 2 ran on the new worker only: {runs:?}"
        );
        assert!(
            runs.iter().all(|(a, _)| *a <= 2),
            "{key}: no attempt 3: {runs:?}"
        );
        first.len()
    }

    async fn close(self) {
        self.client.close().await;
        self.broker.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_while_a_retry_waits_in_its_delay_queue() {
    let s = Setup::new("retryk").await;
    let worker = s.worker().await;
    s.send_flaky("r1", Duration::from_secs(3)).await;
    common::poll("attempt 1", Duration::from_secs(30), || async {
        s.runs("r1").iter().any(|(a, _)| *a == 1).then_some(())
    })
    .await;
    // The retry is confirmed in the delay levels: kill the worker that scheduled it.
    common::poll(
        "the retry in the delay levels",
        Duration::from_secs(30),
        || async { (s.levels.waiting(&s.broker).await == 1).then_some(()) },
    )
    .await;
    assert!(
        s.runs("r1").iter().all(|(a, _)| *a == 1),
        "attempt 2 cannot have run before its delay"
    );
    worker.kill9().await;
    let worker = s.worker().await;
    common::poll("attempt 2", Duration::from_secs(60), || async {
        s.runs("r1").iter().any(|(a, _)| *a == 2).then_some(())
    })
    .await;
    s.settle(worker).await;
    let first = s.check("r1");
    assert_eq!(
        s.runs("r1").iter().filter(|(a, _)| *a == 2).count(),
        first,
        "attempt-2 lines == attempt-1 lines"
    );
    eprintln!("r1 runs: {:?}", s.runs("r1"));
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_retries_with_different_delays_across_a_kill() {
    // 3..7 s: long enough that every retry still waits when the worker dies.
    const DELAYS_MS: [u64; 5] = [3000, 4000, 5000, 6000, 7000];
    let s = Setup::new("retryk5").await;
    let worker = s.worker().await;
    for (i, ms) in DELAYS_MS.iter().enumerate() {
        s.send_flaky(&format!("d{i}"), Duration::from_millis(*ms))
            .await;
    }
    // Every retry is confirmed in the delay levels: kill the worker.
    common::poll(
        "five retries in the delay levels",
        Duration::from_secs(30),
        || async { (s.levels.waiting(&s.broker).await == 5).then_some(()) },
    )
    .await;
    worker.kill9().await;
    let worker = s.worker().await;
    common::poll("every attempt 2", Duration::from_secs(60), || async {
        (0..DELAYS_MS.len())
            .all(|i| s.runs(&format!("d{i}")).iter().any(|(a, _)| *a == 2))
            .then_some(())
    })
    .await;
    s.settle(worker).await;
    let mut redelivered = 0;
    for i in 0..DELAYS_MS.len() {
        redelivered += s.check(&format!("d{i}")) - 1;
    }
    eprintln!(
        "{redelivered} attempt-1 redeliveries; ledger: {:?}",
        common::read_ledger(&s.ledger)
    );
    s.close().await;
}
