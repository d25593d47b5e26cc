//! Fault tests with real worker processes: SIGKILL with tasks in flight, SIGTERM drain.
//! Each checks a ledger written by the handlers: nothing lost, and duplicates only where the
//! broker marked a redelivery.

use crate::common;

use std::time::Duration;

use common::{
    check_ledger, config, enqueue_work, ledger_path, read_ledger, unique, wait_keys, wait_lines,
    Cleanup, FixtureWorker,
};
use warren::{Client, QueueType};

/// Every key ran; a key that ran more than once ran again only as a marked redelivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_tasks_in_flight_loses_nothing() {
    let url = common::url();
    let svc = unique("kill");
    let _cleanup = Cleanup::new(&[&svc]);
    let ledger = ledger_path("kill");
    let client = Client::builder()
        .amqp(config(QueueType::Quorum))
        .connect()
        .await
        .unwrap();
    const N: usize = 300;
    enqueue_work(&client, &svc, 0..N, 30).await;
    // Kill two workers in turn while they hold in-flight tasks, then let a third finish.
    for round in 1..=2 {
        let w = FixtureWorker::start(&url, &svc, QueueType::Quorum, &ledger, 8).await;
        wait_lines(&ledger, round * 40, Duration::from_secs(60)).await;
        w.kill9().await;
    }
    let w = FixtureWorker::start(&url, &svc, QueueType::Quorum, &ledger, 8).await;
    wait_keys(&ledger, N, Duration::from_secs(120)).await;
    let dups = check_ledger(&ledger, N);
    let stats = common::service_stats(client.broker(), &svc).await;
    assert_eq!(stats.ready, 0);
    assert!(w.terminate().await, "last worker exits cleanly");
    eprintln!("sigkill: {N} tasks, {dups} re-executions after kills");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_and_loses_nothing() {
    let url = common::url();
    let svc = unique("term");
    let _cleanup = Cleanup::new(&[&svc]);
    let ledger = ledger_path("term");
    let client = Client::builder()
        .amqp(config(QueueType::Classic))
        .connect()
        .await
        .unwrap();
    const N: usize = 120;
    enqueue_work(&client, &svc, 0..N, 200).await;
    let w = FixtureWorker::start(&url, &svc, QueueType::Classic, &ledger, 8).await;
    wait_lines(&ledger, 12, Duration::from_secs(60)).await;
    assert!(w.terminate().await, "worker exits cleanly on SIGTERM");
    let after_term = read_ledger(&ledger).len();
    assert!(
        after_term < N,
        "the test needs work left when the worker stopped"
    );
    let w = FixtureWorker::start(&url, &svc, QueueType::Classic, &ledger, 8).await;
    wait_keys(&ledger, N, Duration::from_secs(120)).await;
    assert!(w.terminate().await);
    // Finished tasks were acked before exit: nothing ran twice.
    let dups = check_ledger(&ledger, N);
    assert_eq!(dups, 0, "a task finished during the drain was redelivered");
    client.close().await;
}
