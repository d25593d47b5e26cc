//! A private RabbitMQ node with the `rabbitmq_management` plugin, started once per test
//! binary and shared by the tests of `admin_api` and `web_admin` (never the shared node:
//! plugins are not enabled there).
//!
//! Like [`super::cluster`], it lives in a static that is never dropped; the node's watchdog
//! stops it and deletes its folder once the test process is gone, however it ended. Tests on
//! it use unique names and delete what they create, so they can run side by side.

use tokio::sync::OnceCell;

use super::broker_node::BrokerNode;

static SHARED: OnceCell<std::result::Result<MgmtNode, String>> = OnceCell::const_new();

/// The shared management node's addresses.
pub struct MgmtNode {
    node: BrokerNode,
    management_url: String,
}

impl MgmtNode {
    /// The node shared by this test binary, started on first use (about 10-20 s on two
    /// cores). Panics (failing the test) when it cannot start.
    pub async fn shared() -> &'static MgmtNode {
        let res = SHARED
            .get_or_init(|| async {
                let started = std::time::Instant::now();
                let res = BrokerNode::start_with_management("")
                    .await
                    .map_err(|e| format!("{e:#}"))
                    .and_then(|node| {
                        let management_url = node
                            .management_url()
                            .ok_or_else(|| String::from("no management port"))?;
                        Ok(MgmtNode {
                            node,
                            management_url,
                        })
                    });
                if res.is_ok() {
                    eprintln!(
                        "[mgmt-node] RabbitMQ with the management plugin up in {:.1?}",
                        started.elapsed()
                    );
                }
                res
            })
            .await;
        match res {
            Ok(n) => n,
            Err(e) => {
                panic!("the private RabbitMQ node with rabbitmq_management could not start: {e}")
            }
        }
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn amqp_url(&self) -> String {
        self.node.amqp_url()
    }

    /// `http://guest:guest@127.0.0.1:<port>`.
    pub fn management_url(&self) -> &str {
        &self.management_url
    }

    /// The node.
    pub fn node(&self) -> &BrokerNode {
        &self.node
    }
}
