//! Dead letters against the real broker: listing them leaves them in place and in order;
//! replaying them (all, or by id) after the handler was fixed runs each task once more and
//! empties the dead-letter queue; an interrupted replay loses nothing and the duplicate it
//! may cause is marked with `x-warren-replayed`.
//!
//! These tests call `warren_ops` (what `warren dead list|replay` runs): the
//! `warren` binary belongs to the warren-cli package, which this package's tests cannot
//! start (`CARGO_BIN_EXE_*` only names the binaries of the package under test). The CLI
//! adds only option parsing and printing, unit-tested in crates/cli/src/dead.rs.

use crate::common;
use warren::Task;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{config, poll, run_in_background, unique, Cleanup};
use uuid::Uuid;
use warren::{Client, Context, QueueType, Receipt, RetryPolicy, Service, TaskError, Worker};
use warren_core::topology::{DEAD_EXCHANGE, H_REASON, H_SOURCE_QUEUE};
use warren_core::{Broker, HeaderValue, Outgoing, Publisher};
use warren_ops::{DeadLetter, DeadLetterOps, ReplaySelection, H_REPLAYED};

/// Every handler run: (succeeded, payload, task id).
type Ledger = Arc<Mutex<Vec<(bool, u64, Uuid)>>>;

/// A worker for `<svc>.work` whose handler fails (`fixed == false`, no retries: the task is
/// dead-lettered at once) or succeeds, recording each run.
async fn worker(svc: &str, qt: QueueType, ledger: Ledger, fixed: bool) -> common::Running {
    let service = Service::new(svc)
        .method("work", move |ctx: Context, n: u64| {
            let ledger = ledger.clone();
            async move {
                ledger.lock().unwrap().push((fixed, n, ctx.task_id()));
                if fixed {
                    Ok(n)
                } else {
                    Err(TaskError::fail(format!("boom {n}")))
                }
            }
        })
        .retry(RetryPolicy::none());
    let worker = Worker::builder()
        .amqp(config(qt))
        .service(service)
        // One at a time, so tasks are dead-lettered in the order they were enqueued.
        .concurrency(1)
        .build()
        .await
        .expect("worker starts");
    run_in_background(worker)
}

fn now_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

async fn ready(broker: &Broker, queue: &str) -> u32 {
    broker
        .queue_stats(queue)
        .await
        .expect("queue check")
        .map_or(0, |s| s.ready)
}

/// Waits until `queue` reports `n` ready messages (a quorum queue's count can lag a moment
/// behind requeues and acks).
async fn wait_ready(broker: &Broker, queue: &str, n: u32) {
    poll(
        &format!("{n} message(s) ready in {queue}"),
        Duration::from_secs(30),
        || async move { (ready(broker, queue).await == n).then_some(()) },
    )
    .await;
}

/// Dead-letters `n` tasks (payloads 0..n) of a fresh service with a failing handler, then
/// stops that worker; returns the receipts in order.
async fn dead_letter_tasks(
    svc: &str,
    qt: QueueType,
    client: &Client,
    ledger: &Ledger,
    n: u64,
) -> Vec<Receipt> {
    let failing = worker(svc, qt, ledger.clone(), false).await;
    let mut receipts = Vec::new();
    for i in 0..n {
        receipts.push(
            client
                .enqueue(Task::new(format!("{svc}.work"), &i))
                .await
                .unwrap(),
        );
    }
    wait_ready(
        client.broker(),
        &format!("warren.dead.{svc}"),
        u32::try_from(n).unwrap(),
    )
    .await;
    failing.stop_cleanly().await;
    receipts
}

/// Payload of the sentinel task [`run_sentinel`] enqueues.
const SENTINEL: u64 = 1_000_000;

