//! Cluster faults on a private three-node RabbitMQ cluster (tests/support/cluster.rs), started
//! once for this binary; the tests take turns (`Cluster::lock`). Clients and fixture worker
//! processes are given all three URLs, so they fail over when the node they use dies.
//!
//! * `enqueue_through_a_leader_kill`: 20,000 enqueues from 16 callers while the leader of the
//!   service's quorum queue is SIGKILLed and restarted: no enqueue fails, every acknowledged
//!   enqueue runs, and every second run of a task is marked (redelivered or attempt > 1).
//! * `split_job_through_a_node_kill`: a 200-part split job whose part queue's node is
//!   SIGKILLed mid-job and restarted: the hook fires once, with all 200 results in order.
//! * `invokes_through_a_node_kill`: 64 invokes in flight while the service queue's leader
//!   is killed: each returns by its deadline + 1 s, with its result or a timeout.
//! * `retries_through_a_kill_of_another_node` / `retries_through_a_kill_of_the_delay_node`:
//!   200 tasks whose attempt 1 fails and whose retry (1 s later, through delay levels of the
//!   test's own on the node of `warren.delay.due`) succeeds, while the service's node, or
//!   the delay node, is SIGKILLed and restarted: every task succeeds, any re-run is marked;
//!   with the delay node killed, retries wait until it is back and those moving between
//!   delay queues at the crash may be lost (asserted: only those).
//! * `fan_in_through_a_node_kill`: 100 targets while the fan-in's part queue's node is
//!   killed: the final callback fires once, with all 100 outcomes in order.
//! * `topic_through_a_node_kill`: 200 publishes while the subscription's leader is killed:
//!   every confirmed publish is received, re-runs marked.
//! * `chains_through_a_node_kill`: 20 chains of 3 steps while the service queue's leader is
//!   killed: each ends with the right result (read from a Redis status store), every step
//!   ran, re-runs marked.
//! * `queues_with_their_node_down`: what the broker itself does (raw lapin) with a classic
//!   queue whose home node is down and a quorum queue whose leader died; printed for the
//!   record, and the recoveries asserted.

use crate::common;

use crate::support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{config_for, hook_lines, ledger_path, read_ledger, unique, Cleanup, FixtureWorker};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::Value;
use support::cluster::Cluster;
use warren::delay::DelayLevels;
use warren::{
    Chain, Client, FanInOutcome, Message, Parallel, QueueType, RedisStore, RetryPolicy, Target,
    Task,
};
use warren_core::delay::DUE_QUEUE;
use warren_core::topology::{fanout_queue, recent_queue, subscription_queue};
use warren_core::{Broker, Publisher, ReconnectPolicy, TaskSender};

async fn client_for(urls: &str) -> Client {
    Client::builder()
        .amqp(config_for(urls, QueueType::Quorum))
        .connect()
        .await
        .expect("client connects to the cluster")
}

