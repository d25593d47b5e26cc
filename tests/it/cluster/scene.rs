//! The setting of a cluster test: its turn on the shared cluster, its service with the
//! fixture worker and client on it, what is deleted when it ends, and the kill and restart of
//! a node, each noted on stderr.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::MutexGuard;
use warren::{Client, QueueType};
use warren_core::{Broker, ReconnectPolicy};

use crate::common::{config_for, ledger_path, unique, Cleanup, FixtureWorker};
use crate::support::cluster::Cluster;

/// A test's turn on the shared cluster, held until dropped (see [`Cluster::lock`]), and
/// when it began.
pub(super) struct Turn {
    pub(super) cluster: &'static Cluster,
    pub(super) started: Instant,
    _guard: MutexGuard<'static, ()>,
}

impl Turn {
    pub(super) async fn take() -> Turn {
        let cluster = Cluster::shared().await;
        let guard = cluster.lock().await;
        Turn {
            cluster,
            started: Instant::now(),
            _guard: guard,
        }
    }
}

/// A test's service on the cluster: a unique service `svc`, whose queues are deleted when
/// the scene is dropped (even if the test panicked), a fresh ledger for its fixture worker,
/// and the URLs the worker and client are given. Holds the test's [`Turn`] to the end.
pub(super) struct Scene {
    pub(super) cluster: &'static Cluster,
    /// The prefix of this test's notes on stderr: `[tag] …`.
    pub(super) tag: String,
    /// All nodes' URLs, in the failover order.
    pub(super) urls: String,
    pub(super) svc: String,
    /// The service queue, `warren.svc.<svc>`.
    pub(super) queue: String,
    pub(super) ledger: PathBuf,
    // Dropped in this order: the service's queues, whatever else the test handed over, and
    // the turn last.
    _cleanup: Cleanup,
    held: Vec<DropOnCluster>,
    turn: Turn,
}

impl Scene {
    /// Takes the turn, with a service and ledger named after `name`, on all nodes from node 0.
    pub(super) async fn take(tag: &str, name: &str) -> Scene {
        let turn = Turn::take().await;
        let urls = turn.cluster.url_list();
        Scene::on(turn, tag, urls, unique(name), name)
    }

    /// The scene of service `svc` on `urls`, with a ledger named after `name`.
    pub(super) fn on(turn: Turn, tag: &str, urls: String, svc: String, name: &str) -> Scene {
        Scene {
            cluster: turn.cluster,
            tag: tag.to_owned(),
            _cleanup: Cleanup::on(&urls, &[&svc]),
            queue: format!("warren.svc.{svc}"),
            ledger: ledger_path(name),
            urls,
            svc,
            held: Vec::new(),
            turn,
        }
    }

    /// Keeps `cleanup` until the end of the test, dropped after the service's queues.
    pub(super) fn holding(mut self, cleanup: DropOnCluster) -> Scene {
        self.held.push(cleanup);
        self
    }

    /// Since the test took its turn.
    pub(super) fn took(&self) -> Duration {
        self.turn.started.elapsed()
    }

    /// Starts a fixture worker for the service (quorum queues) with `concurrency` and the
    /// extra environment `env`.
    pub(super) async fn worker(&self, concurrency: usize, env: &[(&str, String)]) -> FixtureWorker {
        FixtureWorker::start_with(
            &self.urls,
            &self.svc,
            QueueType::Quorum,
            &self.ledger,
            concurrency,
            env,
        )
        .await
    }

    /// A client given all the scene's URLs.
    pub(super) async fn client(&self) -> Client {
        Client::builder()
            .amqp(config_for(&self.urls, QueueType::Quorum))
            .connect()
            .await
            .expect("client connects to the cluster")
    }

    /// SIGKILLs node `node` and notes `[tag] killed node <node><detail>`, with `detail`
    /// taken right after the kill.
    pub(super) async fn kill(&self, node: usize, detail: impl FnOnce() -> String) {
        self.cluster
            .kill(node)
            .await
            .unwrap_or_else(|e| panic!("killing node {node}: {e:#}"));
        eprintln!("[{}] killed node {node}{}", self.tag, detail());
    }

    /// Restarts node `node`, which returns once all nodes run as one cluster again, and notes
    /// `[tag] node <node> back in <time><detail>`, with `detail` taken once it is back.
    /// Returns when the restart began.
    pub(super) async fn restart(
        &self,
        node: usize,
        detail: impl Future<Output = String>,
    ) -> Instant {
        let t = Instant::now();
        self.cluster
            .restart(node)
            .await
            .unwrap_or_else(|e| panic!("restarting node {node}: {e:#}"));
        eprintln!(
            "[{}] node {node} back in {:?}{}",
            self.tag,
            t.elapsed(),
            detail.await
        );
        t
    }
}

/// Deletes queues and exchanges on the cluster when dropped, even if the test panicked.
pub(super) struct DropOnCluster {
    pub(super) urls: String,
    pub(super) queues: Vec<String>,
    pub(super) exchanges: Vec<String>,
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