/// Enqueues a sentinel task to `<svc>.work` and waits until the (fixed, one-at-a-time)
/// worker ran it. The service queue is FIFO and the worker takes one task at a time, so
/// whatever was in the queue before the sentinel has run by then: no time window needed to
/// show that nothing else runs. Returns the sentinel's task id.
async fn run_sentinel(client: &Client, svc: &str, ledger: &Ledger) -> Uuid {
    let id = client
        .enqueue(Task::new(format!("{svc}.work"), &SENTINEL))
        .await
        .unwrap()
        .id;
    poll("the sentinel task ran", Duration::from_secs(30), || {
        let ledger = ledger.clone();
        async move {
            ledger
                .lock()
                .unwrap()
                .iter()
                .any(|e| e.2 == id)
                .then_some(())
        }
    })
    .await;
    id
}

/// The ledger without the sentinel's run, after checking it ran once, successfully, last.
fn without(ledger: &Ledger, sentinel: Uuid) -> Vec<(bool, u64, Uuid)> {
    let mut runs = ledger.lock().unwrap().clone();
    let last = runs.pop().expect("the sentinel ran");
    assert_eq!(
        last,
        (true, SENTINEL, sentinel),
        "the sentinel ran last: {runs:?}"
    );
    assert!(
        runs.iter().all(|e| e.2 != sentinel),
        "the sentinel ran once: {runs:?}"
    );
    runs
}

fn ids(letters: &[DeadLetter]) -> Vec<String> {
    letters.iter().map(|l| l.task_id.clone().unwrap()).collect()
}

