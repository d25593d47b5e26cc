//! Split jobs across real worker processes: 1, 7 and 500 parts over three workers, and a
//! 200-part job whose workers are SIGKILLed at random points at least 20 times (some at the
//! moment the join runs). The hook ledger must show exactly one oncomplete per job, with
//! every result in `part_id` order, and no part queue may be left behind.

use crate::common;

use std::path::PathBuf;
use std::time::Duration;

use common::{config, hook_lines, ledger_path, unique, Cleanup, FixtureWorker};
use rand::Rng;
use serde_json::Value;
use warren::{Client, QueueType, Target, Task};

struct Setup {
    url: String,
    svc: String,
    ledger: PathBuf,
    hooks: PathBuf,
    client: Client,
    jobs: std::sync::Mutex<Vec<String>>,
    _cleanup: Cleanup,
}

impl Setup {
    async fn new() -> Self {
        let url = common::url();
        let svc = unique("splitp");
        let ledger = ledger_path("parts");
        let hooks = ledger.with_extension("hooks");
        let client = Client::builder()
            .amqp(config(QueueType::Quorum))
            .connect()
            .await
            .unwrap();
        let cleanup = Cleanup::new(&[&svc]);
        Self {
            url,
            svc,
            ledger,
            hooks,
            client,
            jobs: std::sync::Mutex::default(),
            _cleanup: cleanup,
        }
    }

    async fn worker(&self, concurrency: usize) -> FixtureWorker {
        let env = [
            ("FIXTURE_HOOKS", self.hooks.display().to_string()),
            ("FIXTURE_COMPLETION_WINDOW_MS", "30000".to_owned()),
        ];
        FixtureWorker::start_with(
            &self.url,
            &self.svc,
            QueueType::Quorum,
            &self.ledger,
            concurrency,
            &env,
        )
        .await
    }

    /// Stops the workers (they drain: late duplicates of parts finish first), then removes
    /// the jobs' queues, done markers included.
    async fn finish(self, workers: Vec<FixtureWorker>) {
        for w in workers {
            assert!(w.terminate().await, "worker exits cleanly");
        }
        let jobs = std::mem::take(&mut *self.jobs.lock().unwrap());
        for pq in jobs {
            common::cleanup_job(&self.url, &pq).await;
        }
        self.client.close().await;
    }

    /// Enqueues a split job; returns (cid, part queue name).
    async fn job(&self, n: u64, ms: u64) -> (String, String) {
        let cid = unique("job");
        let task = Task::new(
            format!("{}.sum", self.svc),
            &serde_json::json!({"n": n, "ms": ms}),
        )
        .with_cid(&cid)
        .on_complete(Target::new(&self.svc, "done").unwrap())
        .on_error(Target::new(&self.svc, "failed").unwrap());
        let r = self.client.enqueue(task).await.unwrap();
        (cid, format!("part.{}-sum-{}", self.svc, r.id))
    }

