//! Durable retries: a worker default, a service policy, a method policy and a task's own
//! policy (most specific wins); a handler asking for "retry after D"; and a handler
//! rejecting a task for good (never retried).
//!
//! `cargo run --example retries` (RabbitMQ at `WARREN_AMQP_URL`, default localhost).

use std::time::Duration;

use warren::{Client, Context, RetryPolicy, Service, Task, TaskError, Worker};

async fn flaky(ctx: Context, fail_until: u32) -> Result<String, TaskError> {
    println!("  {} attempt {}", ctx.method(), ctx.attempt());
    if ctx.attempt() < fail_until {
        return Err(TaskError::fail("not yet"));
    }
    Ok(format!("ok on attempt {}", ctx.attempt()))
}

async fn polite(ctx: Context, _: ()) -> Result<String, TaskError> {
    if ctx.attempt() == 1 {
        // Waits in a durable delay queue on the broker, not in this worker's memory.
        return Err(TaskError::retry_after(
            Duration::from_millis(300),
            "rate limited",
        ));
    }
    Ok(format!("ok on attempt {}", ctx.attempt()))
}

async fn strict(_: Context, n: i64) -> Result<i64, TaskError> {
    if n < 0 {
        return Err(TaskError::reject("negative amounts are never valid"));
    }
    Ok(n)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let svc = format!(
        "example-retries-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let service = Service::new(&svc)
        .method("flaky", flaky)
        .method("careful", flaky)
        .method("polite", polite)
        .method("strict", strict)
        // Service policy: 3 attempts, 100 ms apart.
        .retry(RetryPolicy::fixed(3, Duration::from_millis(100)))
        // Method policy: 5 attempts, exponential from 100 ms, capped at 1 s, with jitter.
        .retry_method(
            "careful",
            RetryPolicy::exponential(5, Duration::from_millis(100), Duration::from_secs(1)),
        );
    let worker = Worker::builder()
        .service(service)
        .retry(RetryPolicy::fixed(2, Duration::from_millis(100))) // the worker's default
        .build()
        .await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(async move {
        let _ = stopped.await;
    }));
    let client = Client::connect().await?;

    println!("service policy (3 attempts):");
    let r: Result<String, _> = client.invoke(Task::new(format!("{svc}.flaky"), &3)).await;
    println!("  -> {r:?}");
    println!("method policy (5 attempts):");
    let r: Result<String, _> = client.invoke(Task::new(format!("{svc}.careful"), &5)).await;
    println!("  -> {r:?}");
    println!("task policy (1 attempt, overrides the method's 5):");
    let task = Task::new(format!("{svc}.careful"), &5).with_retry(RetryPolicy::none());
    let r: Result<String, _> = client.invoke(task).await;
    println!(
        "  -> {}",
        r.map_err(|e| e.to_string()).unwrap_or_else(|e| e)
    );
    let r: String = client
        .invoke(Task::new(format!("{svc}.polite"), &()))
        .await?;
    println!("retry_after(300 ms) -> {r}");
    let r: Result<i64, _> = client.invoke(Task::new(format!("{svc}.strict"), &-5)).await;
    println!(
        "reject -> {}",
        r.map_err(|e| e.to_string())
            .map(|v| v.to_string())
            .unwrap_or_else(|e| e)
    );

    let _ = stop.send(());
    running.await??;
    // Retries waited in the shared delay levels (warren.delay.<k>), which stay.
    for q in [format!("warren.svc.{svc}"), format!("warren.dead.{svc}")] {
        let _ = client.broker().delete_queue(&q).await;
    }
    client.close().await;
    Ok(())
}