/// Polls `check` every 50 ms until it is true; panics with `what` after `deadline`.
async fn wait_for(what: &str, deadline: Duration, mut check: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + deadline;
    while !check() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Ledger runs per key: `(attempt, redelivered)` in ledger order.
fn runs_by_key(ledger: &Path) -> HashMap<String, Vec<(u32, bool)>> {
    let mut runs: HashMap<String, Vec<(u32, bool)>> = HashMap::new();
    for (k, attempt, red) in read_ledger(ledger) {
        runs.entry(k).or_default().push((attempt, red));
    }
    runs
}

/// Re-runs in the ledger: (all of them, those neither redelivered nor a later attempt).
fn duplicates(runs: &HashMap<String, Vec<(u32, bool)>>) -> (usize, Vec<String>) {
    let mut dups = 0;
    let mut unmarked = Vec::new();
    for (k, r) in runs {
        dups += r.len() - 1;
        if r[1..].iter().any(|&(attempt, red)| !red && attempt <= 1) {
            unmarked.push(format!("{k}: {r:?}"));
        }
    }
    unmarked.sort();
    (dups, unmarked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_through_a_leader_kill() {
    const N: usize = 20_000;
    const CALLERS: usize = 16;
    const KILL_AT: usize = 5_000;
    let cluster = Cluster::shared().await;
    let _turn = cluster.lock().await;
    let started = Instant::now();
    let urls = cluster.url_list();
    let svc = unique("clenq");
    let _cleanup = Cleanup::on(&urls, &[&svc]);
    let ledger = ledger_path("clenq");
    let worker = FixtureWorker::start(&urls, &svc, QueueType::Quorum, &ledger, 32).await;
    let client = client_for(&urls).await;
    let queue = format!("warren.svc.{svc}");
    let leader = cluster
        .leader_of(&queue)
        .await
        .expect("service queue leader");
    eprintln!("[enqueue] service queue leader: node {leader}");

    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    // (key index, ms since start, error)
    let errors: Arc<Mutex<Vec<(usize, u128, String)>>> = Arc::default();
    let acked: Arc<Mutex<Vec<usize>>> = Arc::default();
    let t0 = Instant::now();
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (client, svc, next, ok, errors, acked) = (
                client.clone(),
                svc.clone(),
                next.clone(),
                ok.clone(),
                errors.clone(),
                acked.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= N {
                        return;
                    }
                    let payload = serde_json::json!({"key": format!("k{i}"), "ms": 0});
                    match client
                        .enqueue(Task::new(format!("{svc}.work"), &payload))
                        .await
                    {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                            acked.lock().unwrap().push(i);
                        }
                        Err(e) => errors.lock().unwrap().push((
                            i,
                            t0.elapsed().as_millis(),
                            format!("{e:#}"),
                        )),
                    }
                }
            })
        })
        .collect();

    // Kill the leader once a quarter of the enqueues are acknowledged, then bring it back
    // while the callers go on.
    wait_for("the first enqueues", Duration::from_secs(120), || {
        ok.load(Ordering::SeqCst) >= KILL_AT
    })
    .await;
    let killed_at = t0.elapsed();
    cluster.kill(leader).await.expect("kill the leader");
    eprintln!(
        "[enqueue] killed node {leader} at {killed_at:?} after {} acked enqueues",
        ok.load(Ordering::SeqCst)
    );
    let restart_started = Instant::now();
    cluster.restart(leader).await.expect("leader node restarts");
    eprintln!(
        "[enqueue] node {leader} back in {:?} ({} acked so far); new leader: {:?}",
        restart_started.elapsed(),
        ok.load(Ordering::SeqCst),
        cluster.leader_of(&queue).await.ok()
    );
    for c in callers {
        tokio::time::timeout(Duration::from_secs(300), c)
            .await
            .expect("callers finish")
            .expect("caller task");
    }
    let enqueue_time = t0.elapsed();
    let errors = std::mem::take(&mut *errors.lock().unwrap());
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    eprintln!(
        "[enqueue] {} acked, {} failed in {enqueue_time:?}",
        acked.len(),
        errors.len()
    );
    let mut kinds: BTreeMap<String, (usize, u128, u128)> = BTreeMap::new();
    for (_, at, e) in &errors {
        let k = kinds.entry(e.clone()).or_insert((0, u128::MAX, 0));
        k.0 += 1;
        k.1 = k.1.min(*at);
        k.2 = k.2.max(*at);
    }
    for (e, (n, first, last)) in &kinds {
        eprintln!("[enqueue]   {n} x (from {first} ms to {last} ms): {e}");
    }

    // Every acknowledged enqueue runs.
    let want: HashSet<String> = acked.iter().map(|i| format!("k{i}")).collect();
    let end = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        let ran: HashSet<String> = read_ledger(&ledger)
            .into_iter()
            .map(|(k, _, _)| k)
            .collect();
        let missing = want.difference(&ran).count();
        if missing == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{missing} of {} acknowledged enqueues never ran",
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Then the queue drains; the worker stops (finishing what it holds) so the ledger is final.
    let broker = client.broker().clone();
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(s)) = broker.queue_stats(&queue).await {
            if s.ready == 0 {
                break;
            }
        }
        assert!(tokio::time::Instant::now() < end, "service queue drains");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(worker.terminate().await, "worker exits cleanly");
    client.close().await;
    let runs = runs_by_key(&ledger);
    let (dups, unmarked) = duplicates(&runs);
    let extra = runs.keys().filter(|k| !want.contains(*k)).count();
    eprintln!(
        "[enqueue] {} tasks ran, {dups} re-runs ({} unmarked), {extra} ran though their enqueue failed; test took {:?}",
        runs.len(),
        unmarked.len(),
        started.elapsed()
    );
    assert!(
        errors.is_empty(),
        "{} enqueues failed with two of three nodes up: {kinds:?}",
        errors.len()
    );
    assert!(
        unmarked.is_empty(),
        "{} tasks ran again without a redelivery mark, e.g. {:?}",
        unmarked.len(),
        &unmarked[..unmarked.len().min(10)]
    );
}