    /// Waits for the job's hook, the part queue's removal and an idle service queue, then
    /// returns every hook line for `cid`.
    async fn settle(
        &self,
        cid: &str,
        part_queue: &str,
        deadline: Duration,
    ) -> Vec<(String, Value)> {
        let end = tokio::time::Instant::now() + deadline;
        let broker = self.client.broker();
        loop {
            let fired = !hook_lines(&self.hooks, cid).is_empty();
            let gone = broker.queue_stats(part_queue).await.unwrap().is_none();
            let idle = broker
                .queue_stats(&format!("warren.svc.{}", self.svc))
                .await
                .unwrap()
                .is_some_and(|s| s.ready == 0);
            if fired && gone && idle {
                self.jobs.lock().unwrap().push(part_queue.to_owned());
                return hook_lines(&self.hooks, cid);
            }
            assert!(
                tokio::time::Instant::now() < end,
                "job {cid} did not finish (hook {fired}, part queue gone {gone}, idle {idle})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn squares(n: u64) -> Value {
    Value::Array((0..n).map(|i| Value::from(i * i)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_jobs_across_three_worker_processes() {
    let s = Setup::new().await;
    let workers = [s.worker(8).await, s.worker(8).await, s.worker(8).await];
    for n in [1u64, 7, 500] {
        let (cid, pq) = s.job(n, 0).await;
        let hooks = s.settle(&cid, &pq, Duration::from_secs(120)).await;
        assert_eq!(
            hooks.len(),
            1,
            "{n} parts: exactly one hook, got {}",
            hooks.len()
        );
        assert_eq!(hooks[0].0, "done");
        assert_eq!(
            hooks[0].1,
            squares(n),
            "{n} parts: every result, in part order"
        );
    }
    s.finish(workers.into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_twenty_times_during_a_200_part_job() {
    const N: u64 = 200;
    let s = Setup::new().await;
    let mut workers = vec![s.worker(3).await, s.worker(3).await];
    let (cid, pq) = s.job(N, 250).await;
    let broker = s.client.broker().clone();
    let mut kills = 0;
    let mut kills_near_join = 0;
    let mut rng = rand::rng();
    // Kill a random worker at random moments while parts run, restarting it each time.
    while kills < 20 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..250))).await;
        let victim = workers.swap_remove(rng.random_range(0..workers.len()));
        victim.kill9().await;
        kills += 1;
        workers.push(s.worker(3).await);
        if !hook_lines(&s.hooks, &cid).is_empty() {
            break;
        }
    }
    // Then kill both workers the moment (nearly) all results are in: the join is running.
    for _ in 0..3 {
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let ready = broker
                .queue_stats(&pq)
                .await
                .unwrap()
                .map_or(0, |q| q.ready);
            if ready as u64 >= N - 2
                || !hook_lines(&s.hooks, &cid).is_empty()
                || tokio::time::Instant::now() > end
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if !hook_lines(&s.hooks, &cid).is_empty() {
            break;
        }
        for w in workers.drain(..) {
            w.kill9().await;
            kills += 1;
            kills_near_join += 1;
        }
        workers.push(s.worker(3).await);
        workers.push(s.worker(3).await);
    }
    let hooks = s.settle(&cid, &pq, Duration::from_secs(180)).await;
    eprintln!("{kills} kills ({kills_near_join} with the join due)");
    assert!(kills >= 20);
    assert_eq!(hooks.len(), 1, "exactly one oncomplete: {hooks:?}");
    assert_eq!(hooks[0].0, "done");
    assert_eq!(hooks[0].1, squares(N));
    // Every part ran (at least once) and no part queue is left.
    let ran: std::collections::HashSet<String> = common::read_ledger(&s.ledger)
        .into_iter()
        .map(|(k, _, _)| k)
        .collect();
    assert!((0..N).all(|i| ran.contains(&format!("{cid}/{i}"))));
    assert!(broker.queue_stats(&pq).await.unwrap().is_none());
    s.finish(workers).await;
}

/// A split task redelivered after its worker died while publishing parts publishes them all
/// again: every part that then runs twice must be marked (`ctx.redelivered()` or attempt > 1)
/// on all but one of its runs, and the job still joins exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_splitter_marks_every_part_it_sends_again() {
    const N: u64 = 3000;
    let s = Setup::new().await;
    let first = s.worker(4).await;
    let (cid, pq) = s.job(N, 0).await;
    // Kill the worker as soon as its first part ran: it is still publishing the other parts,
    // and its split task is not acked yet.
    let prefix = format!("{cid}/");
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    while !common::read_ledger(&s.ledger)
        .iter()
        .any(|(k, _, _)| k.starts_with(&prefix))
    {
        assert!(tokio::time::Instant::now() < end, "no part ran");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    first.kill9().await;
    let second = s.worker(4).await;
    let hooks = s.settle(&cid, &pq, Duration::from_secs(180)).await;
    assert_eq!(hooks.len(), 1, "exactly one oncomplete: {hooks:?}");
    assert_eq!(hooks[0].1, squares(N));
    let mut runs: std::collections::HashMap<String, Vec<(u32, bool)>> = Default::default();
    for (k, attempt, redelivered) in common::read_ledger(&s.ledger) {
        if k.starts_with(&prefix) {
            runs.entry(k).or_default().push((attempt, redelivered));
        }
    }
    assert_eq!(runs.len() as u64, N, "every part ran");
    let total: usize = runs.values().map(Vec::len).sum();
    let marked = runs
        .values()
        .flatten()
        .filter(|(attempt, redelivered)| *redelivered || *attempt > 1)
        .count();
    eprintln!("{N} parts, {total} runs, {marked} marked");
    assert!(
        total as u64 > N,
        "the split task was not redelivered: the kill came after its ack"
    );
    for (part, r) in &runs {
        let unmarked = r.iter().filter(|(a, red)| *a == 1 && !red).count();
        assert!(unmarked <= 1, "{part} re-ran unmarked: {r:?}");
    }
    s.finish(vec![second]).await;
}

/// A split task delivered again after its job joined (its worker died before acking it, the
/// broker hands it out again) finds the job's done marker and does nothing: no second hook,
/// no part queue re-created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_task_redelivered_after_its_join_does_nothing() {
    use lapin::options::{BasicGetOptions, BasicPublishOptions, BasicRejectOptions};
    let s = Setup::new().await;
    let first = s.worker(4).await;
    let (cid, pq) = s.job(5, 0).await;
    let hooks = s.settle(&cid, &pq, Duration::from_secs(60)).await;
    assert_eq!(hooks.len(), 1);
    first.kill9().await;
    // The same split task again (same id, payload, cid and hooks), made a redelivery: taken
    // once without an ack and put back.
    let id: uuid::Uuid = pq.rsplit_once("-sum-").unwrap().1.parse().unwrap();
    let mut env = warren::wire::Envelope::new(
        &Target::new(&s.svc, "sum").unwrap(),
        serde_json::json!({"n": 5, "ms": 0}),
        Some(cid.clone()),
    );
    env.id = id;
    env.hooks.oncomplete = Some(warren::wire::HookTarget {
        svc: s.svc.clone(),
        method: "done".into(),
    });
    env.hooks.onerror = Some(warren::wire::HookTarget {
        svc: s.svc.clone(),
        method: "failed".into(),
    });
    let queue = format!("warren.svc.{}", s.svc);
    let conn = lapin::Connection::connect(&s.url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "".into(),
        queue.as_str().into(),
        BasicPublishOptions::default(),
        &env.to_bytes().unwrap(),
        lapin::BasicProperties::default().with_message_id(id.to_string().into()),
    )
    .await
    .unwrap();
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    let got = loop {
        if let Some(m) = ch
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
        {
            break m;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "the split task never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(got
        .delivery
        .acker
        .reject(BasicRejectOptions { requeue: true })
        .await
        .unwrap());
    conn.close(200, "done".into()).await.unwrap();
    // One task at a time: the redelivered split task runs before a sentinel sent after it.
    let second = s.worker(1).await;
    s.client
        .enqueue(Task::new(
            format!("{}.work", s.svc),
            &serde_json::json!({"key": "sentinel"}),
        ))
        .await
        .unwrap();
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    while !common::read_ledger(&s.ledger)
        .iter()
        .any(|(k, _, _)| k == "sentinel")
    {
        assert!(tokio::time::Instant::now() < end, "the sentinel never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(hook_lines(&s.hooks, &cid).len(), 1, "no second hook");
    assert!(
        s.client.broker().queue_stats(&pq).await.unwrap().is_none(),
        "the redelivered split task did not re-create the job"
    );
    let reruns = common::read_ledger(&s.ledger)
        .iter()
        .filter(|(k, _, _)| k.starts_with(&format!("{cid}/")))
        .count();
    assert_eq!(reruns, 5, "no part ran again");
    s.finish(vec![second]).await;
}
