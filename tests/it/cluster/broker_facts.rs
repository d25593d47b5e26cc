//! The broker's own behaviour with a node down (raw lapin): a classic queue whose home node
//! is down, a quorum queue whose leader died.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::task::JoinHandle;

use super::{wait_for, Turn};
use crate::common::unique;

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

/// What the probe's publishers share: the queue they publish to, the flag that stops them,
/// and the instant of the kill (None before it).
#[derive(Clone)]
struct Publishing {
    queue: String,
    stop: Arc<AtomicBool>,
    t_kill: Arc<Mutex<Option<Instant>>>,
}

impl Publishing {
    /// Spawns a [`publish_loop`] on `conn`, counting acks in `acked`.
    fn spawn(&self, conn: Connection, acked: &Arc<AtomicUsize>) -> JoinHandle<PublishLog> {
        tokio::spawn(publish_loop(conn, self.clone(), acked.clone()))
    }
}

/// Publishes to `queue` in windows of 32 in flight (like a busy publisher) until `stop`,
/// logging each outcome with the ms since `t_kill` (None before it); counts acks in `acked`.
async fn publish_loop(
    conn: Connection,
    Publishing {
        queue,
        stop,
        t_kill,
    }: Publishing,
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
    let turn = Turn::take().await;
    let cluster = turn.cluster;
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
    let publishing = Publishing {
        queue: quorum.clone(),
        stop: Arc::new(AtomicBool::new(false)),
        t_kill: Arc::default(),
    };
    let (stop, t_kill) = (&publishing.stop, &publishing.t_kill);
    let published = Arc::new(AtomicUsize::new(0));
    let publisher = publishing.spawn(connect(cluster.url(observer)).await, &published);
    wait_for("a few quorum publishes", Duration::from_secs(10), || {
        published.load(Ordering::SeqCst) >= 200
    })
    .await;
    cluster.kill(home).await.unwrap();
    *t_kill.lock().unwrap() = Some(Instant::now());
    let third = 3 - home - observer;
    let late_acked = Arc::new(AtomicUsize::new(0));
    let late_publisher = publishing.spawn(connect(cluster.url(third)).await, &late_acked);

    // A third publisher whose connection and channel open once the new leader is listed.
    let elected_acked = Arc::new(AtomicUsize::new(0));
    let elected_publisher = {
        let (publishing, acked) = (publishing.clone(), elected_acked.clone());
        let url = cluster.url(third).to_owned();
        tokio::spawn(async move {
            let end = tokio::time::Instant::now() + Duration::from_secs(20);
            while tokio::time::Instant::now() < end {
                if matches!(cluster.leader_of(&publishing.queue).await, Ok(l) if l != home) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            publish_loop(connect(&url).await, publishing, acked).await
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
    eprintln!("[probe] test took {:?}", turn.started.elapsed());
    assert!(
        early.1.contains_key("ack") && late.1.contains_key("ack"),
        "the quorum queue takes publishes again after its leader died"
    );
    assert!(
        back.starts_with("ok, 5") || back.starts_with("ok, 6"),
        "the durable classic queue is back with its messages: {back}"
    );
}
