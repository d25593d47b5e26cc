//! Flow control across worker processes (docs/flow.md): a rate limit shared through Redis
//! by three fixture workers, per-key concurrency across them, a SIGKILLed worker's key
//! slot freed by its lease, and the Redis keys going away afterwards.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use common::{config, ledger_path, poll, unique, Cleanup, FixtureWorker, TestLevels};
use futures_util::StreamExt;
use warren::{Client, QueueType, Task};

/// One run of the fixture's `timed` method: name, key, start and end (µs, wall clock).
#[derive(Debug, Clone)]
struct Run {
    name: String,
    key: String,
    start: u128,
    end: u128,
}

fn read_runs(path: &Path) -> Vec<Run> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some(Run {
                name: it.next()?.to_owned(),
                key: it.next()?.to_owned(),
                start: it.next()?.parse().ok()?,
                end: it.next()?.parse().ok()?,
            })
        })
        .collect()
}

fn redis_url() -> String {
    std::env::var("WARREN_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

/// Redis keys under `prefix`.
async fn redis_keys(prefix: &str) -> Vec<String> {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut c)
        .await
        .unwrap()
}

/// Enqueues `n` `timed` tasks named `t<i>`, keyed by `key(i)` when given.
async fn enqueue_timed(
    client: &Client,
    svc: &str,
    n: usize,
    ms: u64,
    key: Option<fn(usize) -> String>,
) {
    futures_util::stream::iter(0..n)
        .map(|i| async move {
            let k = key.map(|f| f(i)).unwrap_or_default();
            let mut task = Task::new(
                format!("{svc}.timed"),
                &serde_json::json!({"name": format!("t{i}"), "key": k, "ms": ms}),
            );
            if key.is_some() {
                task = task.key(k);
            }
            client.enqueue(task).await.unwrap();
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
}

/// Waits until `n` distinct task names are in the times file, then returns its runs.
async fn wait_runs(path: &Path, n: usize, deadline: Duration) -> Vec<Run> {
    poll(&format!("{n} tasks to run"), deadline, || async {
        let runs = read_runs(path);
        let names: HashSet<&str> = runs.iter().map(|r| r.name.as_str()).collect();
        (names.len() >= n).then_some(runs)
    })
    .await
}

/// Every task ran exactly once.
fn assert_once(runs: &[Run], n: usize) {
    let mut count: HashMap<&str, usize> = HashMap::new();
    for r in runs {
        *count.entry(&r.name).or_default() += 1;
    }
    assert_eq!(count.len(), n, "every task ran");
    let twice: Vec<_> = count.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "tasks ran more than once: {twice:?}");
}

/// The most starts in any window of `window` µs (each window starting at a start).
fn max_in_window(runs: &[Run], window: u128) -> usize {
    let mut starts: Vec<u128> = runs.iter().map(|r| r.start).collect();
    starts.sort_unstable();
    let mut best = 0;
    let mut j = 0;
    for (i, s) in starts.iter().enumerate() {
        while starts[j] + window <= *s {
            j += 1;
        }
        best = best.max(i - j + 1);
    }
    best
}

async fn start_workers(svc: &str, ledger: &Path, env: &[(&str, String)]) -> Vec<FixtureWorker> {
    let url = common::url();
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers
            .push(FixtureWorker::start_with(&url, svc, QueueType::Classic, ledger, 8, env).await);
    }
    workers
}

async fn no_keys_left(prefix: &str) {
    poll(
        "the flow keys in Redis to expire",
        Duration::from_secs(10),
        || async { redis_keys(prefix).await.is_empty().then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_across_three_worker_processes() {
    const N: usize = 1_000;
    let svc = unique("rate");
    let _cleanup = Cleanup::new(&[&svc]);
    let prefix = format!("{svc}:");
    let levels = TestLevels::new(&svc, 1);
    let ledger = ledger_path("rate");
    let times = ledger.with_extension("times");
    let env = [
        ("FIXTURE_RATE", "50:1000".to_owned()),
        ("FIXTURE_FLOW_PREFIX", prefix.clone()),
        ("FIXTURE_TIMES", times.display().to_string()),
        levels.fixture_env(),
    ];
    let workers = start_workers(&svc, &ledger, &env).await;
    let client = Client::builder()
        .amqp(config(QueueType::Classic))
        .connect()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    enqueue_timed(&client, &svc, N, 0, None).await;
    // 1,000 starts at 50/s take 20 s.
    let runs = wait_runs(&times, N, Duration::from_secs(90)).await;
    let took = started.elapsed();
    assert_once(&runs, N);
    let max = max_in_window(&runs, 1_000_000);
    eprintln!("rate limit 50/s: {N} tasks in {took:.1?}, at most {max} starts in any 1 s window");
    assert!(
        max <= 55,
        "{max} starts in one 1 s window (limit 50/s + 10 %)"
    );
    assert!(
        took >= Duration::from_secs(19),
        "1,000 tasks at 50/s ran in {took:?}"
    );
    // Nothing failed or was retried: every run was a first attempt (read from the line).
    let attempts = std::fs::read_to_string(&times).unwrap();
    assert!(
        attempts
            .lines()
            .all(|l| l.split_whitespace().nth(4) == Some("1")),
        "a retry ran"
    );
    for w in workers {
        assert!(w.terminate().await);
    }
    no_keys_left(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_run_per_key_at_a_time_across_three_worker_processes() {
    const N: usize = 400;
    let svc = unique("keyed");
    let _cleanup = Cleanup::new(&[&svc]);
    let prefix = format!("{svc}:");
    let levels = TestLevels::new(&svc, 1);
    let ledger = ledger_path("keyed");
    let times = ledger.with_extension("times");
    let env = [
        ("FIXTURE_KEY_CONCURRENCY", "1".to_owned()),
        ("FIXTURE_FLOW_PREFIX", prefix.clone()),
        ("FIXTURE_TIMES", times.display().to_string()),
        levels.fixture_env(),
    ];
    let workers = start_workers(&svc, &ledger, &env).await;
    let client = Client::builder()
        .amqp(config(QueueType::Classic))
        .connect()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    enqueue_timed(&client, &svc, N, 20, Some(|i| format!("key{}", i % 20))).await;
    let runs = wait_runs(&times, N, Duration::from_secs(120)).await;
    eprintln!(
        "key concurrency 1: {N} tasks over 20 keys in {:.1?}",
        started.elapsed()
    );
    assert_once(&runs, N);
    let mut by_key: HashMap<&str, Vec<&Run>> = HashMap::new();
    for r in &runs {
        by_key.entry(&r.key).or_default().push(r);
    }
    assert_eq!(by_key.len(), 20);
    for (key, mut rs) in by_key {
        rs.sort_by_key(|r| r.start);
        for w in rs.windows(2) {
            assert!(
                w[0].end <= w[1].start,
                "two runs of {key} overlap: {:?} and {:?}",
                w[0],
                w[1]
            );
        }
    }
    for w in workers {
        assert!(w.terminate().await);
    }
    no_keys_left(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_key_slot_frees_when_its_lease_ends() {
    let svc = unique("keylease");
    let _cleanup = Cleanup::new(&[&svc]);
    let prefix = format!("{svc}:");
    let levels = TestLevels::new(&svc, 1);
    let ledger = ledger_path("keylease");
    let times = ledger.with_extension("times");
    let lease = Duration::from_secs(3);
    let env = [
        ("FIXTURE_KEY_CONCURRENCY", "1".to_owned()),
        ("FIXTURE_FLOW_PREFIX", prefix.clone()),
        ("FIXTURE_TIMES", times.display().to_string()),
        ("FIXTURE_KEY_LEASE_MS", lease.as_millis().to_string()),
        levels.fixture_env(),
    ];
    let url = common::url();
    let doomed = FixtureWorker::start_with(&url, &svc, QueueType::Classic, &ledger, 4, &env).await;
    let client = Client::builder()
        .amqp(config(QueueType::Classic))
        .connect()
        .await
        .unwrap();
    // A long task (60 s on its first delivery, none when redelivered) holds key `k`; once
    // its slot is in Redis, its worker is killed.
    let long = serde_json::json!({"name": "long", "key": "k", "once_ms": 60_000});
    client
        .enqueue(Task::new(format!("{svc}.timed"), &long).key("k"))
        .await
        .unwrap();
    poll(
        "the long task to hold key k",
        Duration::from_secs(20),
        || async {
            let keys = redis_keys(&prefix).await;
            keys.iter().any(|k| k.ends_with(":k")).then_some(())
        },
    )
    .await;
    doomed.kill9().await;
    let killed = std::time::Instant::now();
    // Another worker gets the next task of key `k` (and the long one, redelivered): the
    // dead worker's slot blocks both until its lease ends, not longer.
    let survivor =
        FixtureWorker::start_with(&url, &svc, QueueType::Classic, &ledger, 4, &env).await;
    let short = serde_json::json!({"name": "short", "key": "k"});
    client
        .enqueue(Task::new(format!("{svc}.timed"), &short).key("k"))
        .await
        .unwrap();
    let runs = wait_runs(&times, 2, Duration::from_secs(30)).await;
    let waited = killed.elapsed();
    eprintln!(
        "key slot of a killed worker: both tasks of its key ran {waited:.1?} after the kill (lease {lease:?})"
    );
    assert!(runs.iter().any(|r| r.name == "short"));
    assert!(runs.iter().any(|r| r.name == "long"));
    // The slot was held (renewed up to a third of a lease before the kill) ...
    assert!(
        waited >= lease / 2,
        "key k was free {waited:?} after the kill"
    );
    // ... and freed by its lease: one lease plus a deferral's wait (at most 3 s).
    // ... and freed by its lease, plus the waiting task's next check (a busy key's wait
    // is at most 3 s) and the second worker's start: about 8 s at most.
    assert!(
        waited <= lease + Duration::from_secs(5),
        "key k blocked for {waited:?} after the kill"
    );
    assert!(survivor.terminate().await);
    no_keys_left(&prefix).await;
}

/// A busy key does not hold up other keys: its waiting tasks wait on the broker, not in the
/// worker's slots, so tasks of 20 other keys run while one key's long task runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_keys_are_not_blocked_behind_a_busy_key() {
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    use warren::{Context, Service, TaskError, Worker};
    type Runs = Arc<Mutex<Vec<(String, Instant, Instant)>>>;
    let svc = unique("keyfair");
    let _cleanup = Cleanup::new(&[&svc]);
    let prefix = format!("{svc}:");
    let runs: Runs = Arc::default();
    let r = runs.clone();
    let service = Service::new(&svc)
        .method("hold", move |_: Context, (key, ms): (String, u64)| {
            let r = r.clone();
            async move {
                let start = Instant::now();
                tokio::time::sleep(Duration::from_millis(ms)).await;
                r.lock().unwrap().push((key, start, Instant::now()));
                Ok::<_, TaskError>(())
            }
        })
        .key_concurrency("hold", 1);
    let store = warren::RedisStore::from_env()
        .unwrap()
        .with_prefix(prefix.clone());
    let worker = Worker::builder()
        .amqp(config(QueueType::Classic))
        .flow_store(std::sync::Arc::new(store))
        .service(service)
        .concurrency(4)
        .build()
        .await
        .unwrap();
    let running = common::run_in_background(worker);
    let client = Client::builder()
        .amqp(config(QueueType::Classic))
        .connect()
        .await
        .unwrap();
    let send = |key: String, ms: u64| {
        let task = Task::new(format!("{svc}.hold"), &(key.clone(), ms)).key(key);
        let client = &client;
        async move { client.enqueue(task).await.unwrap() }
    };
    // Three 1.5 s tasks of key `busy` first, then one short task for each of 20 keys.
    for _ in 0..3 {
        send("busy".to_owned(), 1_500).await;
    }
    for i in 0..20 {
        send(format!("k{i}"), 10).await;
    }
    poll("every task to run", Duration::from_secs(30), || async {
        (runs.lock().unwrap().len() >= 23).then_some(())
    })
    .await;
    let runs = runs.lock().unwrap().clone();
    let mut busy: Vec<_> = runs.iter().filter(|r| r.0 == "busy").collect();
    busy.sort_by_key(|r| r.1);
    assert_eq!(busy.len(), 3);
    assert!(
        busy.windows(2).all(|w| w[0].2 <= w[1].1),
        "runs of key busy overlap"
    );
    let last_other = runs
        .iter()
        .filter(|r| r.0 != "busy")
        .map(|r| r.2)
        .max()
        .unwrap();
    assert!(
        last_other < busy[0].2,
        "the other keys waited for the busy key: last ended {:?} after its first run",
        last_other - busy[0].2
    );
    running.stop.cancel();
    running.handle.await.unwrap().unwrap();
    no_keys_left(&prefix).await;
}
