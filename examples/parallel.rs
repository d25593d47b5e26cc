//! Parallel execution and fan-out/fan-in: three targets run at once; a callback runs after
//! each of them (`on_target`) and another once after all of them (`on_final`).
//!
//! `cargo run --example parallel` (RabbitMQ at `WARREN_AMQP_URL`, default localhost).

use std::time::Duration;

use tokio::sync::mpsc;
use warren::{
    Client, Context, FanInOutcome, Parallel, Service, TargetOutcome, TaskError, Via, Worker,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let svc = format!(
        "example-parallel-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let (tx1, tx2) = (tx.clone(), tx);
    let service = Service::new(&svc)
        // Targets: ordinary methods.
        .method("price", |_: Context, sku: String| async move {
            Ok::<_, TaskError>(sku.len() as u64 * 100)
        })
        .method("stock", |_: Context, sku: String| async move {
            if sku == "gone" {
                return Err(TaskError::reject("no such sku"));
            }
            Ok(7u32)
        })
        // After each target, success or failure.
        .method("on_each", move |ctx: Context, o: TargetOutcome| {
            let tx = tx1.clone();
            async move {
                assert_eq!(ctx.via(), Via::OnTarget);
                let _ = tx.send(format!(
                    "on_each: #{} {} ok={} response={:?} error={:?}",
                    o.index, o.target, o.ok, o.response, o.error
                ));
                Ok::<_, TaskError>(())
            }
        })
        // Once, after all targets, with every outcome in the order they were added.
        .method("on_all", move |_: Context, all: FanInOutcome| {
            let tx = tx2.clone();
            async move {
                let _ = tx.send(format!(
                    "on_all: {} outcomes, all ok: {} (cid {})",
                    all.outcomes.len(),
                    all.ok,
                    all.cid
                ));
                Ok::<_, TaskError>(())
            }
        });
    let worker = Worker::builder().service(service).build().await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(async move {
        let _ = stopped.await;
    }));

    let client = Client::connect().await?;
    let receipt = client
        .parallel(
            Parallel::new()
                .target(format!("{svc}.price"), &"book")
                .target(format!("{svc}.stock"), &"book")
                .target(format!("{svc}.stock"), &"gone")
                .on_target(format!("{svc}.on_each"))
                .on_final(format!("{svc}.on_all"))
                .with_cid("basket-1"),
        )
        .await?;
    println!("sent {} targets, cid {}", receipt.tasks.len(), receipt.cid);
    for _ in 0..4 {
        if let Some(line) = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await? {
            println!("{line}");
        }
    }

    let _ = stop.send(());
    running.await??;
    for q in [format!("warren.svc.{svc}"), format!("warren.dead.{svc}")] {
        let _ = client.broker().delete_queue(&q).await;
    }
    client.close().await;
    Ok(())
}
