//! `warren schedules` runs as the real binary against a live schedule on the real broker:
//! it lists the schedule with its spec, target, last tick and next fire times.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::Value;
use warren_core::schedule::state_queue;
use warren_core::{AmqpConfig, Broker, QueueType};
use warren_worker::{Context, Schedule, Service, TaskError, Worker};

fn url() -> String {
    std::env::var("WARREN_AMQP_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

fn unique(p: &str) -> String {
    format!("t-{p}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// `warren schedules --name <name> --json`: (success, parsed stdout).
async fn schedules(name: &str) -> (bool, Value) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["schedules", "--name", name, "--json", "--next", "3"])
        .env("WARREN_AMQP_URL", url())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        out.status.success(),
        serde_json::from_str(&stdout).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn schedules_lists_a_live_schedule_with_its_last_tick_and_next_fire_times() {
    let cfg = AmqpConfig::new(&url())
        .unwrap()
        .with_queue_type(QueueType::Quorum);
    let (svc, name) = (unique("cli-sched"), unique("cli-sched"));
    let target = format!("{svc}.tick");
    let worker = Worker::builder()
        .amqp(cfg.clone())
        .service(
            Service::new(&svc).method("tick", |_: Context, _: u64| async move {
                Ok::<_, TaskError>(())
            }),
        )
        .schedule(
            &name,
            Schedule::every(Duration::from_secs(1)),
            target.as_str(),
            &7u64,
        )
        .build()
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        worker
            .run_until(async {
                let _ = stopped.await;
            })
            .await
    });

    // Poll the command until the schedule shows a tick.
    let end = Instant::now() + Duration::from_secs(30);
    let row = loop {
        let (ok, json) = schedules(&name).await;
        assert!(ok, "warren schedules succeeds: {json}");
        let row = json.as_array().and_then(|a| a.first()).cloned();
        if let Some(row) = row.filter(|r| r["last_tick_ms"].is_u64()) {
            break row;
        }
        assert!(Instant::now() < end, "no tick listed within 30 s: {json}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let now = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    assert_eq!(row["name"], Value::from(name.as_str()), "{row}");
    assert_eq!(row["target"], Value::from(target.as_str()), "{row}");
    assert!(row["error"].is_null(), "{row}");
    assert!(row["last_task"].is_string(), "{row}");
    let last = row["last_tick_ms"].as_u64().unwrap();
    assert!(last <= now + 1_000, "last tick {last} not after now {now}");
    assert!(
        now - last < 30_000,
        "last tick {last} is recent (now {now})"
    );
    let next: Vec<u64> = row["next_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(next.len(), 3, "{row}");
    assert!(next[0] > last, "{row}");
    assert!(
        next.windows(2).all(|w| w[1] - w[0] == 1_000),
        "next fire times 1 s apart: {next:?}"
    );

    // An unknown schedule is not listed (and not an error).
    let (ok, json) = schedules(&unique("cli-sched-none")).await;
    assert!(ok);
    assert_eq!(json, Value::Array(Vec::new()));

    let _ = stop.send(());
    running.await.unwrap().unwrap();
    let broker = Broker::connect(cfg).await.unwrap();
    for q in [
        state_queue(&name).unwrap(),
        format!("warren.svc.{svc}"),
        format!("warren.dead.{svc}"),
    ] {
        let _ = broker.delete_queue(&q).await;
    }
    broker.close().await;
}
