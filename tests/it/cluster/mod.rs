//! Cluster faults on a private three-node RabbitMQ cluster (tests/support/cluster.rs), started
//! once for this binary; the tests take turns (`Cluster::lock`). Clients and fixture worker
//! processes are given all three URLs, so they fail over when the node they use dies.
//!
//! * `enqueue::enqueue_through_a_leader_kill`: 20,000 enqueues from 16 callers while the
//!   leader of the service's quorum queue is SIGKILLed and restarted: no enqueue fails, every
//!   acknowledged enqueue runs, and every second run of a task is marked (redelivered or
//!   attempt > 1).
//! * `jobs::split_job_through_a_node_kill`: a 200-part split job whose part queue's node is
//!   SIGKILLed mid-job and restarted: the hook fires once, with all 200 results in order.
//! * `invoke::invokes_through_a_node_kill`: 64 invokes in flight while the service queue's
//!   leader is killed: each returns by its deadline + 1 s, with its result or a timeout.
//! * `retries::retries_through_a_kill_of_another_node` /
//!   `retries::retries_through_a_kill_of_the_delay_node`: 200 tasks whose attempt 1 fails and
//!   whose retry (1 s later, through delay levels of the test's own on the node of
//!   `warren.delay.due`) succeeds, while the service's node, or the delay node, is SIGKILLed
//!   and restarted: every task succeeds, any re-run is marked; with the delay node killed,
//!   retries wait until it is back and those moving between delay queues at the crash may be
//!   lost (asserted: only those).
//! * `retries::retries_through_a_kill_of_the_mirrored_delay_node`: the same with the delay
//!   queues mirrored on every node by a policy (docs/scaling.md): no retry is lost, and every
//!   task succeeds while the delay node is still down.
//! * `jobs::fan_in_through_a_node_kill`: 100 targets while the fan-in's part queue's node is
//!   killed: the final callback fires once, with all 100 outcomes in order.
//! * `topics_chains::topic_through_a_node_kill`: 200 publishes while the subscription's leader
//!   is killed: every confirmed publish is received, re-runs marked.
//! * `topics_chains::chains_through_a_node_kill`: 20 chains of 3 steps while the service
//!   queue's leader is killed: each ends with the right result (read from a Redis status
//!   store), every step ran, re-runs marked.
//! * `held::a_kept_hold_channel_holds_no_unacked_messages`: a join's hold channel, kept after
//!   its part queue's delete, carries no unacknowledged delivery (`rabbitmqctl
//!   list_channels`): the channel is cleared before it is reused.
//! * `broker_facts::queues_with_their_node_down`: what the broker itself does (raw lapin) with
//!   a classic queue whose home node is down and a quorum queue whose leader died; printed
//!   for the record, and the recoveries asserted.
//!
//! This module holds the helpers the tests share; `scene` the setting of a test ([`Scene`]).

mod broker_facts;
mod enqueue;
mod held;
mod invoke;
mod jobs;
mod retries;
mod scene;
mod topics_chains;

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use warren_core::Broker;

use crate::common::read_ledger;
use scene::{DropOnCluster, Scene, Turn};

