//! `warren cancel` runs as the real binary against the real broker and Redis: an unknown id
//! is reported unknown (and recorded), a queued task's cid is reported pending, and the
//! cancellation is in the store under the given prefix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use warren_client::{Client, Task};
use warren_core::status::{RedisStore, StatusStore};
use warren_core::{AmqpConfig, QueueType};

fn url() -> String {
    std::env::var("WARREN_AMQP_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

async fn warren(args: &[&str]) -> (bool, Value, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(args)
        .env("WARREN_AMQP_URL", url())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.success(), json, stdout)
}

#[tokio::test]
async fn cancel_reports_unknown_ids_and_pending_cids_and_records_them() {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let svc = format!("t-cli-cancel-{}", &tag[..12]);
    let prefix = format!("{svc}:");
    let store: Arc<dyn StatusStore> = Arc::new(
        RedisStore::from_env()
            .unwrap()
            .with_prefix(prefix.clone())
            .with_timeout(Duration::from_secs(2)),
    );
    let client = Client::builder()
        .amqp(
            AmqpConfig::new(&url())
                .unwrap()
                .with_queue_type(QueueType::Quorum),
        )
        .status_store(store.clone())
        .connect()
        .await
        .unwrap();
    // An unknown id: reported unknown, recorded anyway.
    let unknown = uuid::Uuid::now_v7();
    let (ok, json, out) = warren(&[
        "cancel",
        &unknown.to_string(),
        "--redis-prefix",
        &prefix,
        "--json",
    ])
    .await;
    assert!(ok, "{out}");
    assert_eq!(json["found"], "unknown", "{out}");
    assert_eq!(json["recorded"], true, "{out}");
    assert!(store.is_cancelled(&[unknown], "").await.unwrap());
    // A queued task's cid (no worker): pending.
    let cid = format!("cli-{tag}");
    let r = client
        .enqueue(Task::new(format!("{svc}.work"), &1).with_cid(cid.clone()))
        .await
        .unwrap();
    let (ok, json, out) =
        warren(&["cancel", "--cid", &cid, "--redis-prefix", &prefix, "--json"]).await;
    assert!(ok, "{out}");
    assert_eq!(json["found"], "pending", "{out}");
    assert_eq!(json["tasks"][0]["id"], r.id.to_string(), "{out}");
    assert!(store.is_cancelled(&[], &cid).await.unwrap());
    // Neither or an empty cid: refused.
    let (ok, _, _) = warren(&["cancel"]).await;
    assert!(!ok);
    let (ok, _, _) = warren(&["cancel", "--cid", ""]).await;
    assert!(!ok);
    // Clean up: the service's queues and the test's keys.
    let broker = client.broker().clone();
    for q in [format!("warren.svc.{svc}"), format!("warren.dead.{svc}")] {
        let _ = broker.delete_queue(&q).await;
    }
    client.close().await;
    let redis = redis_cleanup(&prefix).await;
    assert!(redis, "test keys removed");
}

/// Removes the test's keys with `redis-cli` (the store has no delete).
async fn redis_cleanup(prefix: &str) -> bool {
    // No Redis client crate here: `redis-cli` is the operator's tool on this machine.
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "redis-cli --scan --pattern '{prefix}*' | xargs -r redis-cli del >/dev/null"
        ))
        .status()
        .is_ok_and(|s| s.success())
}
