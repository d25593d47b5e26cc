//! Chains against the real broker: the bog after three steps, key extraction, input values
//! included or not, child chains merged only when asked, a failing middle step (later steps
//! never run; error or outcome), handles completing in completion order, capped parallel
//! chains (a ledger of running chains) and handles re-created from the status store.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{config, run_in_background, unique, Cleanup};
use futures_util::stream::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use warren::RedisStore;
use warren::{
    as_completed, Chain, Client, ClientError, Context, Extract, FailureKind, QueueType,
    RetryPolicy, Service, StatusStore, TaskError, Worker,
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
struct Spawn {
    svc: String,
    n: i64,
}
#[derive(Deserialize)]
struct Index {
    i: i64,
}
#[derive(Deserialize)]
struct Wait {
    ms: u64,
    tag: String,
}

/// Chains running now and the most ever running at once (the capped-parallel ledger).
#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    max: AtomicUsize,
    ended: AtomicUsize,
}

fn service(svc: &str, ran: &Arc<Mutex<Vec<String>>>, gauge: &Arc<Gauge>) -> Service {
    let (r1, r2, r3) = (ran.clone(), ran.clone(), ran.clone());
    let (g1, g2) = (gauge.clone(), gauge.clone());
    Service::new(svc)
        .retry(RetryPolicy::none())
        .method("double", move |_: Context, s: Start| {
            let r = r1.clone();
            async move {
                r.lock().unwrap().push("double".into());
                Ok::<_, TaskError>(json!({"doubled": s.x * 2}))
            }
        })
        .method("inc", move |_: Context, m: Mid| {
            let r = r2.clone();
            async move {
                r.lock().unwrap().push("inc".into());
                Ok::<_, TaskError>(json!({"plus_one": m.doubled + 1, "x": 100}))
            }
        })
        .method("boom", |_: Context, _: Value| async move {
            Err::<Value, _>(TaskError::fail("step two fails"))
        })
        .method("last", move |_: Context, _: Value| {
            let r = r3.clone();
            async move {
                r.lock().unwrap().push("last".into());
                Ok::<_, TaskError>(json!({"done": true}))
            }
        })
        .method("wait", |_: Context, w: Wait| async move {
            tokio::time::sleep(Duration::from_millis(w.ms)).await;
            Ok::<_, TaskError>(json!({"finished": w.tag}))
        })
        .method("flaky_step", |ctx: Context, _: Value| async move {
            if ctx.attempt() < 2 {
                return Err(TaskError::fail("first attempt fails"));
            }
            Ok::<_, TaskError>(json!({"attempt": ctx.attempt()}))
        })
        .retry_method(
            "flaky_step",
            RetryPolicy::fixed(3, Duration::from_millis(10)),
        )
        .method("scalar", |_: Context, _: Value| async move {
            Ok::<_, TaskError>(7)
        })
        // Enqueues `n` one-step child chains (each returns {"child<k>": k}) and waits for
        // them; a child of a child when n > 1 (the first child spawns one grandchild).
        .method("spawn", |ctx: Context, s: Spawn| async move {
            for k in 0..s.n {
                let mut c = Chain::new().step(format!("{}.child", s.svc)).input("k", &k);
                if k == 0 && s.n > 1 {
                    c = c.input("grandchild", &true);
                }
                ctx.enqueue_chain(c).await.map_err(TaskError::fail)?;
            }
            let results = ctx.wait_children().await;
            let ok = results.iter().filter(|(_, r)| r.is_ok()).count();
            Ok::<_, TaskError>(json!({"spawned": ok, "child0": "parent wins"}))
        })
        .method("child", |ctx: Context, b: Value| async move {
            let k = b["k"].as_i64().unwrap_or(-1);
            if b["grandchild"] == json!(true) {
                let svc = ctx.service().to_owned();
                let c = Chain::new().step(format!("{svc}.child")).input("k", &99);
                ctx.run_chain(c).await.map_err(TaskError::fail)?;
            }
            Ok::<_, TaskError>(json!({ format!("child{k}"): k }))
        })
        .method("enter", move |_: Context, _: Index| {
            let g = g1.clone();
            async move {
                let now = g.now.fetch_add(1, Ordering::SeqCst) + 1;
                g.max.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok::<_, TaskError>(json!({"entered": true}))
            }
        })
        .method("leave", move |_: Context, x: Index| {
            let g = g2.clone();
            async move {
                g.now.fetch_sub(1, Ordering::SeqCst);
                g.ended.fetch_add(1, Ordering::SeqCst);
                Ok::<_, TaskError>(json!({"out": x.i * 10}))
            }
        })
}

struct Fixture {
    svc: String,
    client: Client,
    ran: Arc<Mutex<Vec<String>>>,
    gauge: Arc<Gauge>,
    running: common::Running,
    _cleanup: Cleanup,
}

