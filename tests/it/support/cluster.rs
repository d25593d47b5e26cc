//! A private three-node RabbitMQ cluster for cluster fault tests, started once per test
//! binary and shared by its tests.
//!
//! The nodes are [`BrokerNode`]s started side by side (in parallel) with one shared Erlang
//! cookie, then clustered the way `docs`/BROKER-FACTS describe: `rabbitmqctl stop_app`,
//! `join_cluster <node 0>`, `start_app` on nodes 1 and 2. Each node keeps its own private
//! `HOME`, ports and data folder; `ERL_EPMD_ADDRESS=127.0.0.1` keeps epmd local.
//!
//! Sharing: [`Cluster::shared`] starts the cluster on first use (in whichever test gets there
//! first) and hands out a `&'static Cluster`. Tests that kill nodes must hold
//! [`Cluster::lock`] for their whole run: it serializes them, and it first brings back any node
//! a previous (possibly panicked) test left down and waits until all three run as one cluster.
//!
//! Clean-up: a static is never dropped, so nothing here relies on `Drop`. Every node process
//! is covered by [`BrokerNode`]'s watchdog, a shell process that stops the node's process group
//! and deletes its folder about a second after the test process is gone, however it ended
//! (normal exit, panic, SIGKILL). Each (re)start of a node gets its own watchdog.
//!
//! Timings on a 2-core machine: the cluster forms in about 30 s; a killed node restarts and
//! rejoins in about 10-20 s.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::sync::{Mutex, MutexGuard, OnceCell};

use super::broker_node::BrokerNode;

/// Nodes in the cluster.
pub const SIZE: usize = 3;
/// How long [`Cluster::wait_all_running`] waits.
pub const RUNNING_DEADLINE: Duration = Duration::from_secs(120);

static SHARED: OnceCell<std::result::Result<Cluster, String>> = OnceCell::const_new();

/// A private RabbitMQ cluster of [`SIZE`] nodes. See the module docs.
pub struct Cluster {
    nodes: Vec<Mutex<BrokerNode>>,
    names: Vec<String>,
    urls: Vec<String>,
    /// Whether node `i` was killed by [`Cluster::kill`] and not restarted yet.
    down: Vec<AtomicBool>,
    /// Held by a test for its whole run ([`Cluster::lock`]).
    exclusive: Mutex<()>,
}

