//! A fan-in (parallel invoke with final callbacks) across real worker processes, one of
//! which is SIGKILLed while the targets run: every target runs, and each of the two final
//! callbacks fires exactly once, with all 100 outcomes in target order.

use crate::common;

use std::time::Duration;

use common::{config, hook_lines, ledger_path, unique, Cleanup, FixtureWorker, TestLevels};
use serde_json::Value;
use warren::{Client, FanInOutcome, Parallel, QueueType};
use warren_core::envelope::now_ms;
use warren_core::patterns::utc_timestamp;
use warren_core::topology::fanout_queue;

fn count(lines: &[(String, Value)], method: &str) -> usize {
    lines.iter().filter(|(m, _)| m == method).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_in_of_100_targets_survives_a_sigkill() {
    const N: usize = 100;
    let url = common::url();
    let svc = unique("fanin");
    let _cleanup = Cleanup::new(&[&svc]);
    // Join re-checks wait in delay levels of this test's own, so it can see them drain.
    let levels = TestLevels::new(&svc, 1);
    let ledger = ledger_path("fanin");
    let hooks = ledger.with_extension("hooks");
    let env = [
        ("FIXTURE_HOOKS", hooks.display().to_string()),
        ("FIXTURE_COMPLETION_WINDOW_MS", "30000".to_owned()),
        levels.fixture_env(),
    ];
    let start = || FixtureWorker::start_with(&url, &svc, QueueType::Quorum, &ledger, 2, &env);
    let mut workers = vec![start().await, start().await];
    let client = Client::builder()
        .amqp(config(QueueType::Quorum))
        .connect()
        .await
        .unwrap();

    let cid = unique("cid");
    let work = format!("{svc}.work");
    let mut p = Parallel::new();
    for i in 0..N {
        p = p.target(
            &work,
            &serde_json::json!({"key": format!("k{i}"), "ms": 20}),
        );
    }
    let p = p
        .on_final(format!("{svc}.done"))
        .on_final(format!("{svc}.failed"))
        .with_cid(&cid);
    let sent_from = utc_timestamp(now_ms());
    let receipt = client.parallel(p).await.unwrap();
    let sent_until = utc_timestamp(now_ms());
    assert_eq!(receipt.cid, cid);
    assert_eq!(receipt.tasks.len(), N);
    let part_queue = fanout_queue(&receipt.job);

    // Kill one worker while targets run, and start a fresh one.
    common::wait_lines(&ledger, 30, Duration::from_secs(60)).await;
    workers.swap_remove(0).kill9().await;
    let ran_at_kill = common::read_ledger(&ledger).len();
    assert!(ran_at_kill < N, "the kill hit the fan-in while targets ran");
    workers.push(start().await);

    // Both final callbacks ran (at least once).
    common::poll("both final callbacks", Duration::from_secs(120), || {
        let lines = hook_lines(&hooks, &cid);
        async move { (count(&lines, "done") >= 1 && count(&lines, "failed") >= 1).then_some(()) }
    })
    .await;
    // Let pending work settle (join re-checks wait 2 s in the delay levels), then stop the
    // workers gracefully: they drain, so anything still due would run before they exit.
    let broker = client.broker().clone();
    common::poll("an idle service", Duration::from_secs(60), || {
        let (broker, svc, levels) = (&broker, &svc, &levels);
        async move {
            let ready = common::service_stats(broker, svc).await.ready;
            let waiting = levels.waiting(broker).await;
            (ready == 0 && waiting == 0).then_some(())
        }
    })
    .await;
    for w in workers {
        assert!(w.terminate().await, "worker exits cleanly");
    }
    assert_eq!(
        common::service_stats(&broker, &svc).await.ready,
        0,
        "nothing left for the service after the workers drained"
    );
    assert!(
        broker.queue_stats(&part_queue).await.unwrap().is_none(),
        "the fan-in's part queue is removed after the join"
    );

    // Every target ran; any second run was a marked redelivery.
    let dups = common::check_ledger(&ledger, N);
    let redelivered = common::read_ledger(&ledger)
        .iter()
        .filter(|(_, _, r)| *r)
        .count();
    eprintln!(
        "killed after {ran_at_kill} ledger lines; {redelivered} redelivered runs, \
         {dups} re-executions"
    );

    // Exactly one `done` and one `failed`, each with every outcome in target order.
    let lines = hook_lines(&hooks, &cid);
    assert_eq!(count(&lines, "done"), 1, "exactly one done: {lines:?}");
    assert_eq!(count(&lines, "failed"), 1, "exactly one failed: {lines:?}");
    assert_eq!(lines.len(), 2, "no other hook lines for {cid}");
    for (method, payload) in &lines {
        let out: FanInOutcome = serde_json::from_value(payload.clone())
            .unwrap_or_else(|e| panic!("{method}: not a FanInOutcome ({e}): {payload}"));
        assert_eq!(out.cid, cid);
        assert_eq!(
            out.source, None,
            "{method}: sent by a client, not a handler"
        );
        assert!(out.ok, "{method}: every target succeeded");
        assert_eq!(out.outcomes.len(), N, "{method}: one outcome per target");
        for (i, o) in out.outcomes.iter().enumerate() {
            assert_eq!(o.index as usize, i, "{method}: outcomes in target order");
            assert_eq!(o.target, work);
            assert_eq!(o.cid, cid);
            assert!(o.ok, "{method}: target {i} ok");
            assert_eq!(o.response, Some(Value::from(format!("k{i}"))));
            assert!(o.error.is_none());
            // Same RFC 3339 format and width: string order is time order.
            assert!(
                sent_from <= o.req_ts_utc && o.req_ts_utc <= sent_until,
                "{method}: target {i} sent at {} (between {sent_from} and {sent_until})",
                o.req_ts_utc
            );
        }
    }

    client.close().await;
    common::cleanup_job(&url, &part_queue).await;
}