impl Fixture {
    async fn stop(self) {
        self.running.stop.cancel();
        self.running.handle.await.unwrap().unwrap();
        self.client.close().await;
    }
}

async fn fixture_with(store: Option<Arc<dyn StatusStore>>) -> Fixture {
    let svc = unique("chain");
    let cleanup = Cleanup::new(&[&svc]);
    let ran: Arc<Mutex<Vec<String>>> = Arc::default();
    let gauge: Arc<Gauge> = Arc::default();
    let mut b = Worker::builder()
        .amqp(config(QueueType::Quorum))
        .service(service(&svc, &ran, &gauge))
        .concurrency(16);
    let mut cb = Client::builder().amqp(config(QueueType::Quorum));
    if let Some(s) = store {
        b = b.status_store(s.clone());
        cb = cb.status_store(s);
    }
    let worker = b.build().await.unwrap();
    let client = cb.connect().await.unwrap();
    Fixture {
        svc,
        client,
        ran,
        gauge,
        running: run_in_background(worker),
        _cleanup: cleanup,
    }
}

async fn fixture() -> (
    String,
    Client,
    Arc<Mutex<Vec<String>>>,
    common::Running,
    Cleanup,
) {
    let f = fixture_with(None).await;
    (f.svc, f.client, f.ran, f.running, f._cleanup)
}

