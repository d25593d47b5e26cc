//! Invokes in flight through a kill of the service queue's leader.

use std::time::{Duration, Instant};

use warren::Task;

use super::{wait_for, Scene};
use crate::common::read_ledger;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invokes_through_a_node_kill() {
    const N: usize = 64;
    const DEADLINE: Duration = Duration::from_secs(10);
    let scene = Scene::take("invoke", "clinv").await;
    let (cluster, svc, queue) = (scene.cluster, &scene.svc, &scene.queue);
    let starts = scene.ledger.with_extension("starts");
    let env = [("FIXTURE_STARTS", starts.display().to_string())];
    let worker = scene.worker(N, &env).await;
    let client = scene.client().await;
    let leader = cluster
        .leader_of(queue)
        .await
        .expect("service queue leader");

    let invoke = |i: usize| {
        let (client, svc) = (client.clone(), svc.clone());
        tokio::spawn(async move {
            let key = format!("k{i}");
            let task = Task::new(
                format!("{svc}.work"),
                &serde_json::json!({"key": key, "ms": 3000}),
            )
            .with_timeout(DEADLINE);
            let t = Instant::now();
            let res = client.invoke::<String>(task).await;
            (key, t.elapsed(), res)
        })
    };
    // Half of them running on the worker (3 s each), the other half being sent, when the
    // service queue's leader dies.
    let mut calls: Vec<_> = (0..N / 2).map(invoke).collect();
    wait_for("the first invokes running", Duration::from_secs(30), || {
        read_ledger(&starts).len() >= N / 2
    })
    .await;
    calls.extend((N / 2..N).map(invoke));
    let t_kill = Instant::now();
    scene
        .kill(leader, || " (the service queue's leader)".to_owned())
        .await;
    // When the queue lists a new leader.
    let watch = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let end = tokio::time::Instant::now() + Duration::from_secs(20);
            while tokio::time::Instant::now() < end {
                if let Ok(row) = cluster.queue_fields(&queue, &["leader", "online"]).await {
                    if cluster.index_of(&row[1]) != Some(leader) {
                        return format!("{row:?} {:?} after the kill", t_kill.elapsed());
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            "no new leader listed within 20 s".to_owned()
        })
    };

    let mut ok = 0;
    let mut timeouts = 0;
    let mut unconfirmed = 0;
    let mut bad = Vec::new();
    let mut slowest = Duration::ZERO;
    for c in calls {
        // Not a bound on the invoke: a hung call must show as late, not hang the test.
        let (key, took, res) = match tokio::time::timeout(DEADLINE * 4, c).await {
            Ok(r) => r.expect("invoke task"),
            Err(_) => {
                bad.push(format!("an invoke still pending after {:?}", DEADLINE * 4));
                continue;
            }
        };
        slowest = slowest.max(took);
        match res {
            Ok(v) if v == key && took <= DEADLINE + Duration::from_secs(1) => ok += 1,
            Err(warren::ClientError::Timeout { .. })
                if took <= DEADLINE + Duration::from_secs(1) =>
            {
                timeouts += 1;
            }
            // The deadline passed before the broker confirmed the request: a timeout too.
            Err(warren::ClientError::Broker(warren::BrokerError::Unconfirmed { .. }))
                if took <= DEADLINE + Duration::from_secs(1) =>
            {
                unconfirmed += 1;
            }
            other => bad.push(format!("{key} after {took:?}: {other:?}")),
        }
    }
    eprintln!(
        "[invoke] {ok} results, {timeouts} timeouts, {unconfirmed} unconfirmed at the deadline, {} bad; slowest {slowest:?}; all back {:?} after the kill",
        bad.len(),
        t_kill.elapsed()
    );
    eprintln!("[invoke] new leader: {}", watch.await.unwrap());
    scene.restart(leader, async { String::new() }).await;
    assert!(worker.terminate().await, "worker exits cleanly");
    client.close().await;
    eprintln!("[invoke] test took {:?}", scene.took());
    assert!(
        bad.is_empty(),
        "{} invokes missed their deadline or failed otherwise: {bad:#?}",
        bad.len()
    );
}