/// Polls `check` every 50 ms until it is true; panics with `what` after `deadline`.
async fn wait_for(what: &str, deadline: Duration, mut check: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + deadline;
    while !check() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Messages ready in `queue`, or `None` while it cannot be read or does not exist.
async fn ready_in(broker: &Broker, queue: &str) -> Option<u32> {
    broker
        .queue_stats(queue)
        .await
        .ok()
        .flatten()
        .map(|s| s.ready)
}

/// Whether `queue` exists and has no message ready.
async fn is_idle(broker: &Broker, queue: &str) -> bool {
    ready_in(broker, queue).await == Some(0)
}

/// Polls every 100 ms until `queue` has no message ready; panics after `deadline`.
async fn wait_drained(broker: &Broker, queue: &str, deadline: Duration) {
    let end = tokio::time::Instant::now() + deadline;
    while !is_idle(broker, queue).await {
        assert!(tokio::time::Instant::now() < end, "service queue drains");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls every `pace` until the ledger holds every key in `want` and, given `idle`, that
/// queue has nothing ready; after `deadline` panics with `stuck(keys missing, idle)`.
async fn wait_all_ran(
    ledger: &Path,
    want: &HashSet<String>,
    idle: Option<(&Broker, &str)>,
    (deadline, pace): (Duration, Duration),
    stuck: impl Fn(usize, bool) -> String,
) {
    let end = tokio::time::Instant::now() + deadline;
    loop {
        let ran: HashSet<String> = read_ledger(ledger).into_iter().map(|l| l.0).collect();
        let missing = want.difference(&ran).count();
        let idle = match idle {
            Some((broker, queue)) => is_idle(broker, queue).await,
            None => true,
        };
        if missing == 0 && idle {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{}",
            stuck(missing, idle)
        );
        tokio::time::sleep(pace).await;
    }
}

/// Awaits the spawned `task` (`what`: the sender, the publisher, …); panics if it does not
/// end within `deadline` or panicked.
async fn join_within<T>(what: &str, deadline: Duration, task: JoinHandle<T>) -> T {
    tokio::time::timeout(deadline, task)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {deadline:?}"))
        .unwrap_or_else(|e| panic!("{what} failed: {e}"))
}

/// What the sending tasks of a test record: which sends (by index `i`, key `k<i>`) the
/// broker acknowledged, and which failed, when (ms since `start`) and how.
struct Sends {
    start: Instant,
    sent: Mutex<Vec<usize>>,
    errors: Mutex<Vec<(usize, u128, String)>>,
}

impl Sends {
    fn new() -> Sends {
        Sends {
            start: Instant::now(),
            sent: Mutex::default(),
            errors: Mutex::default(),
        }
    }

    /// Records the outcome of send `i`.
    fn record<T, E: Display>(&self, i: usize, outcome: Result<T, E>) {
        match outcome {
            Ok(_) => self.sent.lock().unwrap().push(i),
            Err(e) => self.errors.lock().unwrap().push((
                i,
                self.start.elapsed().as_millis(),
                format!("{e:#}"),
            )),
        }
    }

    /// Spawns a sender that runs `send(i)` for each `i` in `0..n`, one every `pace`, and
    /// records each outcome.
    fn spawn_paced<T, E, Fut>(
        self: &Arc<Self>,
        n: usize,
        pace: Duration,
        send: impl Fn(usize) -> Fut + Send + 'static,
    ) -> JoinHandle<()>
    where
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: Display + Send + 'static,
    {
        let sends = self.clone();
        tokio::spawn(async move {
            let mut pace = tokio::time::interval(pace);
            for i in 0..n {
                pace.tick().await;
                sends.record(i, send(i).await);
            }
        })
    }

    /// How many sends were acknowledged so far.
    fn count(&self) -> usize {
        self.sent.lock().unwrap().len()
    }

    /// The keys `k<i>` of the sends acknowledged so far.
    fn keys(&self) -> HashSet<String> {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .map(|i| format!("k{i}"))
            .collect()
    }

    /// The failed sends, taken: `(index, ms since start, error)`.
    fn take_errors(&self) -> Vec<(usize, u128, String)> {
        std::mem::take(&mut *self.errors.lock().unwrap())
    }

    /// The failed sends, taken, as `k<i>: <error>`.
    fn take_error_lines(&self) -> Vec<String> {
        self.take_errors()
            .into_iter()
            .map(|(i, _, e)| format!("k{i}: {e}"))
            .collect()
    }
}

/// Ledger runs per key: `(attempt, redelivered)` in ledger order.
fn runs_by_key(ledger: &Path) -> HashMap<String, Vec<(u32, bool)>> {
    let mut runs: HashMap<String, Vec<(u32, bool)>> = HashMap::new();
    for (k, attempt, red) in read_ledger(ledger) {
        runs.entry(k).or_default().push((attempt, red));
    }
    runs
}

/// Re-runs in the ledger: (all of them, those neither redelivered nor a later attempt).
fn duplicates(runs: &HashMap<String, Vec<(u32, bool)>>) -> (usize, Vec<String>) {
    let mut dups = 0;
    let mut unmarked = Vec::new();
    for (k, r) in runs {
        dups += r.len() - 1;
        if r[1..].iter().any(|&(attempt, red)| !red && attempt <= 1) {
            unmarked.push(format!("{k}: {r:?}"));
        }
    }
    unmarked.sort();
    (dups, unmarked)
}
