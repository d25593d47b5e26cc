//! Connections cut or black-holed through a TCP proxy the test owns: the worker reconnects
//! and resumes by itself, deliveries from the dead connection are never acked as live, and the
//! ledger shows nothing lost.

use crate::common;
use crate::support;
use warren::Task;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{config, config_for, poll, unique, Cleanup};
use support::proxy::TcpProxy;
use tokio_util::sync::CancellationToken;
use warren::{Client, Context, QueueType, Service, TaskError, Worker};

type Ledger = Arc<Mutex<HashMap<u64, Vec<bool>>>>;

async fn worker_via(
    url: &str,
    svc: &str,
    ledger: Ledger,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), warren::WorkerError>>,
) {
    let service = Service::new(svc).method("work", move |ctx: Context, n: u64| {
        let ledger = ledger.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            ledger
                .lock()
                .unwrap()
                .entry(n)
                .or_default()
                .push(ctx.redelivered());
            Ok::<_, TaskError>(())
        }
    });
    let worker = Worker::builder()
        .amqp(config_for(url, QueueType::Quorum))
        .service(service)
        .concurrency(16)
        .build()
        .await
        .unwrap();
    let common::Running { stop, handle } = common::run_in_background(worker);
    (stop, handle)
}

fn check(ledger: &Ledger, n: u64) {
    let l = ledger.lock().unwrap();
    assert_eq!(l.len() as u64, n, "every task ran");
    for (k, runs) in l.iter() {
        assert!(
            runs[1..].iter().all(|r| *r),
            "task {k} ran again without a redelivery mark: {runs:?}"
        );
    }
}

async fn wait_done(ledger: &Ledger, n: u64, secs: u64) {
    poll("all tasks handled", Duration::from_secs(secs), || {
        let l = ledger.clone();
        async move { (l.lock().unwrap().len() as u64 >= n).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_twice_under_load() {
    let svc = unique("cut");
    let _cleanup = Cleanup::new(&[&svc]);
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap())
        .await
        .unwrap();
    let ledger: Ledger = Arc::default();
    let (stop, handle) = worker_via(&proxy.amqp_url(), &svc, ledger.clone()).await;
    let client = Client::builder()
        .amqp(config(QueueType::Quorum))
        .connect()
        .await
        .unwrap();
    const N: u64 = 600;
    for n in 0..N {
        client
            .enqueue(Task::new(format!("{svc}.work"), &n))
            .await
            .unwrap();
    }
    for threshold in [100, 300] {
        poll("progress before the cut", Duration::from_secs(60), || {
            let l = ledger.clone();
            async move { (l.lock().unwrap().len() >= threshold).then_some(()) }
        })
        .await;
        let before = proxy.connection_count();
        proxy.cut();
        // The worker opens new connections by itself.
        poll("worker reconnected", Duration::from_secs(60), || {
            let c = proxy.connection_count();
            async move { (c > before).then_some(()) }
        })
        .await;
    }
    wait_done(&ledger, N, 120).await;
    // Deliveries whose acks died with a cut connection come back (marked redelivered) and
    // run again once the worker has re-subscribed; wait for the queue to drain.
    let broker = client.broker().clone();
    let q = format!("warren.svc.{svc}");
    poll(
        "queue drained with the worker consuming again",
        Duration::from_secs(60),
        || {
            let (broker, q) = (broker.clone(), q.clone());
            async move {
                let s = broker.queue_stats(&q).await.ok()??;
                (s.ready == 0 && s.consumers == 1).then_some(())
            }
        },
    )
    .await;
    check(&ledger, N);
    stop.cancel();
    handle.await.unwrap().unwrap();
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_connection_is_detected_by_heartbeat() {
    let svc = unique("hole");
    let _cleanup = Cleanup::new(&[&svc]);
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap())
        .await
        .unwrap();
    let ledger: Ledger = Arc::default();
    // A short heartbeat so the dead connection is noticed in seconds.
    let url = format!("{}?heartbeat=2", proxy.amqp_url());
    let (stop, handle) = worker_via(&url, &svc, ledger.clone()).await;
    let client = Client::builder()
        .amqp(config(QueueType::Quorum))
        .connect()
        .await
        .unwrap();
    for n in 0..100u64 {
        client
            .enqueue(Task::new(format!("{svc}.work"), &n))
            .await
            .unwrap();
    }
    wait_done(&ledger, 100, 60).await;
    let before = proxy.connection_count();
    proxy.blackhole(true);
    // Work sent while the worker's connections are black-holed.
    for n in 100..200u64 {
        client
            .enqueue(Task::new(format!("{svc}.work"), &n))
            .await
            .unwrap();
    }
    // Heartbeats time out; the worker tries new connections (still black-holed).
    poll(
        "worker noticed the dead connection",
        Duration::from_secs(60),
        || {
            let c = proxy.connection_count();
            async move { (c > before).then_some(()) }
        },
    )
    .await;
    proxy.blackhole(false);
    proxy.cut();
    wait_done(&ledger, 200, 120).await;
    check(&ledger, 200);
    stop.cancel();
    handle.await.unwrap().unwrap();
    client.close().await;
}
