//! Enqueues through a kill of the service queue's leader.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use warren::Task;

use super::{
    duplicates, join_within, runs_by_key, wait_all_ran, wait_drained, wait_for, Scene, Sends,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_through_a_leader_kill() {
    const N: usize = 20_000;
    const CALLERS: usize = 16;
    const KILL_AT: usize = 5_000;
    let scene = Scene::take("enqueue", "clenq").await;
    let (cluster, queue) = (scene.cluster, &scene.queue);
    let worker = scene.worker(32, &[]).await;
    let client = scene.client().await;
    let leader = cluster
        .leader_of(queue)
        .await
        .expect("service queue leader");
    eprintln!("[enqueue] service queue leader: node {leader}");

    let next = Arc::new(AtomicUsize::new(0));
    let sends = Arc::new(Sends::new());
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (client, svc, next, sends) = (
                client.clone(),
                scene.svc.clone(),
                next.clone(),
                sends.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= N {
                        return;
                    }
                    let payload = serde_json::json!({"key": format!("k{i}"), "ms": 0});
                    let res = client
                        .enqueue(Task::new(format!("{svc}.work"), &payload))
                        .await;
                    sends.record(i, res);
                }
            })
        })
        .collect();

    // Kill the leader once a quarter of the enqueues are acknowledged, then bring it back
    // while the callers go on.
    wait_for("the first enqueues", Duration::from_secs(120), || {
        sends.count() >= KILL_AT
    })
    .await;
    let killed_at = sends.start.elapsed();
    scene
        .kill(leader, || {
            format!(" at {killed_at:?} after {} acked enqueues", sends.count())
        })
        .await;
    scene
        .restart(leader, async {
            format!(
                " ({} acked so far); new leader: {:?}",
                sends.count(),
                cluster.leader_of(queue).await.ok()
            )
        })
        .await;
    for c in callers {
        join_within("a caller", Duration::from_secs(300), c).await;
    }
    let enqueue_time = sends.start.elapsed();
    let errors = sends.take_errors();
    // Every acknowledged enqueue runs.
    let want = sends.keys();
    eprintln!(
        "[enqueue] {} acked, {} failed in {enqueue_time:?}",
        want.len(),
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

    let deadline = (Duration::from_secs(240), Duration::from_millis(200));
    wait_all_ran(&scene.ledger, &want, None, deadline, |missing, _| {
        format!(
            "{missing} of {} acknowledged enqueues never ran",
            want.len()
        )
    })
    .await;
    // Then the queue drains; the worker stops (finishing what it holds) so the ledger is final.
    wait_drained(client.broker(), queue, Duration::from_secs(60)).await;
    assert!(worker.terminate().await, "worker exits cleanly");
    client.close().await;
    let runs = runs_by_key(&scene.ledger);
    let (dups, unmarked) = duplicates(&runs);
    let extra = runs.keys().filter(|k| !want.contains(*k)).count();
    eprintln!(
        "[enqueue] {} tasks ran, {dups} re-runs ({} unmarked), {extra} ran though their enqueue failed; test took {:?}",
        runs.len(),
        unmarked.len(),
        scene.took()
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
