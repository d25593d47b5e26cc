//! A join's hold channel, kept for the next hold after its part queue's delete, holds
//! nothing on the broker: the held deliveries of the deleted queue are cleared from the
//! channel (RabbitMQ keeps them counted as unacknowledged otherwise). Counted with
//! `rabbitmqctl list_channels`, which the shared broker's tests cannot rely on, so it runs
//! on the private cluster.

use std::time::Duration;

use warren::QueueType;
use warren_core::topology::QueueSpec;
use warren_core::{Broker, Outgoing, Publisher, Take};

use super::Turn;
use crate::common::{config_for, unique};
use crate::support::cluster::Cluster;

/// Unacknowledged messages the broker counts on the channels of the connection named
/// `name` (node `i`).
async fn unacked_on(cluster: &Cluster, i: usize, name: &str) -> u64 {
    let conns = cluster
        .ctl(
            i,
            &[
                "list_connections",
                "-q",
                "--no-table-headers",
                "pid",
                "client_properties",
            ],
        )
        .await
        .expect("list_connections");
    let pids: Vec<String> = conns
        .lines()
        .filter(|l| l.contains(name))
        .filter_map(|l| l.split('\t').next().map(|p| p.trim().to_owned()))
        .collect();
    assert_eq!(pids.len(), 1, "one connection named {name}: {conns}");
    let chans = cluster
        .ctl(
            i,
            &[
                "list_channels",
                "-q",
                "--no-table-headers",
                "connection",
                "messages_unacknowledged",
            ],
        )
        .await
        .expect("list_channels");
    chans
        .lines()
        .filter(|l| l.starts_with(pids[0].as_str()))
        .filter_map(|l| {
            l.split('\t')
                .nth(1)
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_hold_channel_holds_no_unacked_messages() {
    let turn = Turn::take().await;
    let cluster = turn.cluster;
    let name = unique("clheld");
    let broker = Broker::connect(
        config_for(cluster.url(0), QueueType::Quorum).with_connection_name(name.clone()),
    )
    .await
    .expect("connect");
    let publisher = Publisher::new(broker.clone(), 1);
    let queue = format!("part.{name}");
    broker
        .declare(&[QueueSpec::part(&queue, 60_000).expect("spec")])
        .await
        .expect("declare");
    for i in 0..10 {
        publisher
            .publish(&Outgoing::new(
                "",
                queue.clone(),
                format!("r{i}").into_bytes(),
            ))
            .await
            .expect("confirmed");
    }
    let batch = match broker
        .take_exclusive(&queue, 10, Duration::from_millis(500), |_| false)
        .await
        .expect("take")
    {
        Take::Held(b) => b,
        other => panic!("expected a held batch, got {other:?}"),
    };
    assert_eq!(batch.bodies.len(), 10);
    assert_eq!(
        unacked_on(cluster, 0, &name).await,
        10,
        "the hold's 10 deliveries"
    );
    batch.delete_queue(&queue).await.expect("delete");

    // The channel is kept (the next hold opens none) and holds nothing.
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = unacked_on(cluster, 0, &name).await;
        if n == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{n} deliveries of the deleted queue still counted on the kept channel"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let again = format!("{queue}-2");
    broker
        .declare(&[QueueSpec::part(&again, 60_000).expect("spec")])
        .await
        .expect("declare");
    publisher
        .publish(&Outgoing::new("", again.clone(), b"x".to_vec()))
        .await
        .expect("confirmed");
    // (Declares and publishes use channels of their own; count from here.)
    let opened = broker.channels_opened();
    match broker
        .take_exclusive(&again, 1, Duration::from_millis(500), |_| false)
        .await
        .expect("take")
    {
        Take::Held(b) => {
            assert_eq!(
                broker.channels_opened(),
                opened,
                "the kept channel was reused"
            );
            b.delete_queue(&again).await.expect("delete");
        }
        other => panic!("expected a held batch, got {other:?}"),
    }
    broker.close().await;
}
