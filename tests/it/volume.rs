//! Sustained volume without growing broker state: 5,000 split jobs of 10 parts run through
//! two worker processes on a private node. Every job's hook fires exactly once; once the
//! joins' completion window has passed, the broker holds only the baseline queues (service,
//! dead-letter and the service's done-marker queue, whose markers expire) and its memory is
//! back within 10 % of what it was before
//! the run. A private node keeps the counts and the memory figure free of other tests.

use crate::common;
use crate::support;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use common::{config_for, ledger_path, unique, FixtureWorker};
use futures_util::StreamExt;
use support::broker_node::BrokerNode;
use warren::{Client, QueueType, Target, Task};

const JOBS: usize = 5_000;
const PARTS: u64 = 10;
/// The workers' completion window, shortened so the test does not wait the default.
const WINDOW: Duration = Duration::from_secs(3);

async fn queues(node: &BrokerNode) -> BTreeSet<String> {
    node.rabbitmqctl(&["list_queues", "-q", "--no-table-headers", "name"])
        .await
        .expect("list_queues")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The node's total memory in bytes after a full garbage collection of every process.
async fn memory(node: &BrokerNode) -> u64 {
    let out = node
        .rabbitmqctl(&[
            "eval",
            "[erlang:garbage_collect(P) || P <- erlang:processes()], erlang:memory(total).",
        ])
        .await
        .expect("rabbitmqctl eval");
    out.trim().parse().expect("a byte count")
}

/// With VOLUME_BREAKDOWN set, prints the node's memory by category (for a failing run).
async fn breakdown(node: &BrokerNode) {
    if std::env::var("VOLUME_BREAKDOWN").is_ok() {
        eprintln!(
            "{}",
            node.rabbitmqctl(&["eval", "rabbit_vm:memory()."])
                .await
                .unwrap()
        );
    }
}

fn hooks_by_cid(path: &Path) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for l in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let mut it = l.splitn(3, ' ');
        if let (Some(m), Some(c), Some(p)) = (it.next(), it.next(), it.next()) {
            out.entry(c.to_owned())
                .or_default()
                .push(format!("{m} {p}"));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_split_jobs_leave_no_broker_state() {
    // Quorum queues keep recent log entries in memory (ETS) until their write-ahead log rolls
    // over, 512 MB by default: a small WAL makes the node's memory show what is *kept*, not
    // what is merely not flushed yet (docs/scaling.md).
    let node = BrokerNode::start_with_config("raft.wal_max_size_bytes = 1000000\n")
        .await
        .expect("private node starts");
    let url = node.amqp_url();
    let svc = unique("volume");
    let ledger = ledger_path("volume");
    let hooks = ledger.with_extension("hooks");
    let env = [
        ("FIXTURE_HOOKS", hooks.display().to_string()),
        (
            "FIXTURE_COMPLETION_WINDOW_MS",
            WINDOW.as_millis().to_string(),
        ),
        // The abandoned-job window (the fixture's default is 60 s). All 5,000 split tasks
        // are queued at once, so a job's part queue may wait longer than 60 s for its parts
        // behind the others' while the suite's other tests share the 2 cores; publishing a
        // result does not count as a use of the queue (RabbitMQ's `x-expires`), so with a
        // short window the queue of a slow job expires and its results are dropped as a
        // finished job's. This test is about what finished jobs leave, not abandoned ones.
        ("FIXTURE_PART_EXPIRY_MS", "1800000".to_owned()),
    ];
    let workers = [
        FixtureWorker::start_with(&url, &svc, QueueType::Quorum, &ledger, 16, &env).await,
        FixtureWorker::start_with(&url, &svc, QueueType::Quorum, &ledger, 16, &env).await,
    ];
    let client = Client::builder()
        .amqp(config_for(&url, QueueType::Quorum))
        .connect()
        .await
        .unwrap();
    // One warm-up job, so the baseline holds every queue a run needs (the delay queues of
    // a retry would be among them).
    let warm = client
        .enqueue(
            Task::new(format!("{svc}.sum"), &serde_json::json!({"n": 2, "ms": 0}))
                .on_complete(Target::new(&svc, "done").unwrap()),
        )
        .await
        .unwrap();
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    while !hooks_by_cid(&hooks).contains_key(&warm.cid) {
        assert!(
            tokio::time::Instant::now() < end,
            "warm-up job did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let baseline_queues = wait_for_queues(&node, None, Duration::from_secs(60)).await;
    let before = memory(&node).await;
    breakdown(&node).await;
    eprintln!("baseline: {} queues, {before} bytes", baseline_queues.len());

    let started = std::time::Instant::now();
    let cids: Vec<String> = futures_util::stream::iter(0..JOBS)
        .map(|i| {
            let client = client.clone();
            let svc = svc.clone();
            async move {
                let cid = format!("v{i}");
                let task = Task::new(
                    format!("{svc}.sum"),
                    &serde_json::json!({"n": PARTS, "ms": 0}),
                )
                .with_cid(&cid)
                .on_complete(Target::new(&svc, "done").unwrap())
                .on_error(Target::new(&svc, "failed").unwrap());
                client.enqueue(task).await.expect("enqueue");
                cid
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let end = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        let fired = hooks_by_cid(&hooks);
        let done = cids.iter().filter(|c| fired.contains_key(*c)).count();
        if done == JOBS {
            break;
        }
        if tokio::time::Instant::now() >= end {
            // What a stuck job left, for the next reader of a failed run.
            let missing: Vec<&String> = cids.iter().filter(|c| !fired.contains_key(*c)).collect();
            let parts: Vec<String> = queues(&node)
                .await
                .into_iter()
                .filter(|q| q.starts_with("part."))
                .collect();
            panic!(
                "only {done} of {JOBS} jobs joined; not joined: {:?}; part queues left: {parts:?}",
                &missing[..missing.len().min(10)]
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{JOBS} jobs of {PARTS} parts in {secs:.1} s ({:.0} jobs/s)",
        JOBS as f64 / secs
    );
    let expected: Vec<u64> = (0..PARTS).map(|i| i * i).collect();
    let expected = format!("done {}", serde_json::to_string(&expected).unwrap());
    let fired = hooks_by_cid(&hooks);
    for cid in &cids {
        if fired[cid] != vec![expected.clone()] {
            let runs: Vec<_> = common::read_ledger(&ledger)
                .into_iter()
                .filter(|(k, _, _)| k.starts_with(&format!("{cid}/")))
                .collect();
            panic!("job {cid}: {} hooks; part runs: {runs:?}", fired[cid].len());
        }
    }

    // After the completion window, only the baseline queues are left.
    let left = wait_for_queues(
        &node,
        Some(&baseline_queues),
        WINDOW + Duration::from_secs(60),
    )
    .await;
    assert_eq!(left, baseline_queues, "per-job queues left behind");
    // Memory settles as the broker's background work catches up (quorum log entries leave
    // memory when the WAL rolls over; metrics of deleted queues and closed channels are
    // collected every 120 s): poll it, with a deadline past one metrics collection.
    let end = tokio::time::Instant::now() + Duration::from_secs(150);
    let after = loop {
        let now = memory(&node).await;
        if now as f64 <= before as f64 * 1.10 || tokio::time::Instant::now() >= end {
            break now;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    breakdown(&node).await;
    eprintln!(
        "memory before {before} bytes, after {after} bytes ({:+.1} %)",
        (after as f64 - before as f64) * 100.0 / before as f64
    );
    assert!(
        (after as f64) <= before as f64 * 1.10,
        "broker memory grew from {before} to {after} bytes"
    );
    for w in workers {
        assert!(w.terminate().await, "worker exits cleanly");
    }
    client.close().await;
}

/// Polls the node's queue list until it equals `want` (or, with `None`, holds no per-job
/// queue), and returns it; fails at the deadline with what is left.
async fn wait_for_queues(
    node: &BrokerNode,
    want: Option<&BTreeSet<String>>,
    deadline: Duration,
) -> BTreeSet<String> {
    let end = tokio::time::Instant::now() + deadline;
    loop {
        let now = queues(node).await;
        let per_job = |q: &String| q.starts_with("part.");
        let settled = match want {
            Some(w) => &now == w,
            None => !now.iter().any(per_job),
        };
        if settled {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "queues did not settle: {} left, e.g. {:?}",
            now.len(),
            now.iter()
                .filter(|q| per_job(q))
                .take(5)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
