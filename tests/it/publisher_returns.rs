//! Returns of unroutable messages are attributed to the right publish. lapin hands a
//! returned message to whichever confirm it completes next, which under multiple-acks can be
//! another publish of the same channel; warren matches returns to publishes by exchange,
//! routing key and message id. With routable and unroutable publishes interleaved on one
//! channel, every routable one must succeed and (all but a rare few) unroutable ones fail.

use crate::common;

use common::{config, unique};
use futures_util::StreamExt;
use warren_core::topology::QueueSpec;
use warren_core::{Broker, Error, Outgoing, Publisher, QueueType};

#[tokio::test]
async fn every_return_reaches_its_own_publish() {
    let broker = Broker::connect(config(QueueType::Classic)).await.unwrap();
    let queue = unique("returns");
    broker
        .declare(&[QueueSpec {
            name: queue.clone(),
            durable: false,
            queue_type: Some(QueueType::Classic),
            ..QueueSpec::default()
        }])
        .await
        .unwrap();
    // One channel, so returns and confirms of both kinds share it.
    let publisher = Publisher::new(broker.clone(), 1);
    let results: Vec<(bool, Result<(), Error>)> = futures_util::stream::iter(0..2_000u32)
        .map(|i| {
            let publisher = publisher.clone();
            let routable = i % 3 != 0;
            let target = if routable {
                queue.clone()
            } else {
                format!("{queue}-missing-{i}")
            };
            async move {
                let mut msg = Outgoing::new("", target, b"{}".to_vec());
                msg.message_id = Some(format!("m{i}"));
                (routable, publisher.publish(&msg).await)
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    // A routable publish never fails because of someone else's return (guaranteed by the
    // matching). An unroutable one can, rarely, be reported as sent: its return went to
    // another publish whose task had not parked it yet when the owner looked (a race lapin's
    // API cannot close; docs/guarantees.md). Without the matching, ~150 of 2,000 were wrong.
    let mut wrong = Vec::new();
    let mut missed = 0;
    for (routable, r) in &results {
        match (routable, r) {
            (true, Ok(())) | (false, Err(Error::Unroutable { .. })) => {}
            (false, Ok(())) => missed += 1,
            other => wrong.push(format!("{other:?}")),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} misattributed: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert!(
        missed <= 6,
        "{missed} of 667 unroutable publishes reported as sent"
    );
    let stats = broker.queue_stats(&queue).await.unwrap().unwrap();
    assert_eq!(stats.ready, 1_333, "every routable message arrived once");
    broker.delete_queue(&queue).await.unwrap();
    broker.close().await;
}