/// Distinct parts of job `cid` in the ledger (lines `<cid>/<i> …`).
fn parts_done(ledger: &Path, cid: &str) -> usize {
    let prefix = format!("{cid}/");
    read_ledger(ledger)
        .into_iter()
        .filter(|(k, _, _)| k.starts_with(&prefix))
        .map(|(k, _, _)| k)
        .collect::<HashSet<_>>()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_job_through_a_node_kill() {
    const N: u64 = 200;
    let cluster = Cluster::shared().await;
    let _turn = cluster.lock().await;
    let started = Instant::now();
    let urls = cluster.url_list();
    let svc = unique("clsplit");
    let _cleanup = Cleanup::on(&urls, &[&svc]);
    let ledger = ledger_path("clsplit");
    let hooks = ledger.with_extension("hooks");
    let env = [
        ("FIXTURE_HOOKS", hooks.display().to_string()),
        ("FIXTURE_COMPLETION_WINDOW_MS", "30000".to_owned()),
    ];
    let worker = FixtureWorker::start_with(&urls, &svc, QueueType::Quorum, &ledger, 8, &env).await;
    let client = client_for(&urls).await;
    let cid = unique("job");
    let task = Task::new(
        format!("{svc}.sum"),
        &serde_json::json!({"n": N, "ms": 100}),
    )
    .with_cid(&cid)
    .on_complete(Target::new(&svc, "done").unwrap())
    .on_error(Target::new(&svc, "failed").unwrap());
    let receipt = client.enqueue(task).await.expect("split job enqueued");
    let part_queue = format!("part.{svc}-sum-{}", receipt.id);

    // Mid-job: a quarter of the parts ran.
    wait_for("a quarter of the parts", Duration::from_secs(120), || {
        parts_done(&ledger, &cid) >= N as usize / 4
    })
    .await;
    let home = cluster
        .leader_of(&part_queue)
        .await
        .expect("part queue's node");
    let done_before = parts_done(&ledger, &cid);
    cluster
        .kill(home)
        .await
        .expect("kill the part queue's node");
    eprintln!("[split] killed node {home} (the part queue's) after {done_before} parts");
    // What the client's broker connection sees of the part queue while its node is down.
    match client.broker().queue_stats(&part_queue).await {
        Ok(s) => eprintln!("[split] passive declare with its node down: Ok({s:?})"),
        Err(e) => eprintln!("[split] passive declare with its node down: Err({e:#})"),
    }
    let t = Instant::now();
    cluster.restart(home).await.expect("node restarts");
    eprintln!(
        "[split] node {home} back in {:?}; {} parts done",
        t.elapsed(),
        parts_done(&ledger, &cid)
    );

    // The hook fires, the part queue goes, the service queue is idle.
    let broker = client.broker().clone();
    let end = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let fired = !hook_lines(&hooks, &cid).is_empty();
        let gone = matches!(broker.queue_stats(&part_queue).await, Ok(None));
        let idle = matches!(
            broker.queue_stats(&format!("warren.svc.{svc}")).await,
            Ok(Some(s)) if s.ready == 0
        );
        if fired && gone && idle {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "job {cid} did not finish (hook {fired}, part queue gone {gone}, idle {idle}; {} parts ran)",
            parts_done(&ledger, &cid)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(worker.terminate().await, "worker exits cleanly");
    common::cleanup_job(&urls, &part_queue).await;
    client.close().await;
    let fired = hook_lines(&hooks, &cid);
    eprintln!(
        "[split] hooks: {:?}; test took {:?}",
        fired.iter().map(|(m, _)| m).collect::<Vec<_>>(),
        started.elapsed()
    );
    assert_eq!(fired.len(), 1, "exactly one hook: {fired:?}");
    assert_eq!(fired[0].0, "done", "the job completed: {fired:?}");
    let squares = Value::Array((0..N).map(|i| Value::from(i * i)).collect());
    assert_eq!(fired[0].1, squares, "every result, in part order");
    assert_eq!(parts_done(&ledger, &cid), N as usize, "every part ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invokes_through_a_node_kill() {
    const N: usize = 64;
    const DEADLINE: Duration = Duration::from_secs(10);
    let cluster = Cluster::shared().await;
    let _turn = cluster.lock().await;
    let started = Instant::now();
    let urls = cluster.url_list();
    let svc = unique("clinv");
    let _cleanup = Cleanup::on(&urls, &[&svc]);
    let ledger = ledger_path("clinv");
    let starts = ledger.with_extension("starts");
    let env = [("FIXTURE_STARTS", starts.display().to_string())];
    let worker = FixtureWorker::start_with(&urls, &svc, QueueType::Quorum, &ledger, N, &env).await;
    let client = client_for(&urls).await;
    let queue = format!("warren.svc.{svc}");
    let leader = cluster
        .leader_of(&queue)
        .await
        .expect("service queue leader");

    let invoke = |i: usize| {
        let (client, svc) = (client.clone(), svc.clone());
        tokio::spawn(async move {
            let key = format!("k{i}");
            let task = Task::new(
                format!("{svc}.work"),
                &serde_json::json!({"key": key, "ms": 3000}),
            )
            .with_timeout(DEADLINE);
            let t = Instant::now();
            let res = client.invoke::<String>(task).await;
            (key, t.elapsed(), res)
        })
    };
    // Half of them running on the worker (3 s each), the other half being sent, when the
    // service queue's leader dies.
    let mut calls: Vec<_> = (0..N / 2).map(invoke).collect();
    wait_for("the first invokes running", Duration::from_secs(30), || {
        read_ledger(&starts).len() >= N / 2
    })
    .await;
    calls.extend((N / 2..N).map(invoke));
    let t_kill = Instant::now();
    cluster.kill(leader).await.expect("kill the leader");
    eprintln!("[invoke] killed node {leader} (the service queue's leader)");
    // When the queue lists a new leader.
    let watch = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let end = tokio::time::Instant::now() + Duration::from_secs(20);
            while tokio::time::Instant::now() < end {
                if let Ok(row) = cluster.queue_fields(&queue, &["leader", "online"]).await {
                    if cluster.index_of(&row[1]) != Some(leader) {
                        return format!("{row:?} {:?} after the kill", t_kill.elapsed());
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            "no new leader listed within 20 s".to_owned()
        })
    };

    let mut ok = 0;
    let mut timeouts = 0;
    let mut unconfirmed = 0;
    let mut bad = Vec::new();
    let mut slowest = Duration::ZERO;
    for c in calls {
        // Not a bound on the invoke: a hung call must show as late, not hang the test.
        let (key, took, res) = match tokio::time::timeout(DEADLINE * 4, c).await {
            Ok(r) => r.expect("invoke task"),
            Err(_) => {
                bad.push(format!("an invoke still pending after {:?}", DEADLINE * 4));
                continue;
            }
        };
        slowest = slowest.max(took);
        match res {
            Ok(v) if v == key && took <= DEADLINE + Duration::from_secs(1) => ok += 1,
            Err(warren::ClientError::Timeout { .. })
                if took <= DEADLINE + Duration::from_secs(1) =>
            {
                timeouts += 1;
            }
            // The deadline passed before the broker confirmed the request: a timeout too.
            Err(warren::ClientError::Broker(warren::BrokerError::Unconfirmed { .. }))
                if took <= DEADLINE + Duration::from_secs(1) =>
            {
                unconfirmed += 1;
            }
            other => bad.push(format!("{key} after {took:?}: {other:?}")),
        }
    }
    eprintln!(
        "[invoke] {ok} results, {timeouts} timeouts, {unconfirmed} unconfirmed at the deadline, {} bad; slowest {slowest:?}; all back {:?} after the kill",
        bad.len(),
        t_kill.elapsed()
    );
    eprintln!("[invoke] new leader: {}", watch.await.unwrap());
    let t = Instant::now();
    cluster.restart(leader).await.expect("node restarts");
    eprintln!("[invoke] node {leader} back in {:?}", t.elapsed());
    assert!(worker.terminate().await, "worker exits cleanly");
    client.close().await;
    eprintln!("[invoke] test took {:?}", started.elapsed());
    assert!(
        bad.is_empty(),
        "{} invokes missed their deadline or failed otherwise: {bad:#?}",
        bad.len()
    );
}

// ---- the broker's own behaviour with a node down (raw lapin) ----

async fn connect(url: &str) -> Connection {
    tokio::time::timeout(
        Duration::from_secs(15),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .expect("connect in time")
    .expect("connect")
}

async fn declare(conn: &Connection, queue: &str, quorum: bool) {
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    if quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    let _ = ch.close(200, "ok".into()).await;
}

/// A mandatory persistent publish with confirms on a fresh channel, described.
async fn publish_outcome(conn: &Connection, queue: &str) -> String {
    let ch = match conn.create_channel().await {
        Ok(ch) => ch,
        Err(e) => return format!("channel error: {e}"),
    };
    if let Err(e) = ch.confirm_select(ConfirmSelectOptions::default()).await {
        return format!("confirm_select error: {e}");
    }
    let res = publish_on(&ch, queue).await;
    let _ = ch.close(200, "ok".into()).await;
    res
}

async fn publish_on(ch: &lapin::Channel, queue: &str) -> String {
    match start_publish(ch, queue).await {
        Ok(confirm) => describe_confirm(confirm).await,
        Err(e) => e,
    }
}

async fn start_publish(
    ch: &lapin::Channel,
    queue: &str,
) -> Result<lapin::PublisherConfirm, String> {
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"probe",
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .map_err(|e| format!("publish error: {e}"))
}

async fn describe_confirm(confirm: lapin::PublisherConfirm) -> String {
    match tokio::time::timeout(Duration::from_secs(10), confirm).await {
        Err(_) => "no confirm within 10 s".into(),
        Ok(Err(e)) => format!("confirm error: {e}"),
        Ok(Ok(c)) if c.is_ack() => match c.take_message() {
            None => "ack".into(),
            Some(m) => format!("ack with return {} {}", m.reply_code, m.reply_text.as_str()),
        },
        Ok(Ok(c)) => format!("nack ({c:?})"),
    }
}

/// A passive declare on a fresh channel, described.
async fn passive_outcome(conn: &Connection, queue: &str) -> String {
    let ch = match conn.create_channel().await {
        Ok(ch) => ch,
        Err(e) => return format!("channel error: {e}"),
    };
    let res = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    let _ = ch.close(200, "ok".into()).await;
    match res {
        Ok(q) => format!("ok, {} messages", q.message_count()),
        Err(e) => format!("error: {e}"),
    }
}

type PublishLog = Vec<(Option<i128>, String)>;

/// Publishes to `queue` in windows of 32 in flight (like a busy publisher) until `stop`,
/// logging each outcome with the ms since `t_kill` (None before it); counts acks in `acked`.
async fn publish_loop(
    conn: Connection,
    queue: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
    t_kill: Arc<Mutex<Option<Instant>>>,
    acked: Arc<AtomicUsize>,
) -> PublishLog {
    let mut log = PublishLog::new();
    let mut ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    while !stop.load(Ordering::SeqCst) {
        let mut window = Vec::new();
        for _ in 0..32 {
            window.push(start_publish(&ch, &queue).await);
        }
        let mut failed = false;
        for p in window {
            let out = match p {
                Ok(confirm) => describe_confirm(confirm).await,
                Err(e) => e,
            };
            let since = t_kill
                .lock()
                .unwrap()
                .map(|t| t.elapsed().as_millis() as i128);
            failed |= out.contains("error");
            if out == "ack" {
                acked.fetch_add(1, Ordering::SeqCst);
            }
            log.push((since, out));
        }
        if failed {
            // A channel error closes the channel: open another one.
            if let Ok(c) = conn.create_channel().await {
                if c.confirm_select(ConfirmSelectOptions::default())
                    .await
                    .is_ok()
                {
                    ch = c;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let _ = conn.close(200, "bye".into()).await;
    log
}

/// (publishes before the kill, outcome -> (count, first ms, last ms after the kill)).
fn summarize(log: &PublishLog) -> (usize, BTreeMap<String, (usize, i128, i128)>) {
    let mut summary: BTreeMap<String, (usize, i128, i128)> = BTreeMap::new();
    let mut before = 0;
    for (t, out) in log {
        let Some(t) = *t else {
            before += 1;
            continue;
        };
        let e = summary.entry(out.clone()).or_insert((0, i128::MAX, 0));
        e.0 += 1;
        e.1 = e.1.min(t);
        e.2 = e.2.max(t);
    }
    (before, summary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_with_their_node_down() {
    let cluster = Cluster::shared().await;
    let _turn = cluster.lock().await;
    let started = Instant::now();
    // The queues live on node 2 (declared through it: client-local placement); node 0
    // observes.
    let (home, observer) = (2, 0);
    let classic = unique("probe-classic");
    let quorum = unique("probe-quorum");
    let at_home = connect(cluster.url(home)).await;
    declare(&at_home, &classic, false).await;
    declare(&at_home, &quorum, true).await;
    for _ in 0..5 {
        assert_eq!(publish_outcome(&at_home, &classic).await, "ack");
    }
    assert_eq!(cluster.leader_of(&classic).await.unwrap(), home);
    assert_eq!(cluster.leader_of(&quorum).await.unwrap(), home);
    let obs = connect(cluster.url(observer)).await;

    // Publish to the quorum queue without pause from the observer's node across the kill,
    // and, from the kill on, from a new connection to the third node.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t_kill: Arc<Mutex<Option<Instant>>> = Arc::default();
    let published = Arc::new(AtomicUsize::new(0));
    let publisher = tokio::spawn(publish_loop(
        connect(cluster.url(observer)).await,
        quorum.clone(),
        stop.clone(),
        t_kill.clone(),
        published.clone(),
    ));
    wait_for("a few quorum publishes", Duration::from_secs(10), || {
        published.load(Ordering::SeqCst) >= 200
    })
    .await;
    cluster.kill(home).await.unwrap();
    *t_kill.lock().unwrap() = Some(Instant::now());
    let third = 3 - home - observer;
    let late_acked = Arc::new(AtomicUsize::new(0));
    let late_publisher = tokio::spawn(publish_loop(
        connect(cluster.url(third)).await,
        quorum.clone(),
        stop.clone(),
        t_kill.clone(),
        late_acked.clone(),
    ));

    // A third publisher whose connection and channel open once the new leader is listed.
    let elected_acked = Arc::new(AtomicUsize::new(0));
    let elected_publisher = {
        let (q, stop, t_kill, acked) = (
            quorum.clone(),
            stop.clone(),
            t_kill.clone(),
            elected_acked.clone(),
        );
        let url = cluster.url(third).to_owned();
        tokio::spawn(async move {
            let end = tokio::time::Instant::now() + Duration::from_secs(20);
            while tokio::time::Instant::now() < end {
                if matches!(cluster.leader_of(&q).await, Ok(l) if l != home) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            publish_loop(connect(&url).await, q, stop, t_kill, acked).await
        })
    };
    let passive = passive_outcome(&obs, &classic).await;
    let publish = publish_outcome(&obs, &classic).await;
    let redeclare = {
        let ch = obs.create_channel().await.unwrap();
        let r = ch
            .queue_declare(
                classic.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        match r {
            Ok(q) => format!("ok, {} messages", q.message_count()),
            Err(e) => format!("error: {e}"),
        }
    };
    eprintln!("[probe] classic queue, home node down: passive declare -> {passive}");
    eprintln!("[probe] classic queue, home node down: mandatory publish -> {publish}");
    eprintln!("[probe] classic queue, home node down: durable re-declare -> {redeclare}");

    // The quorum publisher sees acks again (a new leader) within 30 s of the kill.
    let t_kill_at = t_kill.lock().unwrap().unwrap();
    let leader_end = tokio::time::Instant::now() + Duration::from_secs(30);
    let new_leader = loop {
        if let Ok(l) = cluster.leader_of(&quorum).await {
            if l != home {
                break Some(l);
            }
        }
        if tokio::time::Instant::now() > leader_end {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "[probe] quorum queue: new leader {new_leader:?} listed {:?} after the kill",
        t_kill_at.elapsed()
    );
    // Until the late publisher gets acks too (or 20 s), then restart the node and keep
    // publishing until it does (or 20 s more).
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while late_acked.load(Ordering::SeqCst) == 0 && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let restart_at = t_kill_at.elapsed();
    let t = Instant::now();
    cluster.restart(home).await.unwrap();
    eprintln!(
        "[probe] node {home} restarted {restart_at:?} after the kill, back in {:?}",
        t.elapsed()
    );
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    let at_back = late_acked.load(Ordering::SeqCst);
    while late_acked.load(Ordering::SeqCst) < at_back + 100 && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let early = summarize(&publisher.await.unwrap());
    let late = summarize(&late_publisher.await.unwrap());
    let elected = summarize(&elected_publisher.await.unwrap());
    for (who, (before, summary)) in [
        (
            format!("from node {observer}, connected before the kill"),
            &early,
        ),
        (
            format!("from node {third}, connected after the kill"),
            &late,
        ),
        (
            format!("from node {third}, connected once a new leader was listed"),
            &elected,
        ),
    ] {
        eprintln!("[probe] quorum queue publishes {who}: {before} before the kill, after it:");
        for (out, (n, first, last)) in summary {
            eprintln!("[probe]   {n} x {out} (from {first} ms to {last} ms after the kill)");
        }
    }

    let back = passive_outcome(&obs, &classic).await;
    eprintln!("[probe] classic queue after its node restarted: passive declare -> {back}");
    let ch = obs.create_channel().await.unwrap();
    for q in [&classic, &quorum] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = obs.close(200, "bye".into()).await;
    eprintln!("[probe] test took {:?}", started.elapsed());
    assert!(
        early.1.contains_key("ack") && late.1.contains_key("ack"),
        "the quorum queue takes publishes again after its leader died"
    );
    assert!(
        back.starts_with("ok, 5") || back.starts_with("ok, 6"),
        "the durable classic queue is back with its messages: {back}"
    );
}

// ---- retries and their delays, fan-ins, topics and chains through a node kill ----

/// Deletes queues and exchanges on the cluster when dropped, even if the test panicked.
struct DropOnCluster {
    urls: String,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Drop for DropOnCluster {
    fn drop(&mut self) {
        let cfg = config_for(&self.urls, QueueType::Classic).with_reconnect(ReconnectPolicy {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            give_up_after: Some(Duration::from_secs(10)),
        });
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
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
                for x in &exchanges {
                    let _ = broker.delete_exchange(x).await;
                }
                broker.close().await;
            });
        })
        .join();
    }
}

/// The node the delay machinery lives on: the home of `warren.delay.due` (node 0 if it does
/// not exist yet), and this test's own real-time delay levels `name`, declared through that
/// node alone so that their classic queues live there too (client-local placement).
async fn delay_levels_on_due_home(cluster: &Cluster, name: &str) -> (usize, DelayLevels) {
    let home = cluster.leader_of(DUE_QUEUE).await.unwrap_or(0);
    let levels = DelayLevels::for_test(name, 1).expect("a valid levels name");
    let broker = Broker::connect(
        config_for(cluster.url(home), QueueType::Quorum).with_delay_levels(levels.clone()),
    )
    .await
    .expect("connect to the delay node");
    TaskSender::new(&broker, Publisher::new(broker.clone(), 1))
        .ensure_delay_levels()
        .await
        .expect("declare the delay levels");
    broker.close().await;
    // A 1 s delay is 10 units (0b1010): levels 3 and 1, then the due queue.
    for q in [levels.level(3), levels.level(1), DUE_QUEUE.to_owned()] {
        assert_eq!(
            cluster.leader_of(&q).await.expect("delay queue listed"),
            home,
            "{q} lives on the delay node"
        );
    }
    (home, levels)
}

/// Messages ready in `levels` (read from the top level down, so one in transit is never
/// missed), or `None` while a level cannot be read.
async fn waiting_in(broker: &Broker, levels: &DelayLevels) -> Option<u32> {
    let mut n = 0;
    for q in levels.names().into_iter().rev() {
        n += broker.queue_stats(&q).await.ok()?.map_or(0, |s| s.ready);
    }
    Some(n)
}

/// Keys whose attempt 2 (the retry, which succeeds) is in the ledger.
fn retried(ledger: &Path) -> HashSet<String> {
    read_ledger(ledger)
        .into_iter()
        .filter(|(_, attempt, _)| *attempt == 2)
        .map(|(k, _, _)| k)
        .collect()
}

/// Ledger counts: (attempt-1 runs, attempt-2 runs, redelivered runs).
fn retry_counts(ledger: &Path) -> (usize, usize, usize) {
    let lines = read_ledger(ledger);
    (
        lines.iter().filter(|l| l.1 == 1).count(),
        lines.iter().filter(|l| l.1 == 2).count(),
        lines.iter().filter(|l| l.2).count(),
    )
}

/// 200 `flaky` tasks (attempt 1 fails, the retry 1 s later succeeds), sent one every 30 ms,
/// while a node is SIGKILLed once 50 of them succeeded: the node holding the test's delay
/// levels and `warren.delay.due` (`kill_delay_node`), or the one holding the service
/// queue's leader and the worker's and client's connections (but no delay queue).
async fn retries_through_a_kill(tag: &str, kill_delay_node: bool) {
    const N: usize = 200;
    const KILL_AT: usize = 50;
    const DELAY: Duration = Duration::from_secs(1);
    let cluster = Cluster::shared().await;
    let _turn = cluster.lock().await;
    let started = Instant::now();
    let svc = unique(tag);
    let (delay_node, levels) = delay_levels_on_due_home(cluster, &svc).await;
    let _levels_cleanup = DropOnCluster {
        urls: cluster.url_list(),
        queues: levels.names(),
        exchanges: levels.names(),
    };
    // The service, the worker and the client start on the next node.
    let other = (delay_node + 1) % support::cluster::SIZE;
    let urls = cluster.url_list_from(other);
    let _cleanup = Cleanup::on(&urls, &[&svc]);
    let ledger = ledger_path(tag);
    let env = [("FIXTURE_DELAY_LEVELS", format!("{svc}:1"))];
    let worker = FixtureWorker::start_with(&urls, &svc, QueueType::Quorum, &ledger, 16, &env).await;
    let client = client_for(&urls).await;
    let queue = format!("warren.svc.{svc}");
    let leader = cluster.leader_of(&queue).await.expect("service queue");
    let victim = if kill_delay_node { delay_node } else { other };
    eprintln!(
        "[{tag}] delay levels and due queue on node {delay_node}; service queue leader on node {leader}; connections to node {other} first; killing node {victim}"
    );

    let sent: Arc<Mutex<Vec<usize>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let sender = {
        let (client, svc, sent, errors) =
            (client.clone(), svc.clone(), sent.clone(), errors.clone());
        tokio::spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_millis(30));
            for i in 0..N {
                pace.tick().await;
                let task = Task::new(
                    format!("{svc}.flaky"),
                    &serde_json::json!({"key": format!("k{i}"), "fail_until": 2}),
                )
                .with_retry(RetryPolicy::fixed(2, DELAY));
                match client.enqueue(task).await {
                    Ok(_) => sent.lock().unwrap().push(i),
                    Err(e) => errors.lock().unwrap().push(format!("k{i}: {e:#}")),
                }
            }
        })
    };

    wait_for("the first retries", Duration::from_secs(60), || {
        retried(&ledger).len() >= KILL_AT
    })
    .await;
    let at_kill = (retried(&ledger).len(), retry_counts(&ledger));
    // Tasks whose retry may be in the delay cascade when the node dies: attempt 1 ran,
    // attempt 2 not yet.
    let in_cascade: HashSet<String> = {
        let done = retried(&ledger);
        read_ledger(&ledger)
            .into_iter()
            .map(|l| l.0)
            .filter(|k| !done.contains(k))
            .collect()
    };
    cluster.kill(victim).await.expect("kill");
    let t_kill = Instant::now();
    eprintln!("[{tag}] killed node {victim}: {} tasks done, (attempt-1, attempt-2, redelivered) runs {:?}, {} sent", at_kill.0, at_kill.1, sent.lock().unwrap().len());
    if kill_delay_node {
        // With the delay node down, watch for 10 s: the measurement, not a wait for work.
        while t_kill.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    } else {
        // Retries keep flowing: every task sent succeeds before the node is back.
        let end = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let all_sent = sender.is_finished();
            let want: HashSet<String> = sent
                .lock()
                .unwrap()
                .iter()
                .map(|i| format!("k{i}"))
                .collect();
            let done = retried(&ledger);
            if all_sent && want.is_subset(&done) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "with node {victim} down, {} of {} sent tasks not retried after {:?} ({} sent; runs {:?})",
                want.difference(&done).count(),
                want.len(),
                t_kill.elapsed(),
                sent.lock().unwrap().len(),
                retry_counts(&ledger)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let while_down = (retried(&ledger).len(), retry_counts(&ledger));
    eprintln!(
        "[{tag}] {:?} with node {victim} down: {} tasks done, runs {:?}, {} sent",
        t_kill.elapsed(),
        while_down.0,
        while_down.1,
        sent.lock().unwrap().len()
    );
    let t = Instant::now();
    cluster.restart(victim).await.expect("node restarts");
    eprintln!(
        "[{tag}] node {victim} back in {:?}; {} tasks done",
        t.elapsed(),
        retried(&ledger).len()
    );

    // Every task sent succeeds; nothing waits in the levels or the service queue.
    tokio::time::timeout(Duration::from_secs(120), sender)
        .await
        .expect("the sender finishes")
        .expect("sender task");
    let want: HashSet<String> = sent
        .lock()
        .unwrap()
        .iter()
        .map(|i| format!("k{i}"))
        .collect();
    let broker = client.broker().clone();
    let end = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let done = retried(&ledger);
        let mut missing: Vec<&String> = want.difference(&done).collect();
        missing.sort();
        let waiting = waiting_in(&broker, &levels).await;
        let ready = broker
            .queue_stats(&queue)
            .await
            .ok()
            .flatten()
            .map(|s| s.ready);
        let due = broker
            .queue_stats(DUE_QUEUE)
            .await
            .ok()
            .flatten()
            .map(|s| s.ready);
        // With the delay node killed, retries that were moving between delay queues at
        // that moment can be lost (see below): wait for the others, and for nothing to be
        // left waiting anywhere.
        let settled = missing.is_empty()
            || (kill_delay_node && missing.iter().all(|k| in_cascade.contains(*k)));
        if settled && waiting == Some(0) && ready == Some(0) && due == Some(0) {
            break;
        }
        if tokio::time::Instant::now() >= end {
            let runs = runs_by_key(&ledger);
            let lost: Vec<String> = missing
                .iter()
                .map(|k| format!("{k}: {:?}", runs.get(*k)))
                .collect();
            panic!(
                "{} of {} tasks not retried {:?} after the restart (waiting in the levels {waiting:?}, ready {ready:?}): {lost:?}",
                missing.len(),
                want.len(),
                t.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all_done = t_kill.elapsed();
    assert!(worker.terminate().await, "worker exits cleanly");
    let mut lost: Vec<String> = want.difference(&retried(&ledger)).cloned().collect();
    lost.sort();
    let dead = broker
        .queue_stats(&format!("warren.dead.{svc}"))
        .await
        .ok()
        .flatten()
        .map_or(0, |s| s.ready);
    client.close().await;

    // Each attempt-1 run schedules one retry: attempt 1 runs again only as a marked
    // redelivery, and attempt 2 runs once per attempt-1 run, any further run marked.
    let runs = runs_by_key(&ledger);
    let mut unmarked = Vec::new();
    let (mut reruns1, mut extra2) = (0, 0);
    for (k, r) in &runs {
        let first: Vec<bool> = r.iter().filter(|x| x.0 == 1).map(|x| x.1).collect();
        let second: Vec<bool> = r.iter().filter(|x| x.0 == 2).map(|x| x.1).collect();
        reruns1 += first.len().saturating_sub(1);
        extra2 += second.len().saturating_sub(1);
        if first.len() != 1 || second.len() != 1 {
            eprintln!("[{tag}]   {k}: {r:?}");
        }
        let unmarked2 = second.iter().filter(|red| !**red).count();
        // The first run may be marked too (delivered, not started, before a kill).
        if first.is_empty()
            || first[1..].iter().any(|red| !red)
            || unmarked2 > first.len()
            || r.iter().any(|x| x.0 > 2)
        {
            unmarked.push(format!("{k}: {r:?}"));
        }
    }
    unmarked.sort();
    let errors = std::mem::take(&mut *errors.lock().unwrap());
    eprintln!(
        "[{tag}] {} sent ({} failed), {} done; {reruns1} attempt-1 re-runs, {extra2} extra attempt-2 runs, {} unexplained; {dead} dead letters; all done {all_done:?} after the kill; test took {:?}",
        want.len(),
        errors.len(),
        runs.len(),
        unmarked.len(),
        started.elapsed()
    );
    eprintln!(
        "[{tag}] {} retries in the delay cascade when node {victim} was killed; lost: {} {lost:?}",
        in_cascade.len(),
        lost.len()
    );
    assert!(errors.is_empty(), "enqueues failed: {errors:?}");
    if kill_delay_node {
        // Dead-lettering between classic queues is at most once: a retry that moved to
        // the next delay queue shortly before its node crashed may be lost (not yet on
        // disk). Nothing else is: every task sent during or after the outage succeeds.
        assert!(
            lost.iter().all(|k| in_cascade.contains(k)),
            "tasks lost that were not in the delay cascade at the kill: {lost:?}"
        );
    } else {
        assert!(lost.is_empty(), "tasks never retried: {lost:?}");
    }
    assert_eq!(dead, 0, "no task failed for good");
    assert!(
        unmarked.is_empty(),
        "{} tasks ran an attempt again without a mark: {unmarked:?}",
        unmarked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_through_a_kill_of_another_node() {
    retries_through_a_kill("clretry", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_through_a_kill_of_the_delay_node() {
    retries_through_a_kill("clretryd", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_in_through_a_node_kill() {
    const N: usize = 100;
    let cluster = Cluster::shared().await;
    let _turn = cluster.lock().await;
    let started = Instant::now();
    let urls = cluster.url_list();
    let svc = unique("clfanin");
    let _cleanup = Cleanup::on(&urls, &[&svc]);
    let ledger = ledger_path("clfanin");
    let hooks = ledger.with_extension("hooks");
    let env = [
        ("FIXTURE_HOOKS", hooks.display().to_string()),
        ("FIXTURE_COMPLETION_WINDOW_MS", "30000".to_owned()),
    ];
    let worker = FixtureWorker::start_with(&urls, &svc, QueueType::Quorum, &ledger, 4, &env).await;
    let client = client_for(&urls).await;
    let cid = unique("cid");
    let work = format!("{svc}.work");
    let mut p = Parallel::new();
    for i in 0..N {
        p = p.target(
            &work,
            &serde_json::json!({"key": format!("k{i}"), "ms": 200}),
        );
    }
    let receipt = client
        .parallel(p.on_final(format!("{svc}.done")).with_cid(&cid))
        .await
        .expect("fan-in sent");
    let part_queue = fanout_queue(&receipt.job);
    let home = cluster.leader_of(&part_queue).await.expect("part queue");
    wait_for("a quarter of the targets", Duration::from_secs(60), || {
        read_ledger(&ledger).len() >= N / 4
    })
    .await;
    let before = read_ledger(&ledger).len();
    cluster.kill(home).await.expect("kill");
    eprintln!("[fanin] killed node {home} (the fan-in's part queue's) after {before} targets");
    let t = Instant::now();
    cluster.restart(home).await.expect("node restarts");
    eprintln!(
        "[fanin] node {home} back in {:?}; {} targets ran",
        t.elapsed(),
        read_ledger(&ledger).len()
    );

    let broker = client.broker().clone();
    let end = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let fired = !hook_lines(&hooks, &cid).is_empty();
        let gone = matches!(broker.queue_stats(&part_queue).await, Ok(None));
        let idle = matches!(
            broker.queue_stats(&format!("warren.svc.{svc}")).await,
            Ok(Some(s)) if s.ready == 0
        );
        if fired && gone && idle {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "fan-in {cid} did not finish (callback {fired}, part queue gone {gone}, idle {idle}; {} targets ran)",
            read_ledger(&ledger).len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(worker.terminate().await, "worker exits cleanly");
    common::cleanup_job(&urls, &part_queue).await;
    client.close().await;
    let runs = runs_by_key(&ledger);
    let (dups, unmarked) = duplicates(&runs);
    let lines = hook_lines(&hooks, &cid);
    eprintln!(
        "[fanin] {} targets ran, {dups} re-runs ({} unmarked); {} callbacks; test took {:?}",
        runs.len(),
        unmarked.len(),
        lines.len(),
        started.elapsed()
    );
    assert_eq!(runs.len(), N, "every target ran");
    assert!(unmarked.is_empty(), "unmarked re-runs: {unmarked:?}");
    assert_eq!(lines.len(), 1, "exactly one final callback: {lines:?}");
    let out: FanInOutcome = serde_json::from_value(lines[0].1.clone()).expect("a FanInOutcome");
    assert!(out.ok, "every target succeeded");
    assert_eq!(out.outcomes.len(), N, "one outcome per target");
    for (i, o) in out.outcomes.iter().enumerate() {
        assert_eq!(o.index as usize, i, "outcomes in target order");
        assert_eq!(o.response, Some(Value::from(format!("k{i}"))), "target {i}");
    }
}

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
