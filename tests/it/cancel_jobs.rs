//! Cancelling a cid stops a 200-part split job, a chain mid-way and a fan-in: no hook fires,
//! `onerror` (or the final callback) fires once with `cancelled`, per-job queues are removed;
//! one broadcast reaches every running handler of a cid (docs/cancellation.md).

use crate::cancel_common::{exists, kind_of, Fixture};
use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{poll, unique};
use serde_json::Value;
use warren::{Chain, FailureKind, Found, Task, TaskState};

#[tokio::test]
async fn cancelling_a_cid_stops_a_200_part_split_job_with_one_onerror_and_no_hook() {
    let f = Fixture::new("cancel-split", true).await;
    let (_, running) = f.worker(Duration::from_secs(2)).await;
    let cid = unique("job");
    let receipt = f
        .client
        .enqueue(
            Task::new(f.target("sum"), &200u64)
                .with_cid(cid.clone())
                .on_complete(f.target("done"))
                .on_error(f.target("failed")),
        )
        .await
        .unwrap();
    poll("some parts to run", Duration::from_secs(30), || async {
        (f.ran("sum", &cid) >= 10).then_some(())
    })
    .await;
    let out = f.client.cancel_cid(&cid).await.unwrap();
    assert!(out.recorded);
    let hooks = poll("the onerror hook", Duration::from_secs(60), || async {
        let h = f.hooks(&cid);
        (!h.is_empty()).then_some(h)
    })
    .await;
    // The job's part queue is removed by the join.
    let part_queue = warren::topology::part_queue(&f.svc, "sum", &receipt.id).unwrap();
    poll(
        "the part queue to be gone",
        Duration::from_secs(30),
        || async {
            f.client
                .broker()
                .queue_stats(&part_queue)
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    let ran = f.ran("sum", &cid);
    assert!(
        ran < 200,
        "the cancellation stopped the remaining parts ({ran} ran)"
    );
    let hooks_now = f.hooks(&cid);
    assert_eq!(hooks_now.len(), 1, "exactly one hook: {hooks_now:?}");
    assert_eq!(hooks[0].0, "failed", "no oncomplete");
    assert_eq!(kind_of(&hooks[0].1), "cancelled", "{}", hooks[0].1);
    let dead = f
        .client
        .broker()
        .queue_stats(&format!("warren.dead.{}", f.svc))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead.ready, 0, "cancelled parts are not dead-lettered");
    f.finish(running).await;
}

#[tokio::test]
async fn cancelling_a_cid_stops_a_chain_mid_way() {
    let f = Fixture::new("cancel-chain", true).await;
    let (_, running) = f.worker(Duration::from_millis(100)).await;
    let cid = unique("chain");
    let chain = (0..5)
        .fold(Chain::new(), |c, _| c.step(f.target("step")))
        .with_cid(cid.clone())
        .with_timeout(Duration::from_secs(60));
    let handle = f.client.enqueue_chain(chain).await.unwrap();
    let chain_id = handle.id;
    // After the first step, cancel.
    let s = f.store.clone().unwrap();
    let c = cid.clone();
    poll("the first step to finish", Duration::from_secs(20), || {
        let s = s.clone();
        let c = c.clone();
        async move {
            s.by_cid(&c)
                .await
                .unwrap()
                .iter()
                .any(|st| st.state == TaskState::Succeeded)
                .then_some(())
        }
    })
    .await;
    f.client.cancel_cid(&cid).await.unwrap();
    match handle.wait().await {
        Err(e) => assert_eq!(e.failure_kind(), Some(FailureKind::Cancelled), "{e}"),
        Ok(r) => panic!("the chain ran to its end: {r:?}"),
    }
    // Steps that ran: at most the one running when cancelled, and never the last ones.
    let done = s
        .by_cid(&cid)
        .await
        .unwrap()
        .iter()
        .filter(|st| st.state == TaskState::Succeeded && st.target.ends_with(".step"))
        .count();
    assert!(done < 4, "{done} steps succeeded");
    let chain_status = s.get(chain_id).await.unwrap().unwrap();
    assert_eq!(chain_status.error.unwrap().kind, FailureKind::Cancelled);
    f.finish(running).await;
}

#[tokio::test]
async fn cancelling_a_cid_stops_a_fan_in_whose_final_callback_reports_it_once() {
    let f = Fixture::new("cancel-fanin", true).await;
    let (_, running) = f.worker(Duration::from_secs(5)).await;
    let cid = unique("fan");
    let receipt = f
        .client
        .parallel(
            warren::Parallel::new()
                .target(f.target("polite"), &Value::Null)
                .target(f.target("polite"), &Value::Null)
                .target(f.target("polite"), &Value::Null)
                .on_final(f.target("failed"))
                .with_cid(cid.clone()),
        )
        .await
        .unwrap();
    poll("three targets to run", Duration::from_secs(20), || async {
        (f.ran("polite", &cid) == 3).then_some(())
    })
    .await;
    let out = f.client.cancel_cid(&cid).await.unwrap();
    assert_eq!(out.found(), Found::Running);
    let hooks = poll("the final callback", Duration::from_secs(30), || async {
        let h = f.hooks(&cid);
        (!h.is_empty()).then_some(h)
    })
    .await;
    let fan_in: warren::FanInOutcome = serde_json::from_value(hooks[0].1.clone()).unwrap();
    assert!(!fan_in.ok);
    assert_eq!(fan_in.outcomes.len(), 3);
    for o in &fan_in.outcomes {
        assert_eq!(
            o.error.as_ref().map(|e| e.kind),
            Some(FailureKind::Cancelled),
            "{o:?}"
        );
    }
    // Exactly once: the fan-in's part queue is removed by its join, and no second callback.
    let part_queue = warren::topology::fanout_queue(&receipt.job);
    poll(
        "the fan-in's part queue to be gone",
        Duration::from_secs(30),
        || async { (!exists(&f.client, &part_queue).await).then_some(()) },
    )
    .await;
    assert_eq!(f.hooks(&cid).len(), 1);
    f.finish(running).await;
}

#[tokio::test]
async fn every_handler_of_a_cid_running_at_once_is_reached_by_one_broadcast() {
    let f = Fixture::new("cancel-many", false).await;
    let (_, running) = f.worker(Duration::from_secs(5)).await;
    let cid = unique("c");
    let answers = Arc::new(AtomicUsize::new(0));
    let mut calls = Vec::new();
    for _ in 0..6 {
        let client = f.client.clone();
        let task = Task::new(f.target("polite"), &Value::Null)
            .with_cid(cid.clone())
            .with_timeout(Duration::from_secs(60));
        let answers = answers.clone();
        calls.push(tokio::spawn(async move {
            let r = client.invoke::<Value>(task).await;
            if matches!(&r, Err(e) if e.failure_kind() == Some(FailureKind::Cancelled)) {
                answers.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    poll("six handlers to run", Duration::from_secs(20), || async {
        (f.ran("polite", &cid) == 6).then_some(())
    })
    .await;
    f.client.cancel_cid(&cid).await.unwrap();
    for c in calls {
        c.await.unwrap();
    }
    assert_eq!(answers.load(Ordering::SeqCst), 6);
    f.finish(running).await;
}
