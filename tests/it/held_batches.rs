//! Held batches (`Broker::take_exclusive`, the join's hold on a part queue) on the real
//! broker: a batch that ends with its queue's delete leaves its channel for the next one,
//! and a reused channel holds, fences and releases exactly like a new one.

use crate::common::{config, unique};

use std::time::Duration;

use warren::QueueType;
use warren_core::topology::QueueSpec;
use warren_core::{Broker, Outgoing, Publisher, Take};

const IDLE: Duration = Duration::from_millis(500);

async fn fill(publisher: &Publisher, queue: &str, n: usize) {
    for i in 0..n {
        publisher
            .publish(&Outgoing::new(
                "",
                queue,
                format!("{queue}/{i}").into_bytes(),
            ))
            .await
            .expect("confirmed");
    }
}

async fn held(broker: &Broker, queue: &str, max: usize) -> warren_core::amqp::Batch {
    match broker
        .take_exclusive(queue, max, IDLE, |_| false)
        .await
        .expect("take")
    {
        Take::Held(b) => b,
        other => panic!("{queue}: expected a held batch, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_batch_leaves_its_channel_for_the_next_hold() {
    let prefix = unique("held");
    let broker = Broker::connect(config(QueueType::Quorum))
        .await
        .expect("connect");
    let publisher = Publisher::new(broker.clone(), 1);
    let queues: Vec<String> = (0..3).map(|i| format!("part.{prefix}-{i}")).collect();
    for q in &queues {
        broker
            .declare(&[QueueSpec::part(q, 60_000).expect("spec")])
            .await
            .expect("declare");
    }
    fill(&publisher, &queues[0], 3).await;
    fill(&publisher, &queues[1], 4).await;
    fill(&publisher, &queues[2], 2).await;

    // The first hold opens a channel; its delete gives it back.
    let first = held(&broker, &queues[0], 3).await;
    assert_eq!(first.bodies.len(), 3);
    first.delete_queue(&queues[0]).await.expect("delete");
    assert_eq!(broker.queue_stats(&queues[0]).await.expect("stats"), None);
    let opened = broker.channels_opened();

    // The second hold runs on that channel: no channel opened, only its own queue's
    // messages delivered (none left over from the first), and it is exclusive.
    let mut second = held(&broker, &queues[1], 4).await;
    assert_eq!(
        broker.channels_opened(),
        opened,
        "the hold channel was reused"
    );
    let mut bodies: Vec<String> = second
        .bodies
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    bodies.sort();
    let want: Vec<String> = (0..4).map(|i| format!("{}/{i}", queues[1])).collect();
    assert_eq!(bodies, want);
    let other = Broker::connect(config(QueueType::Quorum))
        .await
        .expect("connect");
    let stats = other
        .queue_stats(&queues[1])
        .await
        .expect("stats")
        .expect("exists");
    assert_eq!(
        stats.ready, 0,
        "the held messages are not ready to anyone else"
    );

    // A fenced publish on the reused channel is confirmed (its confirm mode is still on).
    publisher
        .publish_held(
            &mut second,
            &Outgoing::new("", queues[2].clone(), b"fenced".to_vec()),
        )
        .await
        .expect("publish on the hold's channel");

    // Release puts every message back (the channel closes; it is not reused).
    second.release().await;
    let ready = poll_ready(&other, &queues[1], 4).await;
    assert_eq!(ready, 4, "released messages are back in the queue");

    // The third hold needs a new channel (the released one was closed), and sees the
    // fenced publish.
    let third = held(&broker, &queues[2], 3).await;
    assert_eq!(broker.channels_opened(), opened + 1);
    assert_eq!(third.bodies.len(), 3);
    assert!(third.bodies.iter().any(|b| b == b"fenced"));
    third.delete_queue(&queues[2]).await.expect("delete");

    // And a hold of the released queue gets all four again, on the kept channel.
    let again = held(&broker, &queues[1], 4).await;
    assert_eq!(broker.channels_opened(), opened + 1);
    assert_eq!(again.bodies.len(), 4);
    again.delete_queue(&queues[1]).await.expect("delete");
    for q in &queues {
        assert_eq!(
            other.queue_stats(q).await.expect("stats"),
            None,
            "{q} deleted"
        );
    }
    other.close().await;
    broker.close().await;
}

/// Polls the ready count of `queue` until it reaches `want` or 10 s pass; returns the last.
async fn poll_ready(broker: &Broker, queue: &str, want: u32) -> u32 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ready = broker
            .queue_stats(queue)
            .await
            .expect("stats")
            .map_or(0, |s| s.ready);
        if ready >= want || tokio::time::Instant::now() >= deadline {
            return ready;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
