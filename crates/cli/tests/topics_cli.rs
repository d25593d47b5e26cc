//! `warren topics`, `warren peek` and `warren status` run as the real binary against the
//! real broker and Redis: the counts, messages and statuses they print match what happened.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;
use warren_client::Message;

use serde_json::Value;
use warren_client::Client;
use warren_core::status::{RedisStore, StatusStore};
use warren_core::topology::{recent_queue, subscription_queue};
use warren_core::{AmqpConfig, QueueType};
use warren_worker::{Context, Service, TaskError, Worker};

fn url() -> String {
    std::env::var("WARREN_AMQP_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

fn unique(p: &str) -> String {
    format!("t-{p}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

async fn warren(args: &[&str], prefix: &str) -> (bool, Value, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(args)
        .env("WARREN_AMQP_URL", url())
        .env("WARREN_TEST_STORE_PREFIX", prefix)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.success(), json, stdout)
}

#[tokio::test]
async fn topics_peek_and_status_report_what_happened() {
    let cfg = AmqpConfig::new(&url())
        .unwrap()
        .with_queue_type(QueueType::Quorum);
    let (svc, topic) = (unique("cli-sub"), unique("cli-topic"));
    let store: Arc<dyn StatusStore> = Arc::new(RedisStore::from_env().unwrap());
    let service = Service::new(&svc)
        .method("got", |_: Context, n: u64| async move {
            Ok::<_, TaskError>(n * 10)
        })
        .subscribe(&topic, "got");
    // Subscribe (creates the queue), then stop so messages stay pending.
    let worker = Worker::builder()
        .amqp(cfg.clone())
        .service(service)
        .status_store(store.clone())
        .build()
        .await
        .unwrap();
    worker.run_until(async {}).await.unwrap();
    let client = Client::builder()
        .amqp(cfg.clone())
        .status_store(store.clone())
        .connect()
        .await
        .unwrap();
    for n in 0..5u64 {
        client
            .publish(Message::new(&topic, &n).with_cid(format!("cid-{topic}")))
            .await
            .unwrap();
    }
    let (ok, topics, text) = warren(&["topics", "--json"], "").await;
    assert!(ok, "{text}");
    let mine = topics
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["topic"] == topic.as_str())
        .expect("the topic is listed");
    assert_eq!(mine["published"], 5);
    assert_eq!(mine["recent"], 5);
    let subs = mine["subscribers"].as_array().unwrap();
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0]["target"], format!("{svc}.got"));
    assert_eq!(subs[0]["pending"], 5);
    let (ok, peeked, text) = warren(&["peek", &topic, "-n", "3", "--json"], "").await;
    assert!(ok, "{text}");
    let payloads: Vec<&Value> = peeked
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["payload"])
        .collect();
    assert_eq!(
        payloads,
        [&Value::from(2), &Value::from(3), &Value::from(4)]
    );
    // Peeking does not consume: all 5 are still kept.
    let (_, again, _) = warren(&["peek", &topic, "--json"], "").await;
    assert_eq!(again.as_array().unwrap().len(), 5);
    // Let the subscriber run, then ask for the cid's statuses from the CLI.
    let worker = Worker::builder()
        .amqp(cfg)
        .service(
            Service::new(&svc)
                .method("got", |_: Context, n: u64| async move {
                    Ok::<_, TaskError>(n * 10)
                })
                .subscribe(&topic, "got"),
        )
        .status_store(store)
        .build()
        .await
        .unwrap();
    let stop = tokio_util_like::Stop::new();
    let s2 = stop.clone();
    let handle = tokio::spawn(worker.run_until(async move { s2.wait().await }));
    let cid = format!("cid-{topic}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let statuses = loop {
        let (_, st, _) = warren(&["status", &cid, "--json"], "").await;
        let done = st.as_array().map_or(0, |a| {
            a.iter().filter(|s| s["state"] == "succeeded").count()
        });
        if done == 5 {
            break st;
        }
        assert!(tokio::time::Instant::now() < deadline, "statuses: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut results: Vec<u64> = statuses
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["result"].as_u64().unwrap())
        .collect();
    results.sort_unstable();
    assert_eq!(results, [0, 10, 20, 30, 40]);
    stop.fire();
    handle.await.unwrap().unwrap();
    let (ok, _, text) = warren(&["status", "no-such-cid-at-all"], "").await;
    assert!(!ok && text.contains("no task or cid"), "{text}");
    for q in [
        subscription_queue(&topic, &svc, "got"),
        recent_queue(&topic),
        format!("warren.svc.{svc}"),
        format!("warren.dead.{svc}"),
    ] {
        let _ = client.broker().delete_queue(&q).await;
    }
    client.close().await;
}

/// A tiny one-shot stop signal (the CLI crate does not depend on tokio-util).
mod tokio_util_like {
    use std::sync::Arc;
    use tokio::sync::Notify;

    #[derive(Clone)]
    pub struct Stop(Arc<Notify>);

    impl Stop {
        pub fn new() -> Self {
            Self(Arc::new(Notify::new()))
        }
        pub fn fire(&self) {
            self.0.notify_one();
        }
        pub async fn wait(&self) {
            self.0.notified().await;
        }
    }
}
