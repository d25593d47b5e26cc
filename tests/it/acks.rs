//! The ack book against the real broker (`warren-core/src/amqp/acks.rs`): acks of tasks
//! that end while an earlier delivery still runs go out at once (they are not held back
//! behind it, which would stall a worker at its prefetch), and no `multiple` ack covers the
//! running delivery (when the worker stops, it goes back to the queue).

use crate::common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{config, poll, run_in_background, unique, Cleanup};
use tokio::sync::Notify;
use warren::{Client, Context, QueueType, RetryPolicy, Service, Task, TaskError, Worker};

/// Fast runs: (payload, redelivered).
type Runs = Arc<Mutex<Vec<(u64, bool)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_behind_a_running_task_go_out_at_once_and_never_cover_it() {
    let svc = unique("acks");
    let _cleanup = Cleanup::new(&[&svc]);
    let qt = QueueType::Quorum;
    let started = Arc::new(Notify::new());
    let slow_runs = Arc::new(Mutex::new(0u32));
    let runs: Runs = Arc::default();
    let service = {
        let (started, slow_runs, runs) = (started.clone(), slow_runs.clone(), runs.clone());
        Service::new(&svc)
            .method("slow", move |_ctx: Context, (): ()| {
                let (started, slow_runs) = (started.clone(), slow_runs.clone());
                async move {
                    *slow_runs.lock().unwrap() += 1;
                    started.notify_one();
                    // Runs until the worker gives up on it at its stop.
                    std::future::pending::<()>().await;
                    Ok::<_, TaskError>(())
                }
            })
            .method("fast", move |ctx: Context, n: u64| {
                let runs = runs.clone();
                async move {
                    runs.lock().unwrap().push((n, ctx.redelivered()));
                    Ok::<_, TaskError>(n)
                }
            })
            .retry(RetryPolicy::none())
    };
    // Prefetch 4: with `slow` unacked, only 3 more deliveries are out at a time, so 60 fast
    // tasks finish only if each one's ack leaves while `slow` still runs.
    let worker = Worker::builder()
        .amqp(config(qt))
        .service(service)
        .concurrency(4)
        .prefetch(4)
        .drain_timeout(Duration::from_millis(300))
        .build()
        .await
        .expect("worker starts");
    let running = run_in_background(worker);
    let client = Client::builder()
        .amqp(config(qt))
        .connect()
        .await
        .expect("client connects");

    client
        .enqueue(Task::new(format!("{svc}.slow"), &()))
        .await
        .expect("enqueue slow");
    tokio::time::timeout(Duration::from_secs(30), started.notified())
        .await
        .expect("slow started");
    const FAST: u64 = 60;
    for n in 0..FAST {
        client
            .enqueue(Task::new(format!("{svc}.fast"), &n))
            .await
            .expect("enqueue fast");
    }
    poll(
        "every fast task ran while slow still runs",
        Duration::from_secs(30),
        || {
            let runs = runs.clone();
            async move { (runs.lock().unwrap().len() as u64 >= FAST).then_some(()) }
        },
    )
    .await;

    // The worker stops and gives up on `slow`, which goes back to the queue: it could not
    // had a `multiple` ack covered it while it ran.
    running.stop_cleanly().await;
    let broker = client.broker().clone();
    let queue = format!("warren.svc.{svc}");
    poll("slow back in its queue", Duration::from_secs(30), || {
        let (broker, queue) = (broker.clone(), queue.clone());
        async move {
            let ready = broker
                .queue_stats(&queue)
                .await
                .ok()
                .flatten()
                .map_or(0, |s| s.ready);
            (ready == 1).then_some(())
        }
    })
    .await;
    client.close().await;
    let runs = runs.lock().unwrap().clone();
    let distinct: HashSet<u64> = runs.iter().map(|(n, _)| *n).collect();
    assert_eq!(runs.len() as u64, FAST, "each fast task ran once: {runs:?}");
    assert_eq!(distinct.len() as u64, FAST);
    assert!(runs.iter().all(|(_, redelivered)| !redelivered));
    assert_eq!(*slow_runs.lock().unwrap(), 1, "slow ran once");
}
