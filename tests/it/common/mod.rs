//! Shared helpers for warren's integration tests: unique names, configs, polling, cleanup.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use warren::Task;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use warren_core::{AmqpConfig, Broker, QueueType, ReconnectPolicy};

/// The shared broker's URL (WARREN_AMQP_URL or the local default).
pub fn url() -> String {
    std::env::var("WARREN_AMQP_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A config for `url` with the queue type and short timeouts suited to tests.
pub fn config_for(url: &str, qt: QueueType) -> AmqpConfig {
    AmqpConfig::new(url)
        .expect("test URL parses")
        .with_queue_type(qt)
        .with_reconnect(ReconnectPolicy {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            give_up_after: Some(Duration::from_secs(60)),
        })
}

/// A config for the shared broker.
pub fn config(qt: QueueType) -> AmqpConfig {
    config_for(&url(), qt)
}

/// A unique service name for one test.
pub fn unique(prefix: &str) -> String {
    format!(
        "t-{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Polls `check` every 20 ms until it returns `Some`, or fails after `deadline`.
pub async fn poll<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Deletes the queues of `services` (service, dead-letter and done-marker queues).
pub async fn cleanup(url: &str, services: &[&str]) {
    let Ok(broker) = Broker::connect(config_for(url, QueueType::Classic)).await else {
        return;
    };
    for svc in services {
        for q in [format!("warren.svc.{svc}"), format!("warren.dead.{svc}")] {
            let _ = broker.delete_queue(&q).await;
        }
        // Done-marker queues, named by the workers' completion window (the ones tests use).
        for ms in [3_000u64, 30_000, 300_000] {
            let _ = broker
                .delete_queue(&format!("warren.done.{svc}.{ms}"))
                .await;
        }
    }
    broker.close().await;
}

/// A test's own delay levels (`DelayLevels::for_test(name, speedup)`), so it can count what
/// waits in them; their queues and exchanges are deleted when dropped. Processes that send
/// the test's delayed tasks or retries use [`TestLevels::config`] (fixture workers:
/// [`TestLevels::fixture_env`]).
pub struct TestLevels {
    pub levels: warren::delay::DelayLevels,
    name: String,
    speedup: u32,
    url: String,
}

impl TestLevels {
    pub fn new(name: &str, speedup: u32) -> Self {
        Self {
            levels: warren::delay::DelayLevels::for_test(name, speedup).expect("a valid name"),
            name: name.to_owned(),
            speedup,
            url: url(),
        }
    }

    /// `config(qt)` sending delays through these levels.
    pub fn config(&self, qt: QueueType) -> AmqpConfig {
        config(qt).with_delay_levels(self.levels.clone())
    }

    /// The fixture worker's environment for these levels.
    pub fn fixture_env(&self) -> (&'static str, String) {
        (
            "FIXTURE_DELAY_LEVELS",
            format!("{}:{}", self.name, self.speedup),
        )
    }

    /// Messages ready in each level queue, level 0 first (0 for a level not declared yet).
    /// Read from the top level down: messages only move down, so one in transit is never
    /// missed (it may be counted twice).
    pub async fn ready(&self, broker: &Broker) -> Vec<u32> {
        let mut out = Vec::new();
        for q in self.levels.names().into_iter().rev() {
            out.push(broker.queue_stats(&q).await.unwrap().map_or(0, |s| s.ready));
        }
        out.reverse();
        out
    }

    /// Messages waiting in all levels.
    pub async fn waiting(&self, broker: &Broker) -> u32 {
        self.ready(broker).await.iter().sum()
    }
}

impl Drop for TestLevels {
    fn drop(&mut self) {
        let url = self.url.clone();
        let names = self.levels.names();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(broker) = Broker::connect(config_for(&url, QueueType::Classic)).await else {
                    return;
                };
                for n in names.iter().rev() {
                    let _ = broker.delete_queue(n).await;
                    let _ = broker.delete_exchange(n).await;
                }
                broker.close().await;
            });
        })
        .join();
    }
}

/// Deletes a test's queues when dropped, even if the test panicked.
pub struct Cleanup {
    pub url: String,
    pub services: Vec<String>,
}

impl Cleanup {
    pub fn new(services: &[&str]) -> Self {
        Self::on(&url(), services)
    }
    pub fn on(url: &str, services: &[&str]) -> Self {
        Self {
            url: url.to_owned(),
            services: services.iter().map(|s| (*s).to_owned()).collect(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let url = self.url.clone();
        let services = std::mem::take(&mut self.services);
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let names: Vec<&str> = services.iter().map(String::as_str).collect();
                rt.block_on(cleanup(&url, &names));
            }
        })
        .join();
    }
}

/// A fixture worker process (tests/fixtures/worker.rs).
pub struct FixtureWorker {
    pub child: Child,
}

impl FixtureWorker {
    /// Starts the fixture worker hosting `svc`, appending to `ledger`; returns once it
    /// printed READY (it is consuming).
    pub async fn start(
        url: &str,
        svc: &str,
        qt: QueueType,
        ledger: &Path,
        concurrency: usize,
    ) -> Self {
        Self::start_with(url, svc, qt, ledger, concurrency, &[]).await
    }

