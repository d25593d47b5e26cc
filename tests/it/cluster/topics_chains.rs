//! A topic subscription and chains through a kill of their queue's leader.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use warren::{Chain, Client, Message, QueueType, RedisStore};
use warren_core::topology::{recent_queue, subscription_queue};

use super::{client_for, duplicates, runs_by_key, wait_for, DropOnCluster};
use crate::common::{config_for, ledger_path, read_ledger, unique, Cleanup, FixtureWorker};
use crate::support::cluster::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_through_a_node_kill() {
    const N: usize = 200;
    let cluster = Cluster::shared().await;
    let _turn = cluster.lock().await;
    let started = Instant::now();
    let urls = cluster.url_list();
    let svc = unique("cltopic");
    let topic = unique("cltopic-t");
    let _cleanup = Cleanup::on(&urls, &[&svc]);
    let sub_queue = subscription_queue(&topic, &svc, "work");
    let _topic_cleanup = DropOnCluster {
        urls: urls.clone(),
        queues: vec![sub_queue.clone(), recent_queue(&topic)],
        exchanges: Vec::new(),
    };
    let ledger = ledger_path("cltopic");
    let env = [("FIXTURE_TOPIC", topic.clone())];
    let worker = FixtureWorker::start_with(&urls, &svc, QueueType::Quorum, &ledger, 8, &env).await;
    let client = client_for(&urls).await;
    let leader = cluster.leader_of(&sub_queue).await.expect("subscription");
    let recent_home = cluster.leader_of(&recent_queue(&topic)).await.ok();
    eprintln!("[topic] subscription leader on node {leader}, recent queue on {recent_home:?}");

    let published: Arc<Mutex<Vec<usize>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let publisher = {
        let (client, topic, published, errors) = (
            client.clone(),
            topic.clone(),
            published.clone(),
            errors.clone(),
        );
        tokio::spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_millis(25));
            for i in 0..N {
                pace.tick().await;
                let payload = serde_json::json!({"key": format!("k{i}"), "ms": 20});
                match client.publish(Message::new(&topic, &payload)).await {
                    Ok(_) => published.lock().unwrap().push(i),
                    Err(e) => errors.lock().unwrap().push(format!("k{i}: {e:#}")),
                }
            }
        })
    };
    wait_for("a quarter of the messages", Duration::from_secs(60), || {
        read_ledger(&ledger).len() >= N / 4
    })
    .await;
    cluster.kill(leader).await.expect("kill");
    eprintln!(
        "[topic] killed node {leader} after {} published, {} received",
        published.lock().unwrap().len(),
        read_ledger(&ledger).len()
    );
    let t = Instant::now();
    cluster.restart(leader).await.expect("node restarts");
    eprintln!(
        "[topic] node {leader} back in {:?}; {} published, {} received",
        t.elapsed(),
        published.lock().unwrap().len(),
        read_ledger(&ledger).len()
    );
    tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .expect("the publisher finishes")
        .expect("publisher task");
    let want: HashSet<String> = published
        .lock()
        .unwrap()
        .iter()
        .map(|i| format!("k{i}"))
        .collect();
    let broker = client.broker().clone();
    let end = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let got: HashSet<String> = read_ledger(&ledger).into_iter().map(|l| l.0).collect();
        let missing = want.difference(&got).count();
        let idle = matches!(broker.queue_stats(&sub_queue).await, Ok(Some(s)) if s.ready == 0);
        if missing == 0 && idle {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{missing} of {} published messages never received (subscription idle {idle})",
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(worker.terminate().await, "worker exits cleanly");
    client.close().await;
    let runs = runs_by_key(&ledger);
    let (dups, unmarked) = duplicates(&runs);
    let errors = std::mem::take(&mut *errors.lock().unwrap());
    eprintln!(
        "[topic] {} published ({} failed), {} received, {dups} re-runs ({} unmarked); test took {:?}",
        want.len(),
        errors.len(),
        runs.len(),
        unmarked.len(),
        started.elapsed()
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
    let cluster = Cluster::shared().await;
    let _turn = cluster.lock().await;
    let started = Instant::now();
    let urls = cluster.url_list();
    let svc = unique("clchain");
    let _cleanup = Cleanup::on(&urls, &[&svc]);
    let ledger = ledger_path("clchain");
    // Chain steps are claimed in a shared status store, so a step re-sent by a redelivered
    // predecessor runs once; the results are read from it too (the client's reply queue
    // may be on the killed node).
    let prefix = format!("{}:", unique("clchain"));
    let env = [("FIXTURE_STATUS_PREFIX", prefix.clone())];
    let worker = FixtureWorker::start_with(&urls, &svc, QueueType::Quorum, &ledger, 8, &env).await;
    let store = RedisStore::from_env()
        .expect("redis store")
        .with_prefix(prefix);
    let client = Client::builder()
        .amqp(config_for(&urls, QueueType::Quorum))
        .status_store(Arc::new(store))
        .connect()
        .await
        .expect("client connects");
    let queue = format!("warren.svc.{svc}");
    let leader = cluster.leader_of(&queue).await.expect("service queue");
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
        read_ledger(&ledger).len() >= CHAINS * STEPS as usize / 3
    })
    .await;
    cluster.kill(leader).await.expect("kill");
    eprintln!(
        "[chain] killed node {leader} (the service queue's leader) after {} steps",
        read_ledger(&ledger).len()
    );
    let t = Instant::now();
    cluster.restart(leader).await.expect("node restarts");
    eprintln!("[chain] node {leader} back in {:?}", t.elapsed());

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
    let broker = client.broker().clone();
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    while !matches!(broker.queue_stats(&queue).await, Ok(Some(s)) if s.ready == 0) {
        assert!(tokio::time::Instant::now() < end, "service queue drains");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(worker.terminate().await, "worker exits cleanly");
    client.close().await;
    let runs = runs_by_key(&ledger);
    let (dups, unmarked) = duplicates(&runs);
    eprintln!(
        "[chain] {CHAINS} chains ended ({replied} also answered through the reply queue); {} steps ran, {dups} re-runs ({} unmarked); test took {:?}",
        runs.len(),
        unmarked.len(),
        started.elapsed()
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
