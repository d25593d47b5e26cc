//! A worker process SIGKILLed mid-chain: 20 chains of 6 steps run on a fixture worker that is
//! killed once about a third of the steps have started, then replaced. Every chain completes
//! with the right bog, each handle gets its result once, and the ledger shows every step's
//! effect, repeated only where the broker redelivered it: the workers share a status store,
//! so a step re-sent by its redelivered predecessor is claimed once and its copy dropped.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::{config, ledger_path, read_ledger, unique, url, wait_lines, Cleanup, FixtureWorker};
use futures_util::StreamExt;
use serde_json::json;
use warren::{as_completed, Chain, Client, QueueType};

const CHAINS: usize = 20;
const STEPS: u64 = 6;
const CONCURRENCY: usize = 4;

#[tokio::test]
async fn a_chain_survives_its_worker_being_killed_mid_chain() {
    let url = url();
    let svc = unique("chainkill");
    let _cleanup = Cleanup::new(&[&svc]);
    let ledger = ledger_path("chain");
    let env = [("FIXTURE_STATUS_PREFIX", format!("{}:", unique("chainkill")))];
    let start =
        || FixtureWorker::start_with(&url, &svc, QueueType::Quorum, &ledger, CONCURRENCY, &env);
    let first = start().await;
    let client = Client::builder()
        .amqp(config(QueueType::Quorum))
        .connect()
        .await
        .unwrap();
    let mut handles = Vec::new();
    for i in 0..CHAINS {
        let mut chain = Chain::new().with_cid(format!("{svc}-c{i}"));
        for _ in 0..STEPS {
            chain = chain.step(format!("{svc}.step"));
        }
        handles.push(client.enqueue_chain(chain.input("ms", &40)).await.unwrap());
    }
    // Kill once about a third of all steps have started: chains are mid-way, steps in flight.
    wait_lines(
        &ledger,
        CHAINS * STEPS as usize / 3,
        Duration::from_secs(60),
    )
    .await;
    first.kill9().await;
    let second = start().await;

    let mut ended = HashMap::new();
    let mut done = as_completed(handles);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Some((id, r)) = tokio::time::timeout_at(deadline, done.next())
        .await
        .unwrap()
    {
        let r = r.unwrap_or_else(|e| panic!("chain {id} failed: {e}"));
        assert_eq!(
            r.values(&["count", "sum"]),
            [json!(STEPS), json!(STEPS * (STEPS - 1) / 2)],
            "chain {id}'s bog"
        );
        assert!(ended.insert(id, ()).is_none(), "chain {id} ended twice");
    }
    assert_eq!(ended.len(), CHAINS, "every chain ended once");

    // The ledger: every step of every chain ran; a step ran more than once only when the
    // broker redelivered it (a redelivered step re-sends the next one; that copy is dropped).
    let lines = read_ledger(&ledger);
    let mut runs: HashMap<String, Vec<bool>> = HashMap::new();
    for (key, _attempt, redelivered) in &lines {
        runs.entry(key.clone()).or_default().push(*redelivered);
    }
    let redelivered = |key: &str| runs.get(key).is_some_and(|r| r.iter().any(|x| *x));
    for i in 0..CHAINS {
        for k in 0..STEPS {
            let key = format!("{svc}-c{i}/{k}");
            let n = runs.get(&key).map_or(0, Vec::len);
            assert!(n >= 1, "step {key} never ran");
            let first_deliveries = runs
                .get(&key)
                .map_or(0, |r| r.iter().filter(|x| !**x).count());
            assert!(
                n == 1 || (redelivered(&key) && first_deliveries <= 1),
                "step {key} ran {n} times: {:?} (redelivered flags)",
                runs[&key]
            );
        }
    }
    let repeats = lines.len() - CHAINS * STEPS as usize;
    let redeliveries = lines.iter().filter(|l| l.2).count();
    assert!(
        redeliveries >= 1,
        "the kill landed mid-step (some step was redelivered)"
    );
    // A redelivered step that had only been prefetched (never started) adds no extra run.
    assert!(
        repeats <= redeliveries,
        "{repeats} extra runs for {redeliveries} redeliveries"
    );
    assert!(second.terminate().await, "the second worker stops cleanly");
    client.close().await;
}
