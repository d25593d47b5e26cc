//! Durable publish/subscribe under faults, with real subscriber processes: the fixture worker
//! (`tests/fixtures/worker.rs`) started with `FIXTURE_TOPIC` subscribes its `work` method to a
//! topic and records every delivery in a ledger (`key attempt redelivered`).
//!
//! * A subscriber process SIGKILLed while the test publishes, and started again after the
//!   publishing finished: both subscribers end up with every message, and any message one of
//!   them ran twice was a marked redelivery.
//! * A private RabbitMQ node restarted while a subscriber works through a backlog, with more
//!   publishes after the restart (the client and the worker reconnect by themselves): every
//!   message reaches the subscriber, duplicates only as marked redeliveries.
//!
//! Each test deletes its topic's subscription and recent queues when done (also on panic).

use crate::common;
use crate::support;
use warren::Message;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    check_ledger, config, config_for, ledger_path, poll, read_ledger, unique, wait_keys,
    wait_lines, Cleanup, FixtureWorker,
};
use futures_util::{StreamExt, TryStreamExt};
use support::broker_node::BrokerNode;
use warren::{Client, QueueType};
use warren_core::topology::{recent_queue, subscription_queue};
use warren_core::{Broker, ReconnectPolicy};

/// The fixture worker's method that `FIXTURE_TOPIC` subscribes.
const METHOD: &str = "work";
/// Publishes in flight at once.
const PUBLISH_CONCURRENCY: usize = 64;

/// Deletes a topic's subscription queues (one per subscribing service's `work`) and its
/// recent-messages queue when dropped, even if the test panicked.
struct TopicCleanup {
    url: String,
    topic: String,
    services: Vec<String>,
}

impl TopicCleanup {
    fn new(url: &str, topic: &str, services: &[&str]) -> Self {
        Self {
            url: url.to_owned(),
            topic: topic.to_owned(),
            services: services.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn queues(&self) -> Vec<String> {
        let mut queues: Vec<String> = self
            .services
            .iter()
            .map(|svc| subscription_queue(&self.topic, svc, METHOD))
            .collect();
        queues.push(recent_queue(&self.topic));
        queues
    }
}

impl Drop for TopicCleanup {
    fn drop(&mut self) {
        let queues = self.queues();
        // Give up quickly if the broker is gone (a private node that failed to come back).
        let cfg = config_for(&self.url, QueueType::Classic).with_reconnect(ReconnectPolicy {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            give_up_after: Some(Duration::from_secs(10)),
        });
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
                broker.close().await;
            });
        })
        .join();
    }
}

/// Publishes `{"key": "k<i>", "ms": ms}` for every `i` in `keys` to `topic`, at most
/// [`PUBLISH_CONCURRENCY`] at once, counting confirmed publishes in `published`; fails on
/// the first publish error. Returns the receipts' message ids.
async fn publish_keys(
    client: Client,
    topic: String,
    keys: std::ops::Range<usize>,
    ms: u64,
    published: Arc<AtomicUsize>,
) -> Vec<uuid::Uuid> {
    futures_util::stream::iter(keys)
        .map(|i| {
            let (client, topic, published) = (&client, &topic, &published);
            async move {
                let payload = serde_json::json!({"key": format!("k{i}"), "ms": ms});
                let receipt = client
                    .publish(Message::new(topic, &payload))
                    .await
                    .map_err(|e| format!("publishing k{i} to {topic}: {e}"))?;
                published.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>(receipt.id)
            }
        })
        .buffer_unordered(PUBLISH_CONCURRENCY)
        .try_collect()
        .await
        .expect("every publish is confirmed")
}

/// Asserts that `ids` are `n` distinct message ids.
fn assert_distinct(ids: &[uuid::Uuid], n: usize) {
    assert_eq!(ids.len(), n, "one receipt per publish");
    let distinct: HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), n, "every receipt has its own message id");
}

