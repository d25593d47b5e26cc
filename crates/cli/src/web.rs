//! `warren web`: the web admin (see [`warren_admin::web`]), served until Ctrl-C.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use warren_admin::web::{serve, WebConfig};
use warren_admin::Admin;
use warren_core::status::{RedisStore, StatusStore};
use warren_core::Broker;

use crate::opts::Global;

/// `warren web` options.
#[derive(Debug, Args)]
pub struct WebArgs {
    /// Address to listen on; anything but loopback requires --token
    #[arg(long, default_value = "127.0.0.1:8088", value_name = "ADDR")]
    listen: SocketAddr,
    /// Bearer token every request must carry (Authorization: Bearer <token>, or open
    /// /?token=<token> once in a browser); required when listening beyond loopback
    #[arg(
        long,
        env = "WARREN_WEB_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
    /// Redis URL of the status store (task lookup with children and hooks, published counts,
    /// part totals, chains in flight, methods workers advertise)
    /// [default: redis://127.0.0.1:6379/ when it answers]
    #[arg(
        long,
        env = "WARREN_REDIS_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    redis: Option<String>,
}

/// The status store, if one answers within 2 s.
async fn status_store(url: Option<&str>) -> Option<Arc<dyn StatusStore>> {
    let store = match url {
        Some(u) => RedisStore::new(u, warren_core::status::DEFAULT_RETENTION).ok()?,
        None => RedisStore::from_env().ok()?,
    }
    .with_timeout(Duration::from_secs(2));
    match store.get(uuid::Uuid::nil()).await {
        Ok(_) => Some(Arc::new(store)),
        Err(e) => {
            eprintln!("warren web: no status store ({e}); task lookups are off");
            None
        }
    }
}

/// `warren web`.
pub async fn run(global: &Global, args: &WebArgs) -> anyhow::Result<ExitCode> {
    let cfg = WebConfig {
        listen: args.listen,
        token: args.token.clone().filter(|t| !t.is_empty()),
    };
    cfg.check()?;
    let broker = Broker::connect(global.amqp("warren web")?)
        .await
        .context("cannot connect to the broker")?;
    let mgmt = global.management().await?;
    match &mgmt {
        Some(m) => eprintln!("warren web: counts from the management API at {}", m.url()),
        None => eprintln!(
            "warren web: no management API (set --management-url / WARREN_MANAGEMENT_URL); \
             counts from rabbitmqctl, no workers or rates"
        ),
    }
    let store = status_store(args.redis.as_deref()).await;
    let admin = Admin::new(broker.clone(), mgmt, store, global.broker_is_local()).await?;
    let served = serve(
        admin,
        cfg,
        |addr| eprintln!("warren web: listening on http://{addr}/ (Ctrl-C stops)"),
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
    )
    .await;
    broker.close().await;
    served?;
    Ok(ExitCode::SUCCESS)
}
