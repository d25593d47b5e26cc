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
//! * `jobs::fan_in_through_a_node_kill`: 100 targets while the fan-in's part queue's node is
//!   killed: the final callback fires once, with all 100 outcomes in order.
//! * `topics_chains::topic_through_a_node_kill`: 200 publishes while the subscription's leader
//!   is killed: every confirmed publish is received, re-runs marked.
//! * `topics_chains::chains_through_a_node_kill`: 20 chains of 3 steps while the service
//!   queue's leader is killed: each ends with the right result (read from a Redis status
//!   store), every step ran, re-runs marked.
//! * `broker_facts::queues_with_their_node_down`: what the broker itself does (raw lapin) with
//!   a classic queue whose home node is down and a quorum queue whose leader died; printed
//!   for the record, and the recoveries asserted.
//!
//! This module holds the helpers the tests share.

mod broker_facts;
mod enqueue;
mod invoke;
mod jobs;
mod retries;
mod topics_chains;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use warren::{Client, QueueType};
use warren_core::{Broker, ReconnectPolicy};

use crate::common::{config_for, read_ledger};

async fn client_for(urls: &str) -> Client {
    Client::builder()
        .amqp(config_for(urls, QueueType::Quorum))
        .connect()
        .await
        .expect("client connects to the cluster")
}

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

/// Deletes queues and exchanges on the cluster when dropped, even if the test panicked.
struct DropOnCluster {
    urls: String,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Drop for DropOnCluster {
    fn drop(&mut self) {
        let cfg = config_for(&self.urls, QueueType::Classic).with_reconnect(ReconnectPolicy {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            give_up_after: Some(Duration::from_secs(10)),
        });
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(broker) = Broker::connect(cfg).await else {
                    return;
                };
                for q in &queues {
                    let _ = broker.delete_queue(q).await;
                }
                for x in &exchanges {
                    let _ = broker.delete_exchange(x).await;
                }
                broker.close().await;
            });
        })
        .join();
    }
}
