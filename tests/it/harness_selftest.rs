//! Proves the fault-test harness works: the TCP proxy forwards, cuts and black-holes
//! connections; a private broker node starts, keeps durable data across a restart and a
//! crash, and leaves nothing behind when dropped.
//!
//! The proxy tests use the shared broker at 127.0.0.1:5672 (`scripts/ensure-rabbitmq.sh`).

use crate::support;

use anyhow::{bail, ensure, Context, Result};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use support::broker_node::BrokerNode;
use support::proxy::TcpProxy;

const SHARED_BROKER: &str = "127.0.0.1:5672";

fn shared_broker() -> Result<SocketAddr> {
    SHARED_BROKER.parse().context("parsing the broker address")
}

fn unique_queue(label: &str) -> String {
    format!("warren-selftest-{label}-{}", uuid::Uuid::new_v4())
}

async fn connect(url: &str) -> Result<Connection> {
    tokio::time::timeout(
        Duration::from_secs(15),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .context("connecting timed out")?
    .context("connecting")
}

/// Whether `queue` exists on the shared broker (a passive declare on a direct connection).
async fn queue_exists(queue: &str) -> Result<bool> {
    let conn = connect(&format!("amqp://guest:guest@{SHARED_BROKER}/%2f")).await?;
    let channel = conn.create_channel().await?;
    let exists = match channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(_) => true,
        Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if p.get_id() == 404) => {
            false
        }
        Err(e) => return Err(e).context("passive declare"),
    };
    conn.close(200, "bye".into()).await?;
    Ok(exists)
}

