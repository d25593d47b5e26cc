//! Invoke/retry in its three modes against a target that fails twice, then succeeds:
//! sync + sync (blocks until done), sync + async (blocks once, then background) and
//! async + async (background at once), the last two with a callback.
//!
//! `cargo run --example invoke_retry` (RabbitMQ at `WARREN_AMQP_URL`, default localhost).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use warren::{Client, Context, InvokeRetry, Retried, RetryOutcome, Service, TaskError, Worker};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let svc = format!(
        "example-retry-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let (tx, mut rx) = mpsc::unbounded_channel::<RetryOutcome>();
    // Calls per key, so each mode's target fails on its first two calls.
    let calls = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let service = Service::new(&svc)
        .method("sync_crm", move |_: Context, key: String| {
            let calls = calls.clone();
            async move {
                let n = {
                    let mut c = calls.lock().map_err(|_| TaskError::fail("poisoned"))?;
                    let n = c.entry(key.clone()).or_default();
                    *n += 1;
                    *n
                };
                if n < 3 {
                    return Err(TaskError::fail(format!("{key}: CRM busy (call {n})")));
                }
                Ok(format!("{key}: synced on call {n}"))
            }
        })
        .method("done", move |_: Context, o: RetryOutcome| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(o);
                Ok::<_, TaskError>(())
            }
        });
    let worker = Worker::builder().service(service).build().await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(async move {
        let _ = stopped.await;
    }));
    let client = Client::connect().await?;
    let call = |key: &str| {
        InvokeRetry::new(format!("{svc}.sync_crm"), &key)
            .repeats(3)
            .seconds(1)
    };

    // Sync + sync: blocks through all attempts.
    let v: String = client.invoke_retry(call("a")).await?;
    println!("sync+sync  -> {v}");

    // Sync + async: the first attempt blocks; it fails, so the rest run in background.
    let with_callback = call("b")
        .callback(format!("{svc}.done"))
        .context(&json!({"ticket": 42}));
    match client
        .invoke_retry_fallback::<String>(with_callback)
        .await?
    {
        Retried::Done(v) => println!("sync+async -> done at once: {v}"),
        Retried::Background { cid } => println!("sync+async -> in background, cid {cid}"),
    }

    // Async + async: a cid at once.
    let cid = client
        .invoke_retry_async(call("c").callback(format!("{svc}.done")))
        .await?;
    println!("async+async -> cid {cid}");

    for _ in 0..2 {
        if let Some(o) = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await? {
            println!(
                "callback: ok={} attempts={} target={} call_cid={} context={} response={:?}",
                o.ok, o.attempts, o.target, o.call_cid, o.context, o.response
            );
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
