//! Chains against the real broker: the bog after three steps, key extraction, input values
//! included or not, a failing middle step (later steps never run; error or outcome), and
//! handles completing in completion order.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{config, run_in_background, unique, Cleanup};
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use warren::{
    Chain, Client, ClientError, Context, FailureKind, QueueType, RetryPolicy, Service, TaskError,
    Worker,
};

#[derive(Deserialize)]
struct Start {
    x: i64,
}
#[derive(Deserialize)]
struct Mid {
    doubled: i64,
}
#[derive(Deserialize)]
struct Wait {
    ms: u64,
    tag: String,
}

async fn fixture() -> (
    String,
    Client,
    Arc<Mutex<Vec<String>>>,
    common::Running,
    Cleanup,
) {
    let svc = unique("chain");
    let cleanup = Cleanup::new(&[&svc]);
    let ran: Arc<Mutex<Vec<String>>> = Arc::default();
    let (r1, r2, r3) = (ran.clone(), ran.clone(), ran.clone());
    let service = Service::new(&svc)
        .unwrap()
        .retry(RetryPolicy::none())
        .method("double", move |_: Context, s: Start| {
            let r = r1.clone();
            async move {
                r.lock().unwrap().push("double".into());
                Ok::<_, TaskError>(json!({"doubled": s.x * 2}))
            }
        })
        .unwrap()
        .method("inc", move |_: Context, m: Mid| {
            let r = r2.clone();
            async move {
                r.lock().unwrap().push("inc".into());
                Ok::<_, TaskError>(json!({"plus_one": m.doubled + 1, "x": 100}))
            }
        })
        .unwrap()
        .method("boom", |_: Context, _: Value| async move {
            Err::<Value, _>(TaskError::fail("step two fails"))
        })
        .unwrap()
        .method("last", move |_: Context, _: Value| {
            let r = r3.clone();
            async move {
                r.lock().unwrap().push("last".into());
                Ok::<_, TaskError>(json!({"done": true}))
            }
        })
        .unwrap()
        .method("wait", |_: Context, w: Wait| async move {
            tokio::time::sleep(Duration::from_millis(w.ms)).await;
            Ok::<_, TaskError>(json!({"finished": w.tag}))
        })
        .unwrap()
        .method("scalar", |_: Context, _: Value| async move {
            Ok::<_, TaskError>(7)
        })
        .unwrap();
    let worker = Worker::builder()
        .amqp(config(QueueType::Quorum))
        .service(service)
        .concurrency(8)
        .build()
        .await
        .unwrap();
    let client = Client::builder()
        .amqp(config(QueueType::Quorum))
        .connect()
        .await
        .unwrap();
    (svc, client, ran, run_in_background(worker), cleanup)
}

#[tokio::test]
async fn a_three_step_chain_builds_its_bog() {
    let (svc, client, ran, running, _c) = fixture().await;
    let t = |m: &str| format!("{svc}.{m}");
    let chain = Chain::new()
        .step(&t("double"))
        .unwrap()
        .step(&t("inc"))
        .unwrap()
        .step(&t("last"))
        .unwrap()
        .input("x", &20)
        .unwrap()
        .input("note", &"kept")
        .unwrap()
        .with_cid("chain-cid");
    let handle = client.enqueue_chain(chain).await.unwrap();
    assert_eq!(handle.cid, "chain-cid");
    let r = handle.wait_for(Duration::from_secs(30)).await.unwrap();
    assert_eq!(*ran.lock().unwrap(), ["double", "inc", "last"]);
    assert_eq!(
        Value::Object(r.bog().clone()),
        json!({"x": 100, "note": "kept", "doubled": 40, "plus_one": 41, "done": true})
    );
    // Default extraction: returned values only ("x" was overwritten by a step, so it counts).
    assert_eq!(
        Value::Object(r.returned()),
        json!({"x": 100, "doubled": 40, "plus_one": 41, "done": true})
    );
    assert_eq!(
        r.values(&["plus_one", "doubled", "missing"]),
        [json!(41), json!(40), Value::Null]
    );
    running.stop.cancel();
    running.handle.await.unwrap().unwrap();
    client.close().await;
}

#[tokio::test]
async fn a_failing_step_aborts_the_chain() {
    let (svc, client, ran, running, _c) = fixture().await;
    let t = |m: &str| format!("{svc}.{m}");
    let chain = || {
        Chain::new()
            .step(&t("double"))
            .unwrap()
            .step(&t("boom"))
            .unwrap()
            .step(&t("last"))
            .unwrap()
            .input("x", &1)
            .unwrap()
    };
    let e = client
        .run_chain(chain().with_timeout(Duration::from_secs(30)))
        .await
        .unwrap_err();
    match &e {
        ClientError::Failed { failure, .. } => {
            assert_eq!(failure.kind, FailureKind::Handler);
            assert!(failure.message.contains("step two fails"));
        }
        other => panic!("expected the step's failure, got {other}"),
    }
    let outcome = client
        .enqueue_chain(chain())
        .await
        .unwrap()
        .outcome_of()
        .await
        .unwrap();
    assert!(
        outcome.is_err(),
        "raising off: an outcome instead of an error"
    );
    // A step returning something other than key-values fails the chain, never retried.
    let bad = Chain::new().step(&t("scalar")).unwrap();
    let e = client.run_chain(bad).await.unwrap_err();
    assert_eq!(e.failure_kind(), Some(FailureKind::Rejected), "{e}");
    assert!(
        client.enqueue_chain(Chain::new()).await.is_err(),
        "no steps: refused"
    );
    running.stop.cancel();
    running.handle.await.unwrap().unwrap();
    assert!(
        !ran.lock().unwrap().contains(&"last".to_owned()),
        "later steps never run"
    );
    client.close().await;
}

#[tokio::test]
async fn handles_complete_in_completion_order() {
    let (svc, client, _ran, running, _c) = fixture().await;
    let mut pending = FuturesUnordered::new();
    for (ms, tag) in [(900u64, "slow"), (10, "fast"), (400, "middle")] {
        let chain = Chain::new()
            .step(&format!("{svc}.wait"))
            .unwrap()
            .input("ms", &ms)
            .unwrap()
            .input("tag", &tag)
            .unwrap();
        pending.push(client.enqueue_chain(chain).await.unwrap().wait());
    }
    let mut order = Vec::new();
    while let Some(r) = pending.next().await {
        order.push(r.unwrap().values(&["finished"])[0].clone());
    }
    assert_eq!(order, [json!("fast"), json!("middle"), json!("slow")]);
    running.stop.cancel();
    running.handle.await.unwrap().unwrap();
    client.close().await;
}
