//! The broker restarted under a running worker process and client: the worker resumes
//! consuming by itself, the client's next calls succeed, the ledger shows nothing lost and
//! every re-execution marked as a redelivery. Uses a private RabbitMQ node (own name, ports and
//! data folder) so the shared broker and other tests are untouched.

use crate::common;
use crate::support;

use std::time::Duration;

use common::{
    check_ledger, config_for, enqueue_work, ledger_path, read_ledger, unique, wait_keys,
    FixtureWorker,
};
use support::broker_node::BrokerNode;
use warren::{Client, QueueType};

async fn client_for(url: &str) -> Client {
    Client::builder()
        .amqp(config_for(url, QueueType::Quorum).with_publish_timeout(Duration::from_secs(120)))
        .connect()
        .await
        .expect("client connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_idle_and_under_load() {
    let mut node = BrokerNode::start()
        .await
        .expect("private RabbitMQ node starts");
    let url = node.amqp_url();
    let svc = unique("restart");
    let ledger = ledger_path("restart");
    let worker = FixtureWorker::start(&url, &svc, QueueType::Quorum, &ledger, 8).await;
    let client = client_for(&url).await;

    // Idle: some work, a restart with nothing in flight, then more work.
    enqueue_work(&client, &svc, 0..50, 0).await;
    wait_keys(&ledger, 50, Duration::from_secs(60)).await;
    node.restart().await.expect("node restarts");
    enqueue_work(&client, &svc, 50..100, 0).await;
    wait_keys(&ledger, 100, Duration::from_secs(120)).await;

    // Under load: tasks in flight and queued while the broker goes down and comes back.
    enqueue_work(&client, &svc, 100..400, 20).await;
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    while read_ledger(&ledger).len() < 150 {
        assert!(
            tokio::time::Instant::now() < end,
            "load phase did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    node.restart().await.expect("node restarts under load");
    // The client's next calls succeed once the node is back.
    enqueue_work(&client, &svc, 400..420, 0).await;
    wait_keys(&ledger, 420, Duration::from_secs(180)).await;
    check_ledger(&ledger, 420);

    // The worker is consuming again (one consumer) and the queue is drained.
    let stats = common::service_stats(client.broker(), &svc).await;
    assert_eq!(stats.consumers, 1);
    assert_eq!(stats.ready, 0);
    assert!(
        worker.terminate().await,
        "worker exits cleanly after the restarts"
    );
    client.close().await;
}
