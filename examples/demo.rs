//! warren's demo: a worker and a client in one process, against the broker at
//! `WARREN_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! Run it with `./scripts/demo` (which makes sure RabbitMQ is up) or
//! `cargo run --example demo`. It prints what happens: an enqueued task, typed invokes, a
//! handler error coming back typed, a task retried after a delay, bad input dead-lettered,
//! an oncomplete hook, and a graceful shutdown.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use warren::{Client, Context, Service, Target, Task, TaskError, Worker};

#[derive(Serialize, Deserialize)]
struct Greeting {
    name: String,
}

#[derive(Serialize, Deserialize, Debug)]
struct Invoice {
    order: u32,
    cents: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    // Unique service names per run, so demo runs never see each other's tasks.
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (greeter, billing, audit) = (
        format!("demo-greeter-{run}"),
        format!("demo-billing-{run}"),
        format!("demo-audit-{run}"),
    );
    let (events, mut seen) = mpsc::unbounded_channel::<String>();

    println!("== warren demo ==");
    let flaky_calls = Arc::new(AtomicU32::new(0));
    let worker = {
        let ev1 = events.clone();
        let ev2 = events.clone();
        let flaky = flaky_calls.clone();
        Worker::builder()
            .service(
                Service::new(&greeter)?
                    .method("hello", |ctx: Context, g: Greeting| async move {
                        Ok::<_, TaskError>(format!("hello, {}! (task {}, attempt {})", g.name, ctx.task_id(), ctx.attempt()))
                    })?
                    .method("flaky", move |ctx: Context, _: ()| {
                        let flaky = flaky.clone();
                        async move {
                            flaky.fetch_add(1, Ordering::SeqCst);
                            if ctx.attempt() < 3 {
                                println!("  [worker] flaky: attempt {} fails, asking for a retry in 200 ms", ctx.attempt());
                                return Err(TaskError::retry_after(Duration::from_millis(200), "warming up"));
                            }
                            Ok(format!("succeeded on attempt {}", ctx.attempt()))
                        }
                    })?,
            )
            .service(
                Service::new(&billing)?
                    .method("invoice", move |ctx: Context, inv: Invoice| {
                        let ev = ev1.clone();
                        async move {
                            if inv.cents == 0 {
                                return Err(TaskError::reject(format!("order {} has nothing to bill", inv.order)));
                            }
                            let _ = ev.send(format!("[worker] billed order {} for {} cents (cid {})", inv.order, inv.cents, ctx.cid()));
                            Ok(inv.cents)
                        }
                    })?,
            )
            .service(Service::new(&audit)?.method("record", move |ctx: Context, cents: u64| {
                let ev = ev2.clone();
                async move {
                    let _ = ev.send(format!("[worker] oncomplete hook: audit recorded {cents} cents (same cid {})", ctx.cid()));
                    Ok::<_, TaskError>(())
                }
            })?)
            .concurrency(8)
            .build()
            .await?
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(async move {
        let _ = stop_rx.await;
    }));
    println!("worker started: services {greeter}, {billing}, {audit}");

    let client = Client::connect().await?;

    // 1. Invoke: typed request, typed response.
    let hello: String = client
        .invoke(
            &format!("{greeter}.hello"),
            &Greeting { name: "Ada".into() },
        )
        .await?;
    println!("1. invoke {greeter}.hello -> {hello:?}");

    // 2. Enqueue (fire and forget) with an oncomplete hook.
    let task = Task::new(
        &format!("{billing}.invoice"),
        &Invoice {
            order: 7,
            cents: 1250,
        },
    )?
    .with_cid("order-7")
    .on_complete(&Target::new(&audit, "record")?);
    let receipt = client.send(task).await?;
    println!(
        "2. enqueued {billing}.invoice: id {} cid {}",
        receipt.id, receipt.cid
    );
    for _ in 0..2 {
        if let Some(line) = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await? {
            println!("   {line}");
        }
    }

    // 3. A handler error comes back typed.
    match client
        .invoke::<u64>(
            &format!("{billing}.invoice"),
            &Invoice { order: 8, cents: 0 },
        )
        .await
    {
        Err(e) => println!(
            "3. invoke with a rejected payload -> {e} (kind {:?})",
            e.failure_kind()
        ),
        Ok(v) => println!("3. unexpected success {v}"),
    }

    // 4. A retried task: it asks for a retry twice, through a durable delay queue.
    let out: String = client.invoke(&format!("{greeter}.flaky"), &()).await?;
    println!(
        "4. invoke {greeter}.flaky -> {out:?} ({} calls)",
        flaky_calls.load(Ordering::SeqCst)
    );

    // 5. Bad input: a payload of the wrong type is dead-lettered, never retried.
    match client
        .invoke::<String>(&format!("{greeter}.hello"), &42)
        .await
    {
        Err(e) => println!("5. invoke with a payload of the wrong type -> {e}"),
        Ok(v) => println!("5. unexpected success {v}"),
    }
    let dead = client
        .broker()
        .queue_stats(&format!("warren.dead.{greeter}"))
        .await?;
    println!(
        "   dead letters in warren.dead.{greeter}: {}",
        dead.map_or(0, |s| s.ready)
    );

    // 6. Graceful shutdown, then remove the demo's queues.
    let _ = stop_tx.send(());
    running.await??;
    println!("6. worker drained and stopped");
    for svc in [&greeter, &billing, &audit] {
        for q in [
            format!("warren.svc.{svc}"),
            format!("warren.dead.{svc}"),
            format!("warren.delay.{svc}.200"),
        ] {
            let _ = client.broker().delete_queue(&q).await;
        }
    }
    client.close().await;
    println!("== done ==");
    Ok(())
}