async fn list_then_replay_all(qt: QueueType) {
    let svc = unique("dead");
    let _cleanup = Cleanup::new(&[&svc]);
    let dead_q = format!("warren.dead.{svc}");
    let svc_q = format!("warren.svc.{svc}");
    let ledger: Ledger = Arc::default();
    let client = Client::builder().amqp(config(qt)).connect().await.unwrap();
    let broker = client.broker().clone();

    let before = now_ms();
    let receipts = dead_letter_tasks(&svc, qt, &client, &ledger, 3).await;
    let after = now_ms();
    let expected: Vec<String> = receipts.iter().map(|r| r.id.to_string()).collect();

    // The listing: every field, oldest first.
    let listing = broker.dead_letters(&svc, None).await.unwrap().unwrap();
    assert_eq!(listing.queue, dead_q);
    assert_eq!(listing.total, 3);
    assert_eq!(ids(&listing.letters), expected);
    for (i, (l, r)) in listing.letters.iter().zip(&receipts).enumerate() {
        assert_eq!(l.index, i);
        assert_eq!(l.cid.as_deref(), Some(r.cid.as_str()));
        assert_eq!(l.target.as_deref(), Some(format!("{svc}.work").as_str()));
        assert_eq!(l.reason.as_deref(), Some("handler"));
        assert_eq!(l.error.as_deref(), Some(format!("boom {i}").as_str()));
        assert_eq!(l.source_queue.as_deref(), Some(svc_q.as_str()));
        let at = l.dead_at_ms.expect("dead-at header");
        assert!(
            (before..=after).contains(&at),
            "{at} not in {before}..={after}"
        );
        assert_eq!(l.replayed, 0);
        assert!(!l.by_broker);
        let body: serde_json::Value = serde_json::from_slice(&l.body).unwrap();
        assert_eq!(body["payload"], serde_json::json!(i));
    }

    // Listing is not destructive and keeps the order, with or without a limit.
    let first_two = broker.dead_letters(&svc, Some(2)).await.unwrap().unwrap();
    assert_eq!(first_two.total, 3);
    assert_eq!(ids(&first_two.letters), expected[..2]);
    let again = broker.dead_letters(&svc, None).await.unwrap().unwrap();
    assert_eq!(ids(&again.letters), expected);
    assert!(again.letters.iter().all(|l| l.redelivered));
    wait_ready(&broker, &dead_q, 3).await;

    // The handler is fixed: replay everything.
    let fixed = worker(&svc, qt, ledger.clone(), true).await;
    let publisher = Publisher::new(broker.clone(), 1);
    let report = broker
        .replay_dead_letters(&publisher, &svc, &ReplaySelection::All)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.looked_at, 3);
    assert_eq!(report.skipped, 0);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert!(!report.interrupted);
    assert_eq!(
        report
            .replayed
            .iter()
            .map(|r| r.task_id.clone().unwrap())
            .collect::<Vec<_>>(),
        expected
    );
    assert!(report
        .replayed
        .iter()
        .all(|r| r.replay_count == 1 && r.destination == svc_q));

    poll("the replayed tasks ran", Duration::from_secs(30), || {
        let ledger = ledger.clone();
        async move { (ledger.lock().unwrap().iter().filter(|e| e.0).count() >= 3).then_some(()) }
    })
    .await;
    // Anything else the replay put in the service queue runs before a task enqueued now.
    let sentinel = run_sentinel(&client, &svc, &ledger).await;
    fixed.stop_cleanly().await;
    let runs = without(&ledger, sentinel);
    assert_eq!(
        runs.len(),
        6,
        "each task failed once and ran once more: {runs:?}"
    );
    for (i, r) in receipts.iter().enumerate() {
        let n = u64::try_from(i).unwrap();
        let mine: Vec<bool> = runs
            .iter()
            .filter(|e| e.2 == r.id)
            .map(|e| {
                assert_eq!(e.1, n);
                e.0
            })
            .collect();
        assert_eq!(
            mine,
            [false, true],
            "task {n} (same task id) failed, then succeeded"
        );
    }
    wait_ready(&broker, &dead_q, 0).await;
    let empty = broker.dead_letters(&svc, None).await.unwrap().unwrap();
    assert!(empty.letters.is_empty());
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_then_replay_all_quorum() {
    list_then_replay_all(QueueType::Quorum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_then_replay_all_classic() {
    list_then_replay_all(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_by_id_replays_only_that_one() {
    let qt = QueueType::Quorum;
    let svc = unique("dead-id");
    let _cleanup = Cleanup::new(&[&svc]);
    let dead_q = format!("warren.dead.{svc}");
    let svc_q = format!("warren.svc.{svc}");
    let ledger: Ledger = Arc::default();
    let client = Client::builder().amqp(config(qt)).connect().await.unwrap();
    let broker = client.broker().clone();
    let publisher = Publisher::new(broker.clone(), 1);

    // A service that never had a worker has no dead-letter queue.
    let nobody = unique("dead-none");
    assert!(broker.dead_letters(&nobody, None).await.unwrap().is_none());

    let receipts = dead_letter_tasks(&svc, qt, &client, &ledger, 3).await;
    let [a, b, c] = [0, 1, 2].map(|i| receipts[i].id.to_string());
    let listing = broker.dead_letters(&svc, None).await.unwrap().unwrap();
    assert_eq!(ids(&listing.letters), [a.clone(), b.clone(), c.clone()]);

    // An unknown id: nothing is replayed, and the report names it.
    let report = broker
        .replay_dead_letters(
            &publisher,
            &svc,
            &ReplaySelection::Ids(vec![b.clone(), "no-such-task".into()]),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.unmatched, ["no-such-task"]);
    assert!(report.replayed.is_empty());
    assert_eq!(ready(&broker, &svc_q).await, 0);
    let still = broker.dead_letters(&svc, None).await.unwrap().unwrap();
    assert_eq!(ids(&still.letters), [a.clone(), b.clone(), c.clone()]);

    // The middle one of three, by id; the others stay, in order.
    let report = broker
        .replay_dead_letters(&publisher, &svc, &ReplaySelection::Ids(vec![b.clone()]))
        .await
        .unwrap()
        .unwrap();
    assert!(report.unmatched.is_empty() && report.failed.is_empty());
    assert_eq!(report.skipped, 2);
    assert_eq!(report.replayed.len(), 1);
    assert_eq!(report.replayed[0].task_id.as_deref(), Some(b.as_str()));
    let left = broker.dead_letters(&svc, None).await.unwrap().unwrap();
    assert_eq!(ids(&left.letters), [a.clone(), c.clone()]);

    // What reached the service queue: the same body, ids and cid, marked as a replay,
    // without the dead letter's own headers.
    let held = broker.hold(&svc_q, None).await.unwrap().unwrap();
    assert_eq!(held.messages.len(), 1);
    let m = &held.messages[0];
    assert_eq!(m.body, listing.letters[1].body);
    assert_eq!(m.message_id(), Some(b.as_str()));
    assert_eq!(m.correlation_id(), Some(receipts[1].cid.as_str()));
    assert_eq!(m.header(H_REPLAYED), Some(HeaderValue::Int(1)));
    assert_eq!(m.header(H_REASON), None);
    held.release().await.unwrap();

    // The fixed handler runs it; the other tasks stay dead.
    let fixed = worker(&svc, qt, ledger.clone(), true).await;
    poll("the replayed task ran", Duration::from_secs(30), || {
        let ledger = ledger.clone();
        async move { ledger.lock().unwrap().iter().any(|e| e.0).then_some(()) }
    })
    .await;
    // Anything else in the service queue runs before a task enqueued now.
    let sentinel = run_sentinel(&client, &svc, &ledger).await;
    fixed.stop_cleanly().await;
    let ok: Vec<Uuid> = without(&ledger, sentinel)
        .iter()
        .filter(|e| e.0)
        .map(|e| e.2)
        .collect();
    assert_eq!(ok, [receipts[1].id]);
    wait_ready(&broker, &dead_q, 2).await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interrupted_replay_loses_nothing_and_marks_the_duplicate() {
    let qt = QueueType::Quorum;
    let svc = unique("dead-crash");
    let _cleanup = Cleanup::new(&[&svc]);
    let dead_q = format!("warren.dead.{svc}");
    let svc_q = format!("warren.svc.{svc}");
    let ledger: Ledger = Arc::default();
    let client = Client::builder().amqp(config(qt)).connect().await.unwrap();
    let broker = client.broker().clone();
    let receipts = dead_letter_tasks(&svc, qt, &client, &ledger, 1).await;
    let id = receipts[0].id.to_string();

    // A replay that dies after its publish was confirmed, before it removed the dead letter:
    // the same steps as `replay_dead_letters`, then the connection closes without the ack.
    let crashing = Broker::connect(config(qt)).await.unwrap();
    let held = crashing.hold(&dead_q, None).await.unwrap().unwrap();
    assert_eq!(held.messages.len(), 1);
    let letter = DeadLetter::parse(0, &held.messages[0]);
    Publisher::new(crashing.clone(), 1)
        .publish(&letter.replay_message(&svc).unwrap())
        .await
        .expect("the replayed copy is confirmed");
    crashing.close().await;
    drop(held);

    // Nothing lost: the copy is in the service queue and the dead letter is back.
    wait_ready(&broker, &dead_q, 1).await;
    wait_ready(&broker, &svc_q, 1).await;
    let listing = broker.dead_letters(&svc, None).await.unwrap().unwrap();
    assert_eq!(ids(&listing.letters), std::slice::from_ref(&id));

    // Replaying again duplicates the task; both copies say they are replays.
    let publisher = Publisher::new(broker.clone(), 1);
    let report = broker
        .replay_dead_letters(&publisher, &svc, &ReplaySelection::All)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.replayed.len(), 1);
    wait_ready(&broker, &dead_q, 0).await;

    // A dead letter that was replayed before (as the broker's own dead-lettering keeps the
    // headers) is replayed with its count + 1.
    let mut again = Outgoing::new(DEAD_EXCHANGE, svc.as_str(), letter.body.clone());
    again.message_id = Some("replayed-twice".into());
    again.headers = vec![
        (H_REASON.into(), HeaderValue::Str("handler".into())),
        (H_SOURCE_QUEUE.into(), HeaderValue::Str(svc_q.clone())),
        (H_REPLAYED.into(), HeaderValue::Int(2)),
    ];
    publisher.publish(&again).await.unwrap();
    let report = broker
        .replay_dead_letters(
            &publisher,
            &svc,
            &ReplaySelection::Ids(vec!["replayed-twice".into()]),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.replayed.len(), 1);
    assert_eq!(report.replayed[0].replay_count, 3);

    let held = broker.hold(&svc_q, None).await.unwrap().unwrap();
    let seen: Vec<(Option<&str>, Option<HeaderValue>)> = held
        .messages
        .iter()
        .map(|m| (m.message_id(), m.header(H_REPLAYED)))
        .collect();
    assert_eq!(
        seen,
        [
            (Some(id.as_str()), Some(HeaderValue::Int(1))),
            (Some(id.as_str()), Some(HeaderValue::Int(1))),
            (Some("replayed-twice"), Some(HeaderValue::Int(3))),
        ]
    );
    assert!(held.messages.iter().all(|m| m.body == letter.body));
    held.release().await.unwrap();
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_dead_letters_are_listed_and_replayed() {
    use lapin::options::{BasicGetOptions, BasicPublishOptions, BasicRejectOptions};
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    use warren_core::topology::{QueueSpec, TASK_EXCHANGE};

    let qt = QueueType::Quorum;
    let svc = unique("dead-broker");
    let _cleanup = Cleanup::new(&[&svc]);
    let dead_q = format!("warren.dead.{svc}");
    let svc_q = format!("warren.svc.{svc}");
    let broker = Broker::connect(config(qt)).await.unwrap();
    broker
        .declare(&[
            QueueSpec::dead(&svc, qt).unwrap(),
            QueueSpec::service(&svc, qt).unwrap(),
        ])
        .await
        .unwrap();

    // A task (replayed once before) that the broker dead-letters itself: rejected without
    // requeue, as it would after the quorum queue's delivery limit.
    let conn = Connection::connect(&common::url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let body = format!(
        r#"{{"v":1,"id":"00000000-0000-7000-8000-000000000001","cid":"c1","svc":"{svc}","method":"work","payload":7}}"#
    );
    let mut headers = FieldTable::default();
    headers.insert(H_REPLAYED.into(), AMQPValue::LongLongInt(1));
    let props = BasicProperties::default()
        .with_message_id("00000000-0000-7000-8000-000000000001".into())
        .with_correlation_id("c1".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    ch.basic_publish(
        TASK_EXCHANGE.into(),
        svc.as_str().into(),
        BasicPublishOptions::default(),
        body.as_bytes(),
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let got = poll("the task", Duration::from_secs(10), || {
        let ch = ch.clone();
        let q = svc_q.clone();
        async move {
            ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .unwrap()
        }
    })
    .await;
    got.delivery
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    conn.close(200, "bye".into()).await.unwrap();
    wait_ready(&broker, &dead_q, 1).await;

    let listing = broker.dead_letters(&svc, None).await.unwrap().unwrap();
    let l = &listing.letters[0];
    assert!(l.by_broker);
    assert_eq!(l.reason.as_deref(), Some("broker:rejected"));
    assert_eq!(l.source_queue.as_deref(), Some(svc_q.as_str()));
    assert_eq!(
        l.task_id.as_deref(),
        Some("00000000-0000-7000-8000-000000000001")
    );
    assert_eq!(l.cid.as_deref(), Some("c1"));
    assert_eq!(l.target, Some(format!("{svc}.work")));
    assert_eq!(l.replayed, 1);
    assert!(l.dead_at_ms.is_some());

    let publisher = Publisher::new(broker.clone(), 1);
    let report = broker
        .replay_dead_letters(&publisher, &svc, &ReplaySelection::All)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.replayed.len(), 1);
    assert_eq!(report.replayed[0].replay_count, 2);
    let held = broker.hold(&svc_q, None).await.unwrap().unwrap();
    assert_eq!(held.messages.len(), 1);
    let m = &held.messages[0];
    assert_eq!(m.body, body.as_bytes());
    assert_eq!(m.header(H_REPLAYED), Some(HeaderValue::Int(2)));
    assert_eq!(
        m.header("x-death"),
        None,
        "the broker's death record is not carried"
    );
    assert_eq!(m.correlation_id(), Some("c1"));
    held.release().await.unwrap();
    broker.close().await;
}