/// Poll `check` every 50 ms until it is true or `deadline` passes.
async fn wait_until(what: &str, deadline: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let started = Instant::now();
    while !check() {
        if started.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn declare(channel: &Channel, queue: &str, durable: bool) -> Result<()> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Publish a persistent message to `queue` through the default exchange and require a
/// positive publisher confirm without a returned message.
async fn publish_confirmed(channel: &Channel, queue: &str, body: &[u8]) -> Result<()> {
    let confirmation = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await?
        .await?;
    ensure!(
        confirmation.is_ack(),
        "publish was not acked: {confirmation:?}"
    );
    ensure!(
        confirmation.take_message().is_none(),
        "publish was returned (unroutable)"
    );
    Ok(())
}

/// `basic.get` one message, check its body and ack it.
async fn get_and_ack(channel: &Channel, queue: &str, body: &[u8]) -> Result<()> {
    let msg = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await?
        .with_context(|| format!("queue {queue} is empty"))?;
    ensure!(
        msg.delivery.data == body,
        "unexpected body {:?}",
        msg.delivery.data
    );
    ensure!(
        msg.delivery.ack(BasicAckOptions::default()).await?,
        "ack was not applied"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_forwards_and_cut_breaks_the_connection() -> Result<()> {
    let proxy = TcpProxy::start(shared_broker()?).await?;
    let queue = unique_queue("proxy");

    let conn = connect(&proxy.amqp_url()).await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    declare(&channel, &queue, false).await?;
    publish_confirmed(&channel, &queue, b"through the proxy").await?;
    get_and_ack(&channel, &queue, b"through the proxy").await?;
    assert_eq!(proxy.connection_count(), 1);
    assert_eq!(proxy.active_connections(), 1);

    proxy.cut();
    wait_until(
        "the cut connection to be noticed",
        Duration::from_secs(10),
        || !conn.status().connected(),
    )
    .await?;
    let after_cut = tokio::time::timeout(Duration::from_secs(5), conn.create_channel()).await;
    assert!(
        matches!(after_cut, Ok(Err(_))),
        "a cut connection must refuse new channels"
    );
    assert_eq!(proxy.active_connections(), 0);

    // The proxy keeps accepting new connections after a cut.
    let conn2 = connect(&proxy.amqp_url()).await?;
    let channel2 = conn2.create_channel().await?;
    assert_eq!(proxy.connection_count(), 2);
    channel2
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    conn2.close(200, "bye".into()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_blackhole_pauses_traffic_and_heartbeats_notice() -> Result<()> {
    let proxy = TcpProxy::start(shared_broker()?).await?;

    // A short black hole: a pending request waits, then completes once lifted.
    let conn = connect(&format!("{}?heartbeat=10", proxy.amqp_url())).await?;
    let channel = conn.create_channel().await?;
    let queue = unique_queue("blackhole");
    proxy.blackhole(true);
    let pending = {
        let channel = channel.clone();
        let queue = queue.clone();
        tokio::spawn(async move { declare(&channel, &queue, false).await })
    };
    // The request reaches the proxy and is held there (a positive event, no time window):
    // it has not reached the broker, so it cannot have been answered.
    wait_until(
        "the declare to be held by the black hole",
        Duration::from_secs(10),
        || proxy.held_from_clients() == 1,
    )
    .await?;
    assert!(!pending.is_finished(), "traffic went through a black hole");
    assert!(
        !queue_exists(&queue).await?,
        "the declare reached the broker through a black hole"
    );
    assert!(conn.status().connected());
    proxy.blackhole(false);
    tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .context("request still stuck after the black hole was lifted")???;
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    conn.close(200, "bye".into()).await?;

    // New connections are held too: accepted, their first bytes held, no upstream
    // connection made; they go through once it is lifted.
    proxy.blackhole(true);
    let (accepted, upstream) = (proxy.connection_count(), proxy.upstream_connections());
    let held = {
        let url = proxy.amqp_url();
        tokio::spawn(async move { connect(&url).await })
    };
    wait_until(
        "the new connection to be accepted and held",
        Duration::from_secs(10),
        || proxy.connection_count() == accepted + 1 && proxy.held_from_clients() == 1,
    )
    .await?;
    assert!(
        !held.is_finished(),
        "a connection was made through a black hole"
    );
    assert_eq!(
        proxy.upstream_connections(),
        upstream,
        "the proxy connected upstream while black-holed"
    );
    proxy.blackhole(false);
    let conn = tokio::time::timeout(Duration::from_secs(15), held)
        .await
        .context("the held connection did not go through once the black hole was lifted")???;
    assert_eq!(proxy.upstream_connections(), upstream + 1);
    assert_eq!(proxy.held_from_clients(), 0);
    conn.close(200, "bye".into()).await?;

    // A long black hole: lapin's heartbeat check gives up on the silent connection.
    let conn = connect(&format!("{}?heartbeat=1", proxy.amqp_url())).await?;
    let _channel = conn.create_channel().await?;
    proxy.blackhole(true);
    let started = Instant::now();
    wait_until("a missed-heartbeat error", Duration::from_secs(15), || {
        !conn.status().connected()
    })
    .await?;
    eprintln!(
        "black-holed connection (heartbeat=1) noticed after {:?}",
        started.elapsed()
    );
    proxy.blackhole(false);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_node_keeps_durable_data_and_cleans_up() -> Result<()> {
    // A self-test that cannot run fails: it never passes without having checked anything.
    assert!(
        BrokerNode::is_available(),
        "this test cannot run: rabbitmq-server is not installed, and BrokerNode needs a local \
         RabbitMQ installation (apt-get install rabbitmq-server, or set WARREN_RABBITMQ_BIN_DIR \
         to a folder holding rabbitmq-server and rabbitmqctl)"
    );
    let started = Instant::now();
    let mut node = BrokerNode::start().await?;
    eprintln!(
        "private node {} started in {:?} (port {})",
        node.node_name(),
        started.elapsed(),
        node.port()
    );
    let queue = unique_queue("durable");

    // Graceful restart keeps a durable queue and a confirmed persistent message.
    {
        let conn = connect(&node.amqp_url()).await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        declare(&channel, &queue, true).await?;
        publish_confirmed(&channel, &queue, b"survives a restart").await?;
        conn.close(200, "bye".into()).await?;
    }
    let t = Instant::now();
    node.restart().await?;
    eprintln!("graceful restart took {:?}", t.elapsed());
    let listed = node
        .rabbitmqctl(&["list_queues", "name", "durable"])
        .await?;
    assert!(
        listed.contains(&queue),
        "queue missing after restart: {listed}"
    );
    {
        let conn = connect(&node.amqp_url()).await?;
        let channel = conn.create_channel().await?;
        get_and_ack(&channel, &queue, b"survives a restart").await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        publish_confirmed(&channel, &queue, b"survives a crash").await?;
        conn.close(200, "bye".into()).await?;
    }

    // A crash (SIGKILL) keeps confirmed persistent messages too.
    let t = Instant::now();
    node.kill().await?;
    ensure!(!node.is_running(), "node still running after kill");
    node.start_again().await?;
    eprintln!("kill + start_again took {:?}", t.elapsed());
    {
        let conn = connect(&node.amqp_url()).await?;
        let channel = conn.create_channel().await?;
        get_and_ack(&channel, &queue, b"survives a crash").await?;
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
        conn.close(200, "bye".into()).await?;
    }

    // Dropping the node stops it and removes its files.
    let addr = node.addr();
    let pid = node.os_pid().context("no pid for a running node")?;
    let dir = node.data_dir().to_path_buf();
    let short_name = node
        .node_name()
        .split('@')
        .next()
        .unwrap_or_default()
        .to_string();
    let t = Instant::now();
    drop(node);
    eprintln!("drop took {:?}", t.elapsed());
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(),
        "the dropped node's port still accepts connections"
    );
    let alive = std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()?
        .success();
    assert!(!alive, "the dropped node's VM (pid {pid}) is still alive");
    assert!(!dir.exists(), "{} was not removed", dir.display());
    if let Ok(out) = std::process::Command::new("epmd").arg("-names").output() {
        let names = String::from_utf8_lossy(&out.stdout);
        assert!(
            !names.contains(&format!("name {short_name} ")),
            "epmd still lists {short_name}: {names}"
        );
    }
    Ok(())
}
