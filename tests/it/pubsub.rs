//! Durable publish/subscribe against the real broker: every subscribing method gets every
//! message exactly once (ledger by message id), a subscriber that was stopped gets what was
//! published meanwhile, failures are retried, and a message that can never be handled is
//! dead-lettered with the subscription queue as its source.

use crate::common;
use warren::Message;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{config, poll, run_in_background, unique, Cleanup};
use serde::{Deserialize, Serialize};
use warren::{Client, Context, QueueType, RetryPolicy, Service, TaskError, Via, Worker};
use warren_core::topology::{recent_queue, subscription_queue};

#[derive(Serialize, Deserialize, Clone)]
struct Event {
    n: u64,
    #[serde(default)]
    fail_first: bool,
}

/// (subscriber, message id, attempt, redelivered, via, topic) of every handled delivery.
type Ledger = Arc<Mutex<Vec<(String, String, u32, bool, Via, Option<String>)>>>;

fn subscriber(svc: &str, topic: &str, ledger: &Ledger) -> Service {
    let (l, name) = (ledger.clone(), svc.to_owned());
    Service::new(svc)
        .retry(RetryPolicy::fixed(3, Duration::ZERO))
        .method("got", move |ctx: Context, e: Event| {
            let (l, name) = (l.clone(), name.clone());
            async move {
                l.lock().unwrap().push((
                    name,
                    format!("{}", e.n),
                    ctx.attempt(),
                    ctx.redelivered(),
                    ctx.via(),
                    ctx.topic().map(str::to_owned),
                ));
                if e.fail_first && ctx.attempt() == 1 {
                    return Err(TaskError::fail("first delivery fails"));
                }
                Ok::<_, TaskError>(())
            }
        })
        .subscribe(topic, "got")
}

async fn start(svc: &str, topic: &str, ledger: &Ledger) -> common::Running {
    let worker = Worker::builder()
        .amqp(config(QueueType::Quorum))
        .service(subscriber(svc, topic, ledger))
        .concurrency(64)
        .build()
        .await
        .unwrap();
    run_in_background(worker)
}

fn counts(ledger: &Ledger, svc: &str) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for row in ledger.lock().unwrap().iter().filter(|r| r.0 == svc) {
        *out.entry(row.1.clone()).or_default() += 1;
    }
    out
}

async fn delete_topic_queues(client: &Client, topic: &str, subs: &[&str]) {
    for svc in subs {
        let _ = client
            .broker()
            .delete_queue(&subscription_queue(topic, svc, "got"))
            .await;
    }
    let _ = client.broker().delete_queue(&recent_queue(topic)).await;
}

#[tokio::test]
async fn two_subscribers_each_get_every_message_exactly_once() {
    let (a, b) = (unique("sub-a"), unique("sub-b"));
    let topic = unique("topic");
    let _cleanup = Cleanup::new(&[&a, &b]);
    let ledger: Ledger = Arc::default();
    let (ra, rb) = (
        start(&a, &topic, &ledger).await,
        start(&b, &topic, &ledger).await,
    );
    let client = Client::builder()
        .amqp(config(QueueType::Quorum))
        .connect()
        .await
        .unwrap();
    const N: u64 = 5_000;
    let sends = (0..N).map(|n| {
        let (client, topic) = (&client, &topic);
        async move {
            client
                .publish(Message::new(
                    topic,
                    &Event {
                        n,
                        fail_first: n % 1000 == 7,
                    },
                ))
                .await
        }
    });
    let receipts = futures_util::future::try_join_all(sends).await.unwrap();
    assert_eq!(receipts.len(), N as usize);
    for svc in [&a, &b] {
        poll(
            &format!("{svc} to get all {N}"),
            Duration::from_secs(120),
            || async { (counts(&ledger, svc).len() == N as usize).then_some(()) },
        )
        .await;
    }
    for r in [ra, rb] {
        r.stop.cancel();
        r.handle.await.unwrap().unwrap();
    }
    for svc in [&a, &b] {
        let c = counts(&ledger, svc);
        let rows: Vec<_> = ledger
            .lock()
            .unwrap()
            .iter()
            .filter(|r| &r.0 == svc)
            .cloned()
            .collect();
        for (n, times) in &c {
            let fails_first = n.parse::<u64>().unwrap() % 1000 == 7;
            let expected = if fails_first { 2 } else { 1 };
            let extra: Vec<_> = rows.iter().filter(|r| &r.1 == n && r.3).collect();
            assert!(
                *times == expected || *times == expected + extra.len(),
                "{svc} handled message {n} {times} times"
            );
        }
        for r in &rows {
            assert_eq!(
                r.5.as_deref(),
                Some(topic.as_str()),
                "the handler sees its topic"
            );
            if r.2 == 1 {
                assert_eq!(r.4, Via::Publish);
            } else {
                assert_eq!(r.4, Via::Retry, "a failed delivery is retried as a task");
            }
        }
    }
    delete_topic_queues(&client, &topic, &[&a, &b]).await;
    client.close().await;
}