#[tokio::test]
async fn a_three_step_chain_builds_its_bog() {
    let (svc, client, ran, running, _c) = fixture().await;
    let t = |m: &str| format!("{svc}.{m}");
    let chain = Chain::new()
        .step(t("double"))
        .step(t("inc"))
        .step(t("last"))
        .input("x", &20)
        .input("note", &"kept")
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
    // Input values included on request; keys pick from what the knobs select.
    assert_eq!(
        Value::Object(r.extract(Extract::new().with_inputs())),
        Value::Object(r.bog().clone())
    );
    assert_eq!(
        r.extract_keys(Extract::new(), &["note", "done"]),
        [Value::Null, json!(true)]
    );
    assert_eq!(
        r.extract_keys(Extract::new().with_inputs(), &["note", "done"]),
        [json!("kept"), json!(true)]
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
            .step(t("double"))
            .step(t("boom"))
            .step(t("last"))
            .input("x", &1)
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
    let bad = Chain::new().step(t("scalar"));
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
    let mut handles = Vec::new();
    for (ms, tag) in [(900u64, "slow"), (10, "fast"), (400, "middle")] {
        let chain = Chain::new()
            .step(format!("{svc}.wait"))
            .input("ms", &ms)
            .input("tag", &tag);
        handles.push(client.enqueue_chain(chain).await.unwrap());
    }
    let ids: Vec<_> = handles.iter().map(|h| h.id).collect();
    let mut order = Vec::new();
    let mut done = as_completed(handles.clone());
    while let Some((id, r)) = done.next().await {
        order.push((id, r.unwrap().values(&["finished"])[0].clone()));
    }
    assert_eq!(
        order,
        [
            (ids[1], json!("fast")),
            (ids[2], json!("middle")),
            (ids[0], json!("slow"))
        ]
    );
    // A handle is awaitable, and its clones share the ended outcome.
    let slow = handles[0].clone();
    assert!(slow.try_result().is_some());
    assert_eq!(slow.await.unwrap().values(&["finished"]), [json!("slow")]);
    running.stop.cancel();
    running.handle.await.unwrap().unwrap();
    client.close().await;
}

#[tokio::test]
async fn child_chain_results_merge_only_when_asked() {
    let f = fixture_with(None).await;
    let chain = Chain::new()
        .step(format!("{}.spawn", f.svc))
        .input("svc", &f.svc)
        .input("n", &3);
    let r = f
        .client
        .run_chain(chain.with_timeout(Duration::from_secs(60)))
        .await
        .unwrap();
    // Default: only the chain's own steps' values.
    assert_eq!(
        Value::Object(r.returned()),
        json!({"spawned": 3, "child0": "parent wins"})
    );
    // Merged: the children's (and the grandchild's), the chain's own values winning.
    assert_eq!(
        Value::Object(r.extract(Extract::new().merge_children())),
        json!({"spawned": 3, "child0": "parent wins", "child1": 1, "child2": 2, "child99": 99})
    );
    assert_eq!(
        r.extract_keys(Extract::new().merge_children(), &["child2", "child99", "n"]),
        [json!(2), json!(99), Value::Null]
    );
    f.stop().await;
}

#[tokio::test]
async fn capped_parallel_chains_never_exceed_the_cap_and_keep_input_order() {
    let f = fixture_with(None).await;
    let chains: Vec<Chain> = (0..50)
        .map(|i| {
            Chain::new()
                .step(format!("{}.enter", f.svc))
                .step(format!("{}.leave", f.svc))
                .input("i", &i)
        })
        .collect();
    let results = f.client.enqueue_in_parallel(chains, 4).await.unwrap();
    let outs: Vec<Value> = results
        .into_iter()
        .map(|r| r.unwrap().values(&["out"])[0].clone())
        .collect();
    let expected: Vec<Value> = (0..50).map(|i| json!(i * 10)).collect();
    assert_eq!(outs, expected, "results in input order");
    assert_eq!(f.gauge.ended.load(Ordering::SeqCst), 50);
    let max = f.gauge.max.load(Ordering::SeqCst);
    assert!(max <= 4, "at most 4 chains ran at once, saw {max}");
    assert!(max >= 2, "chains did run in parallel (max {max})");
    assert!(matches!(
        f.client.enqueue_in_parallel(Vec::new(), 0).await,
        Err(ClientError::ZeroParallel)
    ));
    f.stop().await;
}

/// A Redis status store under a prefix of its own.
fn store(name: &str) -> Arc<dyn StatusStore> {
    let url =
        std::env::var("WARREN_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned());
    Arc::new(
        RedisStore::new(&url, Duration::from_secs(600))
            .unwrap()
            .with_prefix(format!("{}:", unique(name))),
    )
}

#[tokio::test]
async fn a_handle_is_recreated_from_its_id_through_the_store() {
    let store = store("chainst");
    let f = fixture_with(Some(store.clone())).await;
    let t = |m: &str| format!("{}.{m}", f.svc);
    let ok = Chain::new().step(t("double")).step(t("inc")).input("x", &5);
    let bad = Chain::new().step(t("boom"));
    // A step's retry is a new copy of the step: with claims on, it must still run.
    let flaky = Chain::new()
        .step(t("flaky_step"))
        .step(t("inc"))
        .input("doubled", &1);
    let r = f
        .client
        .enqueue_chain(flaky)
        .await
        .unwrap()
        .wait_for(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(r.values(&["attempt", "plus_one"]), [json!(2), json!(2)]);
    let (ok_id, bad_id) = {
        let a = f.client.enqueue_chain(ok).await.unwrap();
        let b = f.client.enqueue_chain(bad).await.unwrap();
        (a.id, b.id) // the handles are dropped: nobody in this client waits
    };
    // Another client (as another process would), knowing only the ids.
    let other = Client::builder()
        .amqp(config(QueueType::Quorum))
        .status_store(store)
        .connect()
        .await
        .unwrap();
    let r = other
        .chain_handle(ok_id)
        .unwrap()
        .wait_for(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(r.values(&["doubled", "plus_one"]), [json!(10), json!(11)]);
    let outcome = other
        .chain_handle(bad_id)
        .unwrap()
        .wait_for(Duration::from_secs(30))
        .await;
    match outcome {
        Err(ClientError::Failed { failure, .. }) => {
            assert!(failure.message.contains("step two fails"), "{failure}")
        }
        other => panic!("expected the failure, got {other:?}"),
    }
    // Without a store there is nothing to re-create a handle from.
    assert!(f.client.chain_handle(ok_id).is_ok());
    let bare = Client::builder()
        .amqp(config(QueueType::Quorum))
        .connect()
        .await
        .unwrap();
    assert!(matches!(
        bare.chain_handle(ok_id),
        Err(ClientError::NoStatusStore)
    ));
    bare.close().await;
    other.close().await;
    f.stop().await;
}

#[tokio::test]
async fn a_re_sent_chain_step_runs_once_with_a_store() {
    use warren::wire::ChainState;
    use warren::{wire::Envelope, Target, Via};
    let store = store("chaindup");
    let f = fixture_with(Some(store.clone())).await;
    // What a redelivered predecessor re-sends: a second, first-delivery copy of a step.
    let id = uuid::Uuid::now_v7();
    let state = ChainState {
        id,
        steps: vec![warren::wire::HookTarget {
            svc: f.svc.clone(),
            method: "leave".into(),
        }],
        index: 0,
        bog: json!({"i": 1}).as_object().cloned().unwrap(),
        returned: Default::default(),
        children: Default::default(),
    };
    let mut env = Envelope::new(
        &Target::new(&f.svc, "leave").unwrap(),
        Value::Null,
        Some(id.to_string()),
    );
    env.id = state.step_id(0);
    env.channel = Via::Chain;
    env.chain = Some(state);
    f.client.send_envelope(&env, None).await.unwrap();
    f.client.send_envelope(&env, None).await.unwrap();
    common::poll("the copy dropped", Duration::from_secs(30), || {
        let store = store.clone();
        async move {
            let n = store.counter(warren::DUPLICATE_STEPS).await.unwrap();
            (n == Some(1)).then_some(())
        }
    })
    .await;
    let ended = f.client.chain_handle(id).unwrap();
    let r = ended.wait_for(Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.values(&["out"]), [json!(10)]);
    assert_eq!(f.gauge.ended.load(Ordering::SeqCst), 1, "the step ran once");
    f.stop().await;
}