/// Distinct keys in a ledger.
fn keys_in(ledger: &Path) -> usize {
    read_ledger(ledger)
        .into_iter()
        .map(|(k, _, _)| k)
        .collect::<HashSet<_>>()
        .len()
}

/// Polls until `queue` has nothing ready and `consumers` consumers.
async fn wait_drained(broker: &Broker, queue: &str, consumers: u32) {
    poll(
        &format!("{queue} to be drained with {consumers} consumer(s)"),
        Duration::from_secs(60),
        || async {
            let stats = broker.queue_stats(queue).await.ok().flatten()?;
            (stats.ready == 0 && stats.consumers == consumers).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_process_stopped_while_publishing_gets_everything() {
    const N: usize = 3_000;
    const KILL_AFTER: usize = 1_000;
    let started = Instant::now();
    let url = common::url();
    let (a, b) = (unique("psub-a"), unique("psub-b"));
    let topic = unique("psub-topic");
    let _cleanup = Cleanup::new(&[&a, &b]);
    let _topic_cleanup = TopicCleanup::new(&url, &topic, &[&a, &b]);
    let (ledger_a, ledger_b) = (ledger_path("sub-a"), ledger_path("sub-b"));
    let env = [("FIXTURE_TOPIC", topic.clone())];
    // READY means each subscription queue exists and is consumed: nothing published from
    // here on can miss either subscriber.
    let worker_a =
        FixtureWorker::start_with(&url, &a, QueueType::Quorum, &ledger_a, 16, &env).await;
    let worker_b =
        FixtureWorker::start_with(&url, &b, QueueType::Quorum, &ledger_b, 16, &env).await;
    let (queue_a, queue_b) = (
        subscription_queue(&topic, &a, METHOD),
        subscription_queue(&topic, &b, METHOD),
    );
    let client = Client::builder()
        .amqp(config(QueueType::Quorum))
        .connect()
        .await
        .expect("client connects");

    let published = Arc::new(AtomicUsize::new(0));
    let publishing = tokio::spawn(publish_keys(
        client.clone(),
        topic.clone(),
        0..N,
        0,
        published.clone(),
    ));
    poll(
        &format!("{KILL_AFTER} confirmed publishes"),
        Duration::from_secs(120),
        || async { (published.load(Ordering::SeqCst) >= KILL_AFTER).then_some(()) },
    )
    .await;
    worker_b.kill9().await;
    let published_at_kill = published.load(Ordering::SeqCst);
    let b_keys_at_kill = keys_in(&ledger_b);
    assert!(
        published_at_kill < N,
        "precondition: B must be killed while publishing goes on (all {N} were already confirmed)"
    );

    let ids = publishing.await.expect("publishing task");
    assert_distinct(&ids, N);
    let published_in = started.elapsed();

    // B is gone; its durable queue keeps what B did not finish, A goes on.
    let waiting = poll(
        "B's subscription queue to lose its consumer",
        Duration::from_secs(30),
        || async {
            let stats = client.broker().queue_stats(&queue_b).await.ok().flatten()?;
            (stats.consumers == 0).then_some(stats.ready)
        },
    )
    .await;
    assert!(
        waiting > 0,
        "messages published while B was down wait in its queue (none did)"
    );
    wait_keys(&ledger_a, N, Duration::from_secs(180)).await;

    let worker_b =
        FixtureWorker::start_with(&url, &b, QueueType::Quorum, &ledger_b, 16, &env).await;
    wait_keys(&ledger_b, N, Duration::from_secs(180)).await;
    let dups_a = check_ledger(&ledger_a, N);
    let dups_b = check_ledger(&ledger_b, N);
    wait_drained(client.broker(), &queue_a, 1).await;
    wait_drained(client.broker(), &queue_b, 1).await;
    // Nothing arrived after draining that check_ledger did not see.
    check_ledger(&ledger_a, N);
    check_ledger(&ledger_b, N);

    assert!(worker_a.terminate().await, "A exits cleanly");
    assert!(worker_b.terminate().await, "B (restarted) exits cleanly");
    client.close().await;
    eprintln!(
        "pubsub kill: {N} published in {published_in:?} (B killed after {published_at_kill} \
         confirmed, B had run {b_keys_at_kill} keys, {waiting} waiting for it); \
         re-runs A={dups_a} B={dups_b}; total {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pubsub_survives_a_broker_restart() {
    const BEFORE: usize = 1_000;
    const AFTER: usize = 500;
    // A few tasks at a time, 20 ms each: the first 1,000 messages form a backlog of several
    // seconds, so the restart finds messages queued and some in flight. (Not concurrency 1:
    // each consumed queue's pump takes a permit before a delivery arrives, so with a single
    // permit the idle service queue's pump holds it and the subscription never runs.)
    const CONCURRENCY: usize = 4;
    const MS: u64 = 20;
    let mut node = BrokerNode::start()
        .await
        .expect("private RabbitMQ node starts");
    let started = Instant::now();
    let url = node.amqp_url();
    let svc = unique("psub-restart");
    let topic = unique("psub-rtopic");
    let queue = subscription_queue(&topic, &svc, METHOD);
    // Dropped before the node (declared after it). The node's data folder, with the service
    // and dead-letter queues, is deleted when the node drops.
    let _topic_cleanup = TopicCleanup::new(&url, &topic, &[&svc]);
    let ledger = ledger_path("pubsub-restart");
    let worker = FixtureWorker::start_with(
        &url,
        &svc,
        QueueType::Quorum,
        &ledger,
        CONCURRENCY,
        &[("FIXTURE_TOPIC", topic.clone())],
    )
    .await;
    let client = Client::builder()
        .amqp(config_for(&url, QueueType::Quorum).with_publish_timeout(Duration::from_secs(120)))
        .connect()
        .await
        .expect("client connects");
    let published = Arc::new(AtomicUsize::new(0));

    let ids_before = publish_keys(
        client.clone(),
        topic.clone(),
        0..BEFORE,
        MS,
        published.clone(),
    )
    .await;
    assert_distinct(&ids_before, BEFORE);
    // The subscriber is at work, with most of the backlog still queued.
    wait_lines(&ledger, 10, Duration::from_secs(60)).await;
    let pending = client
        .broker()
        .queue_stats(&queue)
        .await
        .expect("queue check")
        .expect("the subscription queue exists")
        .ready;
    let ran_before_restart = keys_in(&ledger);
    assert!(
        pending > 0,
        "precondition: messages must be pending at the restart (the subscriber ran {ran_before_restart} already)"
    );

    let restart_at = Instant::now();
    node.restart().await.expect("node restarts");
    let restart_took = restart_at.elapsed();

    // The client reconnects by itself: these publishes wait for it (publish timeout 120 s).
    let after_at = Instant::now();
    let ids_after = publish_keys(
        client.clone(),
        topic.clone(),
        BEFORE..BEFORE + AFTER,
        MS,
        published.clone(),
    )
    .await;
    assert_distinct(&ids_after, AFTER);
    let published_after_in = after_at.elapsed();
    let all: HashSet<_> = ids_before.iter().chain(&ids_after).collect();
    assert_eq!(
        all.len(),
        BEFORE + AFTER,
        "message ids are unique across the restart"
    );

    wait_keys(&ledger, BEFORE + AFTER, Duration::from_secs(240)).await;
    let dups = check_ledger(&ledger, BEFORE + AFTER);
    // The worker consumes again (one consumer) and its queue is drained.
    wait_drained(client.broker(), &queue, 1).await;
    check_ledger(&ledger, BEFORE + AFTER);

    assert!(
        worker.terminate().await,
        "the subscriber exits cleanly after the restart"
    );
    client.close().await;
    eprintln!(
        "pubsub restart: {pending} pending and {ran_before_restart} run at the restart \
         (took {restart_took:?}); {AFTER} published after it in {published_after_in:?}; \
         re-runs {dups}; total {:?} (plus node start-up)",
        started.elapsed()
    );
}