#[tokio::test]
async fn a_stopped_subscriber_gets_what_was_published_meanwhile() {
    let svc = unique("sub-late");
    let topic = unique("topic");
    let _cleanup = Cleanup::new(&[&svc]);
    let ledger: Ledger = Arc::default();
    // The first start creates the subscription queue; then the subscriber is down.
    let r = start(&svc, &topic, &ledger).await;
    r.stop.cancel();
    r.handle.await.unwrap().unwrap();
    let client = Client::builder()
        .amqp(config(QueueType::Quorum))
        .connect()
        .await
        .unwrap();
    for n in 0..300 {
        client
            .publish(Message::new(
                &topic,
                &Event {
                    n,
                    fail_first: false,
                },
            ))
            .await
            .unwrap();
    }
    let waiting = client
        .broker()
        .queue_stats(&subscription_queue(&topic, &svc, "got"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        waiting.ready, 300,
        "messages wait in the subscription queue"
    );
    assert!(ledger.lock().unwrap().is_empty());
    let r = start(&svc, &topic, &ledger).await;
    poll(
        "all 300 after the restart",
        Duration::from_secs(60),
        || async { (counts(&ledger, &svc).len() == 300).then_some(()) },
    )
    .await;
    r.stop.cancel();
    r.handle.await.unwrap().unwrap();
    assert!(counts(&ledger, &svc).values().all(|c| *c == 1));
    delete_topic_queues(&client, &topic, &[&svc]).await;
    client.close().await;
}

#[tokio::test]
async fn a_message_that_cannot_be_handled_is_dead_lettered_from_its_subscription() {
    let svc = unique("sub-poison");
    let topic = unique("topic");
    let _cleanup = Cleanup::new(&[&svc]);
    let ledger: Ledger = Arc::default();
    let r = start(&svc, &topic, &ledger).await;
    let client = Client::builder()
        .amqp(config(QueueType::Quorum))
        .connect()
        .await
        .unwrap();
    client
        .publish(Message::new(&topic, &"not an event"))
        .await
        .unwrap();
    client
        .publish(Message::new(
            &topic,
            &Event {
                n: 1,
                fail_first: false,
            },
        ))
        .await
        .unwrap();
    poll("the good message", Duration::from_secs(30), || async {
        (counts(&ledger, &svc).len() == 1).then_some(())
    })
    .await;
    let dead = poll("the dead letter", Duration::from_secs(30), || async {
        let s = client
            .broker()
            .queue_stats(&format!("warren.dead.{svc}"))
            .await
            .ok()??;
        (s.ready == 1).then_some(s)
    })
    .await;
    assert_eq!(dead.ready, 1);
    r.stop.cancel();
    r.handle.await.unwrap().unwrap();
    delete_topic_queues(&client, &topic, &[&svc]).await;
    client.close().await;
}

#[tokio::test]
async fn publishing_checks_names_and_works_without_subscribers() {
    let client = Client::builder()
        .amqp(config(QueueType::Quorum))
        .connect()
        .await
        .unwrap();
    assert!(client.publish(Message::new("Bad Topic", &1)).await.is_err());
    let topic = unique("lonely");
    let r = client
        .publish(Message::new(&topic, &1).with_cid("my-cid"))
        .await
        .unwrap();
    assert_eq!(r.cid, "my-cid");
    let recent = client
        .broker()
        .queue_stats(&recent_queue(&topic))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        recent.ready, 1,
        "the topic keeps its recent messages for peek"
    );
    let _ = client.broker().delete_queue(&recent_queue(&topic)).await;
    client.close().await;
}

#[tokio::test]
async fn a_worker_with_concurrency_one_serves_its_subscription_and_its_service() {
    // Regression: the permit used to be taken before waiting for a delivery, so an idle
    // service queue held the only permit and the subscription never ran.
    let svc = unique("sub-c1");
    let topic = unique("topic");
    let _cleanup = Cleanup::new(&[&svc]);
    let ledger: Ledger = Arc::default();
    let worker = Worker::builder()
        .amqp(config(QueueType::Quorum))
        .service(subscriber(&svc, &topic, &ledger))
        .concurrency(1)
        .build()
        .await
        .unwrap();
    let r = run_in_background(worker);
    let client = Client::builder()
        .amqp(config(QueueType::Quorum))
        .connect()
        .await
        .unwrap();
    for n in 0..20 {
        client
            .publish(Message::new(
                &topic,
                &Event {
                    n,
                    fail_first: false,
                },
            ))
            .await
            .unwrap();
    }
    poll(
        "20 deliveries at concurrency 1",
        Duration::from_secs(30),
        || async { (counts(&ledger, &svc).len() == 20).then_some(()) },
    )
    .await;
    // And the service queue is served too.
    client
        .enqueue(warren::Task::new(
            format!("{svc}.got"),
            &Event {
                n: 99,
                fail_first: false,
            },
        ))
        .await
        .unwrap();
    poll("the direct task", Duration::from_secs(30), || async {
        counts(&ledger, &svc).contains_key("99").then_some(())
    })
    .await;
    r.stop.cancel();
    r.handle.await.unwrap().unwrap();
    delete_topic_queues(&client, &topic, &[&svc]).await;
    client.close().await;
}
