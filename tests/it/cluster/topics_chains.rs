//! A topic subscription and chains through a kill of their queue's leader.

use std::sync::Arc;
use std::time::Duration;

use warren::{Chain, Client, Message, QueueType, RedisStore};
use warren_core::topology::{recent_queue, subscription_queue};

use super::{
    duplicates, join_within, runs_by_key, wait_all_ran, wait_drained, wait_for, DropOnCluster,
    Scene, Sends,
};
use crate::common::{config_for, read_ledger, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_through_a_node_kill() {
    const N: usize = 200;
    let scene = Scene::take("topic", "cltopic").await;
    let (cluster, ledger) = (scene.cluster, &scene.ledger);
    let topic = unique("cltopic-t");
    let sub_queue = subscription_queue(&topic, &scene.svc, "work");
    let _topic_cleanup = DropOnCluster {
        urls: scene.urls.clone(),
        queues: vec![sub_queue.clone(), recent_queue(&topic)],
        exchanges: Vec::new(),
    };
    let env = [("FIXTURE_TOPIC", topic.clone())];
    let worker = scene.worker(8, &env).await;
    let client = scene.client().await;
    let leader = cluster.leader_of(&sub_queue).await.expect("subscription");
    let recent_home = cluster.leader_of(&recent_queue(&topic)).await.ok();
    eprintln!("[topic] subscription leader on node {leader}, recent queue on {recent_home:?}");

    let published = Arc::new(Sends::new());
    let publisher = {
        let (client, topic) = (client.clone(), topic.clone());
        published.spawn_paced(N, Duration::from_millis(25), move |i| {
            let client = client.clone();
            let payload = serde_json::json!({"key": format!("k{i}"), "ms": 20});
            let message = Message::new(&topic, &payload);
            async move { client.publish(message).await }
        })
    };
    wait_for("a quarter of the messages", Duration::from_secs(60), || {
        read_ledger(ledger).len() >= N / 4
    })
    .await;
    scene
        .kill(leader, || {
            format!(
                " after {} published, {} received",
                published.count(),
                read_ledger(ledger).len()
            )
        })
        .await;
    scene
        .restart(leader, async {
            format!(
                "; {} published, {} received",
                published.count(),
                read_ledger(ledger).len()
            )
        })
        .await;
    join_within("the publisher", Duration::from_secs(120), publisher).await;
    let want = published.keys();
    let idle = Some((client.broker(), sub_queue.as_str()));
    let deadline = (Duration::from_secs(120), Duration::from_millis(100));
    wait_all_ran(ledger, &want, idle, deadline, |missing, idle| {
        format!(
            "{missing} of {} published messages never received (subscription idle {idle})",
            want.len()
        )
    })
    .await;
    assert!(worker.terminate().await, "worker exits cleanly");
    client.close().await;
    let runs = runs_by_key(ledger);
    let (dups, unmarked) = duplicates(&runs);
    let errors = published.take_error_lines();
    eprintln!(
        "[topic] {} published ({} failed), {} received, {dups} re-runs ({} unmarked); test took {:?}",
        want.len(),
        errors.len(),
        runs.len(),
        unmarked.len(),
        scene.took()
    );
    assert!(errors.is_empty(), "publishes failed: {errors:?}");
    assert!(unmarked.is_empty(), "unmarked re-runs: {unmarked:?}");
    assert!(
        runs.keys().all(|k| want.contains(k)),
        "only published messages were received"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_through_a_node_kill() {
    const CHAINS: usize = 20;
    const STEPS: u64 = 3;
    let scene = Scene::take("chain", "clchain").await;
    let (svc, ledger, queue) = (&scene.svc, &scene.ledger, &scene.queue);
    // Chain steps are claimed in a shared status store, so a step re-sent by a redelivered
    // predecessor runs once; the results are read from it too (the client's reply queue
    // may be on the killed node).
    let prefix = format!("{}:", unique("clchain"));
    let env = [("FIXTURE_STATUS_PREFIX", prefix.clone())];
    let worker = scene.worker(8, &env).await;
    let store = RedisStore::from_env()
        .expect("redis store")
        .with_prefix(prefix);
    let client = Client::builder()
        .amqp(config_for(&scene.urls, QueueType::Quorum))
        .status_store(Arc::new(store))
        .connect()
        .await
        .expect("client connects");
    let leader = scene.cluster.leader_of(queue).await.expect("service queue");
    let mut handles = Vec::new();
    for i in 0..CHAINS {
        let mut chain = Chain::new().with_cid(format!("{svc}-c{i}"));
        for _ in 0..STEPS {
            chain = chain.step(format!("{svc}.step"));
        }
        handles.push(
            client
                .enqueue_chain(chain.input("ms", &300))
                .await
                .expect("chain sent"),
        );
    }
    wait_for("a third of the steps", Duration::from_secs(60), || {
        read_ledger(ledger).len() >= CHAINS * STEPS as usize / 3
    })
    .await;
    scene
        .kill(leader, || {
            format!(
                " (the service queue's leader) after {} steps",
                read_ledger(ledger).len()
            )
        })
        .await;
    scene.restart(leader, async { String::new() }).await;

    let mut replied = 0;
    for (i, h) in handles.iter().enumerate() {
        let r = client
            .chain_handle(h.id)
            .expect("a store")
            .wait_for(Duration::from_secs(120))
            .await
            .unwrap_or_else(|e| panic!("chain {i} failed: {e}"));
        assert_eq!(
            r.values(&["count", "sum"]),
            [
                serde_json::json!(STEPS),
                serde_json::json!(STEPS * (STEPS - 1) / 2)
            ],
            "chain {i}'s result"
        );
        // The sender's own handle, answered through its reply queue, once the store has it.
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), h.clone().wait()).await {
            assert_eq!(r.values(&["count"]), [serde_json::json!(STEPS)]);
            replied += 1;
        }
    }
    wait_drained(client.broker(), queue, Duration::from_secs(60)).await;
    assert!(worker.terminate().await, "worker exits cleanly");
    client.close().await;
    let runs = runs_by_key(ledger);
    let (dups, unmarked) = duplicates(&runs);
    eprintln!(
        "[chain] {CHAINS} chains ended ({replied} also answered through the reply queue); {} steps ran, {dups} re-runs ({} unmarked); test took {:?}",
        runs.len(),
        unmarked.len(),
        scene.took()
    );
    for i in 0..CHAINS {
        for k in 0..STEPS {
            assert!(
                runs.contains_key(&format!("{svc}-c{i}/{k}")),
                "step {k} of chain {i} ran"
            );
        }
    }
    assert_eq!(runs.len(), CHAINS * STEPS as usize, "no other steps");
    assert!(unmarked.is_empty(), "unmarked re-runs: {unmarked:?}");
}
