//! Delayed tasks (docs/time.md): the cascade of delay levels on the real broker. Lateness of
//! 1,000 random delays, a 2 h delay in the right level (and arriving on sped-up levels),
//! the longest delay and bad input, a service without a queue yet, and survival of a worker
//! SIGKILL and of a broker node restart.

use crate::common;
use crate::support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::{
    check_ledger, config, config_for, ledger_path, poll, run_in_background, unique, wait_keys,
    Cleanup, FixtureWorker, TestLevels,
};
use futures_util::StreamExt;
use support::broker_node::BrokerNode;
use warren::delay::MAX_DELAY;
use warren::{Chain, Client, ClientError, Context, Parallel, QueueType, Service, Task, Worker};
use warren_core::envelope::now_ms;

/// key → every run: its start time (ms since the epoch) and whether the worker marked it as
/// a possible re-run (`ctx.redelivered()`).
type Starts = Arc<Mutex<HashMap<String, Vec<(u64, bool)>>>>;

/// A service whose `at` method records when each key started.
fn recorder(svc: &str, starts: &Starts) -> Service {
    let starts = starts.clone();
    Service::new(svc).method("at", move |ctx: Context, key: String| {
        let starts = starts.clone();
        async move {
            let now = now_ms();
            let run = (now, ctx.redelivered());
            starts.lock().unwrap().entry(key).or_default().push(run);
            Ok::<_, warren::TaskError>(())
        }
    })
}

async fn worker_for(svc: Service, qt: QueueType) -> common::Running {
    let worker = Worker::builder()
        .amqp(config(qt))
        .service(svc)
        .concurrency(64)
        .build()
        .await
        .unwrap();
    run_in_background(worker)
}