impl Cluster {
    /// The cluster shared by this test binary, started on first use. Panics (failing the
    /// test) when it cannot start, e.g. without a RabbitMQ installation; a failed start is
    /// not retried by the next test.
    pub async fn shared() -> &'static Cluster {
        let res = SHARED
            .get_or_init(|| async {
                let started = std::time::Instant::now();
                let res = Cluster::start().await.map_err(|e| format!("{e:#}"));
                if res.is_ok() {
                    eprintln!(
                        "[cluster] {SIZE}-node cluster formed in {:.1?}",
                        started.elapsed()
                    );
                }
                res
            })
            .await;
        match res {
            Ok(c) => c,
            Err(e) => panic!("the private RabbitMQ cluster could not start: {e}"),
        }
    }

    /// Starts a new cluster owned by the caller (its nodes stop when it is dropped).
    pub async fn start() -> Result<Cluster> {
        let cookie = uuid::Uuid::new_v4().simple().to_string().to_uppercase();
        let (a, b, c) = tokio::join!(
            BrokerNode::start_with_cookie(&cookie, ""),
            BrokerNode::start_with_cookie(&cookie, ""),
            BrokerNode::start_with_cookie(&cookie, ""),
        );
        // Whatever failed, the nodes that did start are dropped (stopped) on return.
        let nodes = vec![
            a.context("starting node 0")?,
            b.context("starting node 1")?,
            c.context("starting node 2")?,
        ];
        let cluster = Cluster {
            names: nodes.iter().map(|n| n.node_name().to_owned()).collect(),
            urls: nodes.iter().map(BrokerNode::amqp_url).collect(),
            down: (0..SIZE).map(|_| AtomicBool::new(false)).collect(),
            nodes: nodes.into_iter().map(Mutex::new).collect(),
            exclusive: Mutex::new(()),
        };
        // Nodes 1 and 2 join node 0: stop_app in parallel, join one at a time (Mnesia
        // schema changes), start_app in parallel.
        let seed = cluster.names[0].clone();
        let (r1, r2) = tokio::join!(cluster.ctl(1, &["stop_app"]), cluster.ctl(2, &["stop_app"]));
        r1?;
        r2?;
        for i in 1..SIZE {
            cluster
                .ctl(i, &["join_cluster", &seed])
                .await
                .with_context(|| format!("node {i} joining {seed}"))?;
        }
        let (r1, r2) = tokio::join!(
            cluster.ctl(1, &["start_app"]),
            cluster.ctl(2, &["start_app"])
        );
        r1?;
        r2?;
        cluster.wait_all_running().await?;
        Ok(cluster)
    }

    /// Serializes the tests that use the shared cluster: hold the guard for the whole test.
    /// Before returning it restarts any node a previous test left down and waits until all
    /// nodes run as one cluster.
    pub async fn lock(&self) -> MutexGuard<'_, ()> {
        let guard = self.exclusive.lock().await;
        for i in 0..SIZE {
            let running = self.nodes[i].lock().await.is_running();
            if !running {
                eprintln!("[cluster] node {i} was left down; restarting it");
                self.restart(i)
                    .await
                    .unwrap_or_else(|e| panic!("restarting node {i}: {e:#}"));
            }
        }
        self.wait_all_running()
            .await
            .unwrap_or_else(|e| panic!("cluster not healthy: {e:#}"));
        guard
    }

    /// The AMQP URL of node `i`.
    pub fn url(&self, i: usize) -> &str {
        &self.urls[i]
    }

    /// The three AMQP URLs, node 0 first.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// All URLs as a comma-separated list starting at node `first` (then the following
    /// nodes, wrapping around): the failover order an [`warren::AmqpConfig`] follows.
    pub fn url_list_from(&self, first: usize) -> String {
        (0..SIZE)
            .map(|k| self.urls[(first + k) % SIZE].as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// All URLs as a comma-separated list, node 0 first.
    pub fn url_list(&self) -> String {
        self.url_list_from(0)
    }

    /// The Erlang node name of node `i`.
    pub fn node_name(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// The index of the node called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// True unless node `i` was killed and not restarted.
    pub fn is_up(&self, i: usize) -> bool {
        !self.down[i].load(Ordering::SeqCst)
    }

    /// SIGKILLs node `i` (its whole process group): a crash, no graceful shutdown.
    pub async fn kill(&self, i: usize) -> Result<()> {
        self.down[i].store(true, Ordering::SeqCst);
        self.nodes[i].lock().await.kill().await
    }

    /// Starts node `i` again (same name, ports and data) and waits until it accepts AMQP
    /// connections and the whole cluster reports all nodes running.
    pub async fn restart(&self, i: usize) -> Result<()> {
        {
            let mut node = self.nodes[i].lock().await;
            if node.is_running() {
                node.kill().await?;
            }
            node.start_again()
                .await
                .with_context(|| format!("restarting node {i}"))?;
        }
        self.down[i].store(false, Ordering::SeqCst);
        self.wait_all_running().await
    }

    /// Runs `rabbitmqctl -n <node i> args…` (with node `i`'s cookie) and returns stdout.
    pub async fn ctl(&self, i: usize, args: &[&str]) -> Result<String> {
        self.nodes[i].lock().await.rabbitmqctl(args).await
    }

    /// Runs `rabbitmqctl args…` against the first node that is up and answers.
    pub async fn ctl_any(&self, args: &[&str]) -> Result<String> {
        let mut last = anyhow!("no node is up");
        for i in (0..SIZE).filter(|&i| self.is_up(i)) {
            match self.ctl(i, args).await {
                Ok(out) => return Ok(out),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The names of the nodes the cluster reports as running (asked of any node that is up).
    pub async fn running_nodes(&self) -> Result<Vec<String>> {
        let out = self
            .ctl_any(&["cluster_status", "--formatter", "json"])
            .await?;
        let v: serde_json::Value = serde_json::from_str(out.trim())
            .with_context(|| format!("cluster_status output: {out}"))?;
        let nodes = v
            .get("running_nodes")
            .and_then(serde_json::Value::as_array)
            .ok_or_else(|| anyhow!("no running_nodes in cluster_status: {out}"))?;
        Ok(nodes
            .iter()
            .filter_map(|n| n.as_str().map(str::to_owned))
            .collect())
    }

    /// Waits (up to [`RUNNING_DEADLINE`]) until every node is reported running in the
    /// cluster.
    pub async fn wait_all_running(&self) -> Result<()> {
        let end = tokio::time::Instant::now() + RUNNING_DEADLINE;
        loop {
            let last = match self.running_nodes().await {
                Ok(running) if self.names.iter().all(|n| running.contains(n)) => return Ok(()),
                Ok(running) => format!("running: {running:?}"),
                Err(e) => format!("{e:#}"),
            };
            if tokio::time::Instant::now() > end {
                bail!(
                    "not all of {:?} running within {RUNNING_DEADLINE:?}; last: {last}",
                    self.names
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// The index of the node that holds `queue`: the leader of a quorum queue, the home node
    /// of a classic one (from `rabbitmqctl list_queues name type leader pid`, asked of any node
    /// that is up). Errors if the queue is unknown.
    pub async fn leader_of(&self, queue: &str) -> Result<usize> {
        let row = self.queue_info(queue).await?;
        let node = if row.get(1).map(String::as_str) == Some("quorum") {
            row.get(2).cloned()
        } else {
            // A classic queue's pid renders as `<node@host.N.N.N>` in the table output.
            row.get(3).map(|p| {
                let p = p.trim_start_matches('<').trim_end_matches('>');
                p.rsplitn(4, '.').last().unwrap_or(p).to_owned()
            })
        }
        .ok_or_else(|| anyhow!("no leader/pid for {queue}: {row:?}"))?;
        self.index_of(&node).ok_or_else(|| {
            anyhow!(
                "{queue} is on {node:?}, not one of {:?}: {row:?}",
                self.names
            )
        })
    }

    /// The `list_queues name type leader pid messages` row of `queue` (table output, fields
    /// as printed).
    pub async fn queue_info(&self, queue: &str) -> Result<Vec<String>> {
        self.queue_fields(queue, &["type", "leader", "pid", "messages"])
            .await
    }

    /// `rabbitmqctl list_queues name <fields…>` for `queue` (asked of any node that is up):
    /// the row as printed, the name first. E.g. `&["messages_ready",
    /// "messages_unacknowledged"]`, `&["members", "online"]`.
    pub async fn queue_fields(&self, queue: &str, fields: &[&str]) -> Result<Vec<String>> {
        let mut args = vec!["list_queues", "-q", "--no-table-headers", "name"];
        args.extend_from_slice(fields);
        let out = self.ctl_any(&args).await?;
        out.lines()
            .map(|l| {
                l.split('\t')
                    .map(|f| f.trim().to_owned())
                    .collect::<Vec<_>>()
            })
            .find(|r| r.first().map(String::as_str) == Some(queue))
            .ok_or_else(|| anyhow!("queue {queue} not listed"))
    }

    /// Ready and unacknowledged messages of `queue`, from `rabbitmqctl` (unlike a passive
    /// declare, this counts the unacknowledged ones).
    pub async fn queue_counts(&self, queue: &str) -> Result<(u64, u64)> {
        let row = self
            .queue_fields(queue, &["messages_ready", "messages_unacknowledged"])
            .await?;
        let num = |i: usize| -> Result<u64> {
            row.get(i)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| anyhow!("bad list_queues row {row:?}"))
        };
        Ok((num(1)?, num(2)?))
    }
}
