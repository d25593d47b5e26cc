//! Retries, through their delay levels, while a node is killed: the service's, or the one
//! the delay machinery lives on.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use warren::delay::DelayLevels;
use warren::{QueueType, RetryPolicy, Task};
use warren_core::delay::DUE_QUEUE;
use warren_core::{Broker, Publisher, TaskSender};

use super::{join_within, ready_in, runs_by_key, wait_for, DropOnCluster, Scene, Sends, Turn};
use crate::common::{config_for, read_ledger, unique};
use crate::support::cluster::{Cluster, SIZE};

/// The node the delay machinery lives on: the home of `warren.delay.due` (node 0 if it does
/// not exist yet), and this test's own real-time delay levels `name`, declared through that
/// node alone so that their classic queues live there too (client-local placement).
async fn delay_levels_on_due_home(cluster: &Cluster, name: &str) -> (usize, DelayLevels) {
    let home = cluster.leader_of(DUE_QUEUE).await.unwrap_or(0);
    let levels = DelayLevels::for_test(name, 1).expect("a valid levels name");
    let broker = Broker::connect(
        config_for(cluster.url(home), QueueType::Quorum).with_delay_levels(levels.clone()),
    )
    .await
    .expect("connect to the delay node");
    TaskSender::new(&broker, Publisher::new(broker.clone(), 1))
        .ensure_delay_levels()
        .await
        .expect("declare the delay levels");
    broker.close().await;
    // A 1 s delay is 10 units (0b1010): levels 3 and 1, then the due queue.
    for q in [levels.level(3), levels.level(1), DUE_QUEUE.to_owned()] {
        assert_eq!(
            cluster.leader_of(&q).await.expect("delay queue listed"),
            home,
            "{q} lives on the delay node"
        );
    }
    (home, levels)
}

/// Messages ready in `levels` (read from the top level down, so one in transit is never
/// missed), or `None` while a level cannot be read.
async fn waiting_in(broker: &Broker, levels: &DelayLevels) -> Option<u32> {
    let mut n = 0;
    for q in levels.names().into_iter().rev() {
        n += broker.queue_stats(&q).await.ok()?.map_or(0, |s| s.ready);
    }
    Some(n)
}

/// Keys whose attempt 2 (the retry, which succeeds) is in the ledger.
fn retried(ledger: &Path) -> HashSet<String> {
    read_ledger(ledger)
        .into_iter()
        .filter(|(_, attempt, _)| *attempt == 2)
        .map(|(k, _, _)| k)
        .collect()
}

/// Ledger counts: (attempt-1 runs, attempt-2 runs, redelivered runs).
fn retry_counts(ledger: &Path) -> (usize, usize, usize) {
    let lines = read_ledger(ledger);
    (
        lines.iter().filter(|l| l.1 == 1).count(),
        lines.iter().filter(|l| l.1 == 2).count(),
        lines.iter().filter(|l| l.2).count(),
    )
}

