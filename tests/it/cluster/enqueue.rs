//! Enqueues through a kill of the service queue's leader.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use warren::{QueueType, Task};

use super::{client_for, duplicates, runs_by_key, wait_for};
use crate::common::{ledger_path, read_ledger, unique, Cleanup, FixtureWorker};
use crate::support::cluster::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_through_a_leader_kill() {
    const N: usize = 20_000;
    const CALLERS: usize = 16;
    const KILL_AT: usize = 5_000;
    let cluster = Cluster::shared().await;
    let _turn = cluster.lock().await;
    let started = Instant::now();
    let urls = cluster.url_list();
    let svc = unique("clenq");
    let _cleanup = Cleanup::on(&urls, &[&svc]);
    let ledger = ledger_path("clenq");
    let worker = FixtureWorker::start(&urls, &svc, QueueType::Quorum, &ledger, 32).await;
    let client = client_for(&urls).await;
    let queue = format!("warren.svc.{svc}");
    let leader = cluster
        .leader_of(&queue)
        .await
        .expect("service queue leader");
    eprintln!("[enqueue] service queue leader: node {leader}");

    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    // (key index, ms since start, error)
    let errors: Arc<Mutex<Vec<(usize, u128, String)>>> = Arc::default();
    let acked: Arc<Mutex<Vec<usize>>> = Arc::default();
    let t0 = Instant::now();
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (client, svc, next, ok, errors, acked) = (
                client.clone(),
                svc.clone(),
                next.clone(),
                ok.clone(),
                errors.clone(),
                acked.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= N {
                        return;
                    }
                    let payload = serde_json::json!({"key": format!("k{i}"), "ms": 0});
                    match client
                        .enqueue(Task::new(format!("{svc}.work"), &payload))
                        .await
                    {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                            acked.lock().unwrap().push(i);
                        }
                        Err(e) => errors.lock().unwrap().push((
                            i,
                            t0.elapsed().as_millis(),
                            format!("{e:#}"),
                        )),
                    }
                }
            })
        })
        .collect();

    // Kill the leader once a quarter of the enqueues are acknowledged, then bring it back
    // while the callers go on.
    wait_for("the first enqueues", Duration::from_secs(120), || {
        ok.load(Ordering::SeqCst) >= KILL_AT
    })
    .await;
    let killed_at = t0.elapsed();
    cluster.kill(leader).await.expect("kill the leader");
    eprintln!(
        "[enqueue] killed node {leader} at {killed_at:?} after {} acked enqueues",
        ok.load(Ordering::SeqCst)
    );
    let restart_started = Instant::now();
    cluster.restart(leader).await.expect("leader node restarts");
    eprintln!(
        "[enqueue] node {leader} back in {:?} ({} acked so far); new leader: {:?}",
        restart_started.elapsed(),
        ok.load(Ordering::SeqCst),
        cluster.leader_of(&queue).await.ok()
    );
    for c in callers {
        tokio::time::timeout(Duration::from_secs(300), c)
            .await
            .expect("callers finish")
            .expect("caller task");
    }
    let enqueue_time = t0.elapsed();
    let errors = std::mem::take(&mut *errors.lock().unwrap());
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    eprintln!(
        "[enqueue] {} acked, {} failed in {enqueue_time:?}",
        acked.len(),
        errors.len()
    );
    let mut kinds: BTreeMap<String, (usize, u128, u128)> = BTreeMap::new();
    for (_, at, e) in &errors {
        let k = kinds.entry(e.clone()).or_insert((0, u128::MAX, 0));
        k.0 += 1;
        k.1 = k.1.min(*at);
        k.2 = k.2.max(*at);
    }
    for (e, (n, first, last)) in &kinds {
        eprintln!("[enqueue]   {n} x (from {first} ms to {last} ms): {e}");
    }

    // Every acknowledged enqueue runs.
    let want: HashSet<String> = acked.iter().map(|i| format!("k{i}")).collect();
    let end = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        let ran: HashSet<String> = read_ledger(&ledger)
            .into_iter()
            .map(|(k, _, _)| k)
            .collect();
        let missing = want.difference(&ran).count();
        if missing == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{missing} of {} acknowledged enqueues never ran",
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Then the queue drains; the worker stops (finishing what it holds) so the ledger is final.
    let broker = client.broker().clone();
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(s)) = broker.queue_stats(&queue).await {
            if s.ready == 0 {
                break;
            }
        }
        assert!(tokio::time::Instant::now() < end, "service queue drains");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(worker.terminate().await, "worker exits cleanly");
    client.close().await;
    let runs = runs_by_key(&ledger);
    let (dups, unmarked) = duplicates(&runs);
    let extra = runs.keys().filter(|k| !want.contains(*k)).count();
    eprintln!(
        "[enqueue] {} tasks ran, {dups} re-runs ({} unmarked), {extra} ran though their enqueue failed; test took {:?}",
        runs.len(),
        unmarked.len(),
        started.elapsed()
    );
    assert!(
        errors.is_empty(),
        "{} enqueues failed with two of three nodes up: {kinds:?}",
        errors.len()
    );
    assert!(
        unmarked.is_empty(),
        "{} tasks ran again without a redelivery mark, e.g. {:?}",
        unmarked.len(),
        &unmarked[..unmarked.len().min(10)]
    );
}