    /// Like [`FixtureWorker::start`], with extra environment (FIXTURE_HOOKS, lease, ...).
    pub async fn start_with(
        url: &str,
        svc: &str,
        qt: QueueType,
        ledger: &Path,
        concurrency: usize,
        env: &[(&str, String)],
    ) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_warren-fixture-worker"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("WARREN_AMQP_URL", url)
            .env("FIXTURE_SVC", svc)
            .env("FIXTURE_QUEUE_TYPE", qt.as_str())
            .env("FIXTURE_LEDGER", ledger)
            .env("FIXTURE_CONCURRENCY", concurrency.to_string())
            .env(
                "RUST_LOG",
                std::env::var("FIXTURE_RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("fixture worker starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.trim() == "READY" {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(
            matches!(ready, Ok(true)),
            "fixture worker did not become ready"
        );
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id().expect("running child has a pid")).expect("pid fits i32")
    }

    /// SIGKILL, and reap.
    pub async fn kill9(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// SIGTERM, then wait for a clean exit; returns the exit success.
    pub async fn terminate(mut self) -> bool {
        let pid = self.pid();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        match tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await {
            Ok(Ok(status)) => status.success(),
            _ => false,
        }
    }
}

/// A ledger file in a fresh temp dir.
pub fn ledger_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("warren-test-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(format!("{name}.ledger"))
}

/// Ledger lines `id attempt redelivered`, parsed.
pub fn read_ledger(path: &Path) -> Vec<(String, u32, bool)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((
                it.next()?.to_owned(),
                it.next()?.parse().ok()?,
                it.next()? == "true",
            ))
        })
        .collect()
}

/// Enqueues `work` tasks with keys `k<i>` for the fixture worker's ledger.
pub async fn enqueue_work(
    client: &warren::Client,
    svc: &str,
    keys: std::ops::Range<usize>,
    ms: u64,
) {
    for i in keys {
        client
            .enqueue(Task::new(
                format!("{svc}.work"),
                &serde_json::json!({"key": format!("k{i}"), "ms": ms}),
            ))
            .await
            .expect("enqueue succeeds (across reconnects if need be)");
    }
}

/// Waits until the ledger has at least `at_least` lines.
pub async fn wait_lines(ledger: &Path, at_least: usize, deadline: Duration) {
    let end = tokio::time::Instant::now() + deadline;
    while read_ledger(ledger).len() < at_least {
        assert!(
            tokio::time::Instant::now() < end,
            "ledger stuck below {at_least} lines"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `n` distinct keys are in the ledger.
pub async fn wait_keys(ledger: &Path, n: usize, deadline: Duration) {
    let end = tokio::time::Instant::now() + deadline;
    loop {
        let keys: HashSet<String> = read_ledger(ledger).into_iter().map(|(k, _, _)| k).collect();
        if keys.len() >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "only {} of {n} tasks ran",
            keys.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks that keys `k0..k<n>` all ran and that any second run was a marked redelivery;
/// returns the number of re-executions.
pub fn check_ledger(ledger: &Path, n: usize) -> usize {
    let mut runs: HashMap<String, Vec<bool>> = HashMap::new();
    for (k, _, redelivered) in read_ledger(ledger) {
        runs.entry(k).or_default().push(redelivered);
    }
    assert_eq!(runs.len(), n, "every task ran");
    assert!((0..n).all(|i| runs.contains_key(&format!("k{i}"))));
    let mut dups = 0;
    for (k, r) in &runs {
        dups += r.len() - 1;
        assert!(
            r[1..].iter().all(|red| *red),
            "{k} ran again without being a marked redelivery: {r:?}"
        );
    }
    dups
}

/// Deletes the per-job queues of the split job whose part queue is `part_queue` (its done
/// marker outlives the job on purpose, for the completion window).
pub async fn cleanup_job(url: &str, part_queue: &str) {
    let Ok(broker) = Broker::connect(config_for(url, QueueType::Classic)).await else {
        return;
    };
    for q in warren_core::topology::job_queues(part_queue) {
        let _ = broker.delete_queue(&q).await;
    }
    broker.close().await;
}

/// Ready and consumer counts of a service's queue (which must exist).
pub async fn service_stats(broker: &Broker, svc: &str) -> warren_core::QueueStats {
    broker
        .queue_stats(&format!("warren.svc.{svc}"))
        .await
        .expect("queue check")
        .expect("the service queue exists")
}

/// A worker running in the background of a test: cancel `stop`, then await `handle`.
pub struct Running {
    pub stop: tokio_util::sync::CancellationToken,
    pub handle: tokio::task::JoinHandle<Result<(), warren::WorkerError>>,
}

impl Running {
    /// Stops the worker and waits for it; panics unless it stopped cleanly.
    pub async fn stop_cleanly(self) {
        self.stop.cancel();
        self.handle
            .await
            .expect("worker task")
            .expect("worker ran cleanly");
    }
}

/// Runs `worker` until the returned token is cancelled.
pub fn run_in_background(worker: warren::Worker) -> Running {
    let stop = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(worker.run_until(stop.clone().cancelled_owned()));
    Running { stop, handle }
}

/// The fixture worker's hook-file lines of `cid` (`<method> <cid> <payload>`) as
/// (method, payload).
pub fn hook_lines(path: &Path, cid: &str) -> Vec<(String, serde_json::Value)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ' ');
            let (m, c, p) = (it.next()?, it.next()?, it.next()?);
            if c != cid {
                return None;
            }
            Some((m.to_owned(), serde_json::from_str(p).ok()?))
        })
        .collect()
}