/// 200 `flaky` tasks (attempt 1 fails, the retry 1 s later succeeds), sent one every 30 ms,
/// while a node is SIGKILLed once 50 of them succeeded: the node holding the test's delay
/// levels and `warren.delay.due` (`kill_delay_node`), or the one holding the service
/// queue's leader and the worker's and client's connections (but no delay queue).
async fn retries_through_a_kill(tag: &str, kill_delay_node: bool, mirrored: bool) {
    const N: usize = 200;
    const KILL_AT: usize = 50;
    const DELAY: Duration = Duration::from_secs(1);
    let turn = Turn::take().await;
    let cluster = turn.cluster;
    let svc = unique(tag);
    let (delay_node, levels) = delay_levels_on_due_home(cluster, &svc).await;
    let _policy = if mirrored {
        Some(MirrorPolicy::set(cluster, &levels).await)
    } else {
        None
    };
    let levels_cleanup = DropOnCluster {
        urls: cluster.url_list(),
        queues: levels.names(),
        exchanges: levels.names(),
    };
    // The service, the worker and the client start on the next node.
    let other = (delay_node + 1) % SIZE;
    let scene =
        Scene::on(turn, tag, cluster.url_list_from(other), svc, tag).holding(levels_cleanup);
    let (svc, ledger, queue) = (&scene.svc, &scene.ledger, &scene.queue);
    let env = [("FIXTURE_DELAY_LEVELS", format!("{svc}:1"))];
    let worker = scene.worker(16, &env).await;
    let client = scene.client().await;
    let leader = cluster.leader_of(queue).await.expect("service queue");
    let victim = if kill_delay_node { delay_node } else { other };
    eprintln!(
        "[{tag}] delay levels and due queue on node {delay_node}; service queue leader on node {leader}; connections to node {other} first; killing node {victim}"
    );

    let sends = Arc::new(Sends::new());
    let sender = {
        let (client, svc) = (client.clone(), svc.clone());
        sends.spawn_paced(N, Duration::from_millis(30), move |i| {
            let client = client.clone();
            let task = Task::new(
                format!("{svc}.flaky"),
                &serde_json::json!({"key": format!("k{i}"), "fail_until": 2}),
            )
            .with_retry(RetryPolicy::fixed(2, DELAY));
            async move { client.enqueue(task).await }
        })
    };

    wait_for("the first retries", Duration::from_secs(60), || {
        retried(ledger).len() >= KILL_AT
    })
    .await;
    let at_kill = (retried(ledger).len(), retry_counts(ledger));
    // Tasks whose retry may be in the delay cascade when the node dies: attempt 1 ran,
    // attempt 2 not yet.
    let in_cascade: HashSet<String> = {
        let done = retried(ledger);
        read_ledger(ledger)
            .into_iter()
            .map(|l| l.0)
            .filter(|k| !done.contains(k))
            .collect()
    };
    scene
        .kill(victim, || {
            format!(
                ": {} tasks done, (attempt-1, attempt-2, redelivered) runs {:?}, {} sent",
                at_kill.0,
                at_kill.1,
                sends.count()
            )
        })
        .await;
    let t_kill = Instant::now();
    if kill_delay_node && !mirrored {
        // With the delay node down, watch for 10 s: the measurement, not a wait for work.
        while t_kill.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    } else {
        // Retries keep flowing: every task sent succeeds before the node is back.
        let end = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let all_sent = sender.is_finished();
            let want = sends.keys();
            let done = retried(ledger);
            if all_sent && want.is_subset(&done) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "with node {victim} down, {} of {} sent tasks not retried after {:?} ({} sent; runs {:?})",
                want.difference(&done).count(),
                want.len(),
                t_kill.elapsed(),
                sends.count(),
                retry_counts(ledger)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let while_down = (retried(ledger).len(), retry_counts(ledger));
    eprintln!(
        "[{tag}] {:?} with node {victim} down: {} tasks done, runs {:?}, {} sent",
        t_kill.elapsed(),
        while_down.0,
        while_down.1,
        sends.count()
    );
    let t = scene
        .restart(victim, async {
            format!("; {} tasks done", retried(ledger).len())
        })
        .await;

    // Every task sent succeeds; nothing waits in the levels or the service queue.
    join_within("the sender", Duration::from_secs(120), sender).await;
    let want = sends.keys();
    let broker = client.broker().clone();
    let end = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let done = retried(ledger);
        let mut missing: Vec<&String> = want.difference(&done).collect();
        missing.sort();
        let waiting = waiting_in(&broker, &levels).await;
        let ready = ready_in(&broker, queue).await;
        let due = ready_in(&broker, DUE_QUEUE).await;
        // With the delay node killed, retries that were moving between delay queues at
        // that moment can be lost (see below): wait for the others, and for nothing to be
        // left waiting anywhere.
        let settled = missing.is_empty()
            || (kill_delay_node && !mirrored && missing.iter().all(|k| in_cascade.contains(*k)));
        if settled && waiting == Some(0) && ready == Some(0) && due == Some(0) {
            break;
        }
        if tokio::time::Instant::now() >= end {
            let runs = runs_by_key(ledger);
            let lost: Vec<String> = missing
                .iter()
                .map(|k| format!("{k}: {:?}", runs.get(*k)))
                .collect();
            panic!(
                "{} of {} tasks not retried {:?} after the restart (waiting in the levels {waiting:?}, ready {ready:?}): {lost:?}",
                missing.len(),
                want.len(),
                t.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all_done = t_kill.elapsed();
    assert!(worker.terminate().await, "worker exits cleanly");
    let mut lost: Vec<String> = want.difference(&retried(ledger)).cloned().collect();
    lost.sort();
    let dead = ready_in(&broker, &format!("warren.dead.{svc}"))
        .await
        .unwrap_or(0);
    client.close().await;

    // Each attempt-1 run schedules one retry: attempt 1 runs again only as a marked
    // redelivery, and attempt 2 runs once per attempt-1 run, any further run marked.
    let runs = runs_by_key(ledger);
    let mut unmarked = Vec::new();
    let (mut reruns1, mut extra2) = (0, 0);
    for (k, r) in &runs {
        let first: Vec<bool> = r.iter().filter(|x| x.0 == 1).map(|x| x.1).collect();
        let second: Vec<bool> = r.iter().filter(|x| x.0 == 2).map(|x| x.1).collect();
        reruns1 += first.len().saturating_sub(1);
        extra2 += second.len().saturating_sub(1);
        if first.len() != 1 || second.len() != 1 {
            eprintln!("[{tag}]   {k}: {r:?}");
        }
        let unmarked2 = second.iter().filter(|red| !**red).count();
        // The first run may be marked too (delivered, not started, before a kill).
        if first.is_empty()
            || first[1..].iter().any(|red| !red)
            || unmarked2 > first.len()
            || r.iter().any(|x| x.0 > 2)
        {
            unmarked.push(format!("{k}: {r:?}"));
        }
    }
    unmarked.sort();
    let errors = sends.take_error_lines();
    eprintln!(
        "[{tag}] {} sent ({} failed), {} done; {reruns1} attempt-1 re-runs, {extra2} extra attempt-2 runs, {} unexplained; {dead} dead letters; all done {all_done:?} after the kill; test took {:?}",
        want.len(),
        errors.len(),
        runs.len(),
        unmarked.len(),
        scene.took()
    );
    eprintln!(
        "[{tag}] {} retries in the delay cascade when node {victim} was killed; lost: {} {lost:?}",
        in_cascade.len(),
        lost.len()
    );
    assert!(errors.is_empty(), "enqueues failed: {errors:?}");
    if kill_delay_node && !mirrored {
        // Dead-lettering between classic queues is at most once: a retry that moved to
        // the next delay queue shortly before its node crashed may be lost (not yet on
        // disk). Nothing else is: every task sent during or after the outage succeeds.
        assert!(
            lost.iter().all(|k| in_cascade.contains(k)),
            "tasks lost that were not in the delay cascade at the kill: {lost:?}"
        );
    } else {
        assert!(lost.is_empty(), "tasks never retried: {lost:?}");
    }
    assert_eq!(dead, 0, "no task failed for good");
    assert!(
        unmarked.is_empty(),
        "{} tasks ran an attempt again without a mark: {unmarked:?}",
        unmarked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_through_a_kill_of_another_node() {
    retries_through_a_kill("clretry", false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_through_a_kill_of_the_delay_node() {
    retries_through_a_kill("clretryd", true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_through_a_kill_of_the_mirrored_delay_node() {
    retries_through_a_kill("clretrym", true, true).await;
}

/// A classic-queue mirroring policy (`ha-mode: all`, automatic sync) on the test's delay
/// levels and `warren.delay.due`, cleared when dropped.
struct MirrorPolicy<'a> {
    cluster: &'a Cluster,
    name: String,
}

impl<'a> MirrorPolicy<'a> {
    async fn set(cluster: &'a Cluster, levels: &DelayLevels) -> Self {
        let prefix = levels.level(0);
        let prefix = prefix.trim_end_matches('0');
        let pattern = format!("^({}[0-9]+|warren\\.delay\\.due)$", regex_escape(prefix));
        let name = format!("mirror-{}", &prefix[prefix.len().saturating_sub(20)..]);
        cluster
            .ctl_any(&[
                "set_policy",
                "--apply-to",
                "queues",
                "--priority",
                "10",
                &name,
                &pattern,
                r#"{"ha-mode":"all","ha-sync-mode":"automatic"}"#,
            ])
            .await
            .expect("set the mirroring policy");
        // Every delay queue the retries pass through is mirrored to the two other nodes
        // before the test starts (polled: the policy and the mirrors apply asynchronously).
        for q in [levels.level(3), levels.level(1), DUE_QUEUE.to_owned()] {
            let end = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let row = cluster
                    .queue_fields(&q, &["policy", "synchronised_slave_pids"])
                    .await
                    .unwrap_or_default();
                let mirrors = row.get(2).map_or(0, |p| p.matches('<').count());
                if row.get(1) == Some(&name) && mirrors == SIZE - 1 {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < end,
                    "{q} not mirrored by {name} after 30 s: {row:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Self { cluster, name }
    }
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                vec![c]
            } else {
                vec!['\\', c]
            }
        })
        .collect()
}

impl Drop for MirrorPolicy<'_> {
    fn drop(&mut self) {
        let (cluster, name) = (self.cluster, self.name.clone());
        let _ = std::thread::scope(|s| {
            s.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map(|rt| rt.block_on(cluster.ctl_any(&["clear_policy", &name])))
            })
            .join()
        });
    }
}