async fn client_with(cfg: warren::AmqpConfig) -> Client {
    Client::builder().amqp(cfg).connect().await.unwrap()
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_random_delays_run_once_and_never_early() {
    const N: usize = 1_000;
    let svc = unique("delay1k");
    let _cleanup = Cleanup::new(&[&svc]);
    let starts: Starts = Arc::default();
    let running = worker_for(recorder(&svc, &starts), QueueType::Quorum).await;
    let client = client_with(config(QueueType::Quorum)).await;
    // Delays of 1–30 s in 1 ms steps; `due` counts from just before each send.
    let delays: Vec<Duration> = (0..N)
        .map(|_| Duration::from_millis(rand::random_range(1_000..=30_000)))
        .collect();
    let due: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let send_started = std::time::Instant::now();
    futures_util::stream::iter(delays.iter().enumerate())
        .map(|(i, d)| {
            let (client, due, target) = (&client, due.clone(), format!("{svc}.at"));
            async move {
                let key = format!("k{i}");
                let ms = u64::try_from(d.as_millis()).unwrap();
                due.lock().unwrap().insert(key.clone(), now_ms() + ms);
                client
                    .enqueue(Task::new(target, &key).delay(*d))
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<()>()
        .await;
    eprintln!("{N} delayed tasks sent in {:?}", send_started.elapsed());
    poll("every delayed task ran", Duration::from_secs(120), || {
        let n = starts.lock().unwrap().len();
        async move { (n == N).then_some(()) }
    })
    .await;
    // Every task ran once unmarked at most, never before it was due (delays are rounded up;
    // 5 ms for reading the clock in two places). A second run is allowed only when the worker
    // marked it as a possible re-run (`ctx.redelivered()`): other tests' workers share the
    // due queue and its movers, and one stopped between its publish and its ack moves the
    // message again (docs/time.md).
    let starts = starts.lock().unwrap().clone();
    let due = due.lock().unwrap().clone();
    let mut lateness = Vec::with_capacity(N);
    let mut marked_reruns = 0;
    for (key, runs) in &starts {
        let unmarked = runs.iter().filter(|(_, marked)| !marked).count();
        assert!(
            unmarked <= 1,
            "{key} ran {unmarked} times unmarked: {runs:?}"
        );
        marked_reruns += runs.len() - 1;
        let first = runs.iter().map(|(at, _)| *at).min().unwrap();
        let late = i64::try_from(first).unwrap() - i64::try_from(due[key]).unwrap();
        assert!(late >= -5, "{key} ran {}ms early", -late);
        lateness.push(late);
    }
    lateness.sort_unstable();
    let (p50, p99, max) = (
        percentile(&lateness, 0.5),
        percentile(&lateness, 0.99),
        lateness[N - 1],
    );
    eprintln!(
        "lateness of {N} delays (1-30 s): min {} ms, p50 {p50} ms, p99 {p99} ms, max {max} ms; \
         {marked_reruns} marked re-runs",
        lateness[0]
    );
    assert!(max < 10_000, "a task ran {max} ms late");
    running.stop.cancel();
    running.handle.await.unwrap().unwrap();
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_hour_delay_sits_in_its_top_level_and_arrives_on_sped_up_levels() {
    let two_hours = Duration::from_secs(2 * 3600); // 72,000 units: top bit 16
    let svc = unique("delay2h");
    let _cleanup = Cleanup::new(&[&svc]);

    // Real-time levels of the test's own: the task waits in level 16, and only there.
    let real = TestLevels::new(&svc, 1);
    let client = client_with(real.config(QueueType::Quorum)).await;
    let sent = client
        .enqueue(Task::new(format!("{svc}.at"), &"real").delay(two_hours))
        .await;
    assert!(sent.is_ok(), "a 2 h delay is accepted: {sent:?}");
    let broker = client.broker().clone();
    let ready = poll("the task in level 16", Duration::from_secs(10), || {
        let (real, broker) = (&real, &broker);
        async move {
            let ready = real.ready(broker).await;
            (ready.iter().sum::<u32>() == 1).then_some(ready)
        }
    })
    .await;
    assert_eq!(ready[16], 1, "waits in level 16 (2^16 units): {ready:?}");
    client.close().await;

    // The same delay on levels sped up 1,000 times: the same routing, due after 7.2 s.
    let fast = TestLevels::new(&format!("{svc}-fast"), 1000);
    let starts: Starts = Arc::default();
    let running = worker_for(recorder(&svc, &starts), QueueType::Quorum).await;
    let client = client_with(fast.config(QueueType::Quorum)).await;
    let sent_at = now_ms();
    client
        .enqueue(Task::new(format!("{svc}.at"), &"fast").delay(two_hours))
        .await
        .unwrap();
    let broker = client.broker().clone();
    let ready = poll("the task in a level", Duration::from_secs(5), || {
        let (fast, broker) = (&fast, &broker);
        async move {
            let ready = fast.ready(broker).await;
            (ready.iter().sum::<u32>() >= 1).then_some(ready)
        }
    })
    .await;
    assert_eq!(ready[16], 1, "first waits in level 16: {ready:?}");
    poll("the sped-up 2 h task ran", Duration::from_secs(60), || {
        let ran = starts.lock().unwrap().contains_key("fast");
        async move { ran.then_some(()) }
    })
    .await;
    let after = starts.lock().unwrap()["fast"][0].0 - sent_at;
    // Levels 16, 12, 11, 8 and 6 (72,000 = 2^16 + 2^12 + 2^11 + 2^8 + 2^6), TTLs / 1,000.
    let expected = [16u32, 12, 11, 8, 6]
        .iter()
        .map(|k| (100u64 << k) / 1000)
        .sum::<u64>();
    eprintln!("sped-up 2 h delay ran after {after} ms (expected {expected} ms)");
    assert!(after >= expected, "not before its (sped-up) due time");
    assert!(after < expected + 10_000, "{after} ms");
    assert_eq!(starts.lock().unwrap()["fast"].len(), 1);
    assert!(!starts.lock().unwrap().contains_key("real"));
    running.stop.cancel();
    running.handle.await.unwrap().unwrap();
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_over_the_maximum_is_refused_and_nothing_is_sent() {
    let svc = unique("delaybad");
    let _cleanup = Cleanup::new(&[&svc]);
    let levels = TestLevels::new(&svc, 1);
    let client = client_with(levels.config(QueueType::Quorum)).await;
    let target = format!("{svc}.at");
    let too_long = MAX_DELAY + Duration::from_secs(1);
    let forty_days = SystemTime::now() + Duration::from_secs(40 * 86_400);
    let refusals = [
        client
            .enqueue(Task::new(target.as_str(), &"a").delay(too_long))
            .await
            .err(),
        client
            .enqueue(Task::new(target.as_str(), &"b").at(forty_days))
            .await
            .err(),
        client
            .invoke::<()>(Task::new(target.as_str(), &"c").delay(Duration::MAX))
            .await
            .err(),
        client
            .parallel(
                Parallel::new()
                    .target(target.as_str(), &"d")
                    .delay(too_long),
            )
            .await
            .err(),
        client
            .enqueue_chain(Chain::new().step(target.as_str()).delay(too_long))
            .await
            .err(),
    ];
    for (i, e) in refusals.into_iter().enumerate() {
        match e {
            Some(ClientError::DelayTooLong(e)) => assert_eq!(e.max, MAX_DELAY),
            other => panic!("refusal {i}: expected DelayTooLong, got {other:?}"),
        }
    }
    // Nothing was published, nothing declared: no service queue, no delay level.
    let broker = client.broker().clone();
    assert!(broker
        .queue_stats(&format!("warren.svc.{svc}"))
        .await
        .unwrap()
        .is_none());
    assert!(broker
        .queue_stats(&levels.levels.level(0))
        .await
        .unwrap()
        .is_none());

    // The longest delay itself is accepted and waits in the top level; a time in the past
    // runs at once (no worker here: it waits in the service queue).
    client
        .enqueue(Task::new(target.as_str(), &"max").delay(MAX_DELAY))
        .await
        .unwrap();
    client
        .enqueue(
            Task::new(target.as_str(), &"past").at(SystemTime::now() - Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let ready = levels.ready(&broker).await;
    assert_eq!(ready.iter().sum::<u32>(), 1, "{ready:?}");
    assert_eq!(
        ready[24], 1,
        "the longest delay waits in the top level: {ready:?}"
    );
    assert_eq!(common::service_stats(&broker, &svc).await.ready, 1);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_task_for_a_service_without_workers_waits_in_its_queue() {
    let (svc, other) = (unique("delaywait"), unique("delayother"));
    let _cleanup = Cleanup::new(&[&svc, &other]);
    // The service's queue is classic (declared by the sender); the only worker runs another
    // service on quorum queues. Its mover moves the due task into the consumer-less classic
    // queue (without redeclaring it as its own queue type), and the other service gets no
    // copy.
    let client = client_with(config(QueueType::Classic)).await;
    let other_starts: Starts = Arc::default();
    let other_worker = worker_for(recorder(&other, &other_starts), QueueType::Quorum).await;
    client
        .enqueue(Task::new(format!("{svc}.at"), &"w").delay(Duration::from_millis(500)))
        .await
        .unwrap();
    let broker = client.broker().clone();
    poll(
        "the task due in its service queue",
        Duration::from_secs(30),
        || {
            let broker = &broker;
            let svc = &svc;
            async move { (common::service_stats(broker, svc).await.ready == 1).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        common::service_stats(&broker, &other).await.ready,
        0,
        "delivered to its own queue only"
    );
    let starts: Starts = Arc::default();
    let running = worker_for(recorder(&svc, &starts), QueueType::Classic).await;
    poll("the waiting task ran", Duration::from_secs(30), || {
        let ran = starts.lock().unwrap().contains_key("w");
        async move { ran.then_some(()) }
    })
    .await;
    running.stop.cancel();
    running.handle.await.unwrap().unwrap();
    other_worker.stop.cancel();
    other_worker.handle.await.unwrap().unwrap();
    assert_eq!(starts.lock().unwrap()["w"].len(), 1);
    assert!(
        other_starts.lock().unwrap().is_empty(),
        "the other service ran nothing"
    );
    client.close().await;
}

/// Sends `keys` as the fixture's `work` tasks, each delayed by 4–8 s.
async fn enqueue_delayed(client: &Client, svc: &str, keys: std::ops::Range<usize>) {
    for i in keys {
        let d = Duration::from_millis(4_000 + (i as u64 * 37) % 4_000);
        client
            .enqueue(
                Task::new(
                    format!("{svc}.work"),
                    &serde_json::json!({"key": format!("k{i}"), "ms": 0}),
                )
                .delay(d),
            )
            .await
            .expect("a delayed enqueue succeeds");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_tasks_survive_a_worker_sigkill() {
    const N: usize = 100;
    let url = common::url();
    let svc = unique("delaykill");
    let _cleanup = Cleanup::new(&[&svc]);
    let levels = TestLevels::new(&svc, 1);
    let ledger = ledger_path("delaykill");
    let worker = FixtureWorker::start(&url, &svc, QueueType::Quorum, &ledger, 8).await;
    let client = client_with(levels.config(QueueType::Quorum)).await;
    enqueue_delayed(&client, &svc, 0..N).await;
    // They wait on the broker, not in the worker: kill it while they do.
    let broker = client.broker().clone();
    let waiting = levels.waiting(&broker).await;
    eprintln!("{waiting} of {N} delayed tasks waiting at the kill");
    assert!(waiting > 0, "some tasks still wait when the worker dies");
    worker.kill9().await;
    let worker = FixtureWorker::start(&url, &svc, QueueType::Quorum, &ledger, 8).await;
    wait_keys(&ledger, N, Duration::from_secs(60)).await;
    poll("nothing left waiting", Duration::from_secs(30), || {
        let (levels, broker) = (&levels, &broker);
        async move { (levels.waiting(broker).await == 0).then_some(()) }
    })
    .await;
    assert!(worker.terminate().await, "worker exits cleanly");
    let dups = check_ledger(&ledger, N);
    eprintln!("{dups} marked redeliveries");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_tasks_survive_a_broker_node_restart() {
    const N: usize = 100;
    let mut node = BrokerNode::start()
        .await
        .expect("private RabbitMQ node starts");
    let url = node.amqp_url();
    let svc = unique("delayrestart");
    let ledger = ledger_path("delayrestart");
    let client = client_with(
        config_for(&url, QueueType::Quorum).with_publish_timeout(Duration::from_secs(120)),
    )
    .await;
    // No worker yet: the sender declares the service queue before the delayed publishes.
    enqueue_delayed(&client, &svc, 0..N).await;
    node.restart().await.expect("node restarts");
    // Sent after the restart too: the levels are still there (durable).
    enqueue_delayed(&client, &svc, N..N + 20).await;
    let worker = FixtureWorker::start(&url, &svc, QueueType::Quorum, &ledger, 8).await;
    wait_keys(&ledger, N + 20, Duration::from_secs(120)).await;
    let broker = client.broker().clone();
    poll("an idle service", Duration::from_secs(30), || {
        let (broker, svc) = (&broker, &svc);
        async move { (common::service_stats(broker, svc).await.ready == 0).then_some(()) }
    })
    .await;
    assert!(worker.terminate().await, "worker exits cleanly");
    let dups = check_ledger(&ledger, N + 20);
    eprintln!("{dups} marked redeliveries after the restart");
    client.close().await;
}

/// A due message that comes back to a mover (an earlier mover stopped or was killed between
/// its publish and its ack, so the broker redelivered it) is moved again marked
/// `warren-resent`, which the worker shows as `ctx.redelivered()`; a first move is unmarked.
/// The test moves from a due queue of its own (the shared one has every worker's mover on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_message_moved_again_is_marked_as_a_possible_rerun() {
    use lapin::options::BasicGetOptions;
    use lapin::types::AMQPValue;
    use lapin::{Connection, ConnectionProperties};
    use warren_core::amqp::{
        Broker, ConsumerEvent, HeaderValue, Incoming, Outgoing, Publisher, Subscription,
        SubscriptionSpec, TaskSender,
    };
    use warren_core::delay::H_DEST;
    use warren_core::topology::{QueueSpec, H_RESENT};

    let qt = QueueType::Quorum;
    let svc = unique("moveagain");
    let _cleanup = Cleanup::new(&[&svc]);
    let due_q = format!("t-{svc}-due");
    let broker = Broker::connect(config(qt)).await.unwrap();
    let due_spec = QueueSpec {
        name: due_q.clone(),
        durable: true,
        expires_ms: Some(120_000),
        ..QueueSpec::default()
    };
    broker
        .declare(&[QueueSpec::service(&svc, qt).unwrap(), due_spec.clone()])
        .await
        .unwrap();
    let publisher = Publisher::new(broker.clone(), 1);
    for key in ["first", "again"] {
        let mut msg = Outgoing::new("", due_q.clone(), key.as_bytes().to_vec());
        msg.message_id = Some(key.to_owned());
        msg.headers.push((
            H_DEST.to_owned(),
            HeaderValue::Str(format!("warren.svc.{svc}")),
        ));
        publisher.publish(&msg).await.unwrap();
    }

    let sender = TaskSender::new(&broker, publisher.clone());
    let spec = SubscriptionSpec {
        queue: due_spec,
        also_declare: Vec::new(),
        prefetch: 1,
        no_ack: false,
        max_pause: SubscriptionSpec::PAUSE,
    };
    let mut sub = Subscription::lazy(broker.clone(), spec);
    async fn next(sub: &mut Subscription) -> Incoming {
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), sub.next()).await;
            match event.expect("a due message within 10 s").unwrap() {
                Some(ConsumerEvent::Delivery(d)) => return d,
                Some(ConsumerEvent::Resubscribed) => continue,
                None => panic!("the subscription ended"),
            }
        }
    }
    let deadline = || tokio::time::Instant::now() + Duration::from_secs(10);
    let moved = |d: Incoming| {
        let sender = &sender;
        async move {
            sender.deliver_due(&d, deadline()).await.unwrap();
            assert!(d.ack().await.unwrap(), "the due message is acked");
        }
    };
    // The first is moved once. The second comes back before its ack, as it does to the
    // next mover when one dies after its publish, and is moved again.
    let first = next(&mut sub).await;
    assert_eq!(first.message_id(), Some("first"));
    assert!(!first.redelivered);
    moved(first).await;
    let again = next(&mut sub).await;
    assert_eq!(again.message_id(), Some("again"));
    assert!(again.reject(true).await.unwrap());
    let again = next(&mut sub).await;
    assert_eq!(again.message_id(), Some("again"));
    assert!(again.redelivered, "the broker marks it redelivered");
    moved(again).await;
    sub.close().await;

    // What reached the service queue, and how each copy is marked.
    let conn = Connection::connect(&common::url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut marks = HashMap::new();
    for _ in 0..2 {
        let got = ch
            .basic_get(
                format!("warren.svc.{svc}").as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
            .expect("a moved message in the service queue");
        let props = &got.delivery.properties;
        let id = props.message_id().as_ref().unwrap().to_string();
        let resent = props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(H_RESENT).cloned());
        marks.insert(id, resent);
    }
    assert_eq!(marks["first"], None, "a first move is not marked");
    assert_eq!(
        marks["again"],
        Some(AMQPValue::Boolean(true)),
        "a second move is marked warren-resent"
    );
    conn.close(200, "bye".into()).await.unwrap();
    broker.delete_queue(&due_q).await.unwrap();
}
