//! warren's demo: a worker and a client in one process, against the broker at
//! `WARREN_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! Run it with `./scripts/demo` (which makes sure RabbitMQ is up) or
//! `cargo run --example demo`. It prints what happens: an enqueued task, typed invokes, a
//! handler error coming back typed, a task retried after a delay, bad input dead-lettered,
//! an oncomplete hook, a split job counting words over chunks of a text on two worker
//! processes (the demo starts itself twice as `demo worker ...`), a parallel invoke with
//! on-target and fan-in callbacks, an invoke/retry that goes on in background, and a
//! publish to a topic with two subscribers, a two-step chain over a shared bog, a schedule
//! ticking every second, and a graceful shutdown.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use warren::Message;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use warren::{
    Chain, Client, Context, FanInOutcome, InvokeRetry, Parallel, Retried, RetryOutcome, Schedule,
    Service, Target, TargetOutcome, Task, TaskError, Worker,
};

const TEXT: &str = "the quick brown fox jumps over the lazy dog and the dog sleeps while \
the fox runs far over the hills where the wind blows and the grass grows tall and green";

#[derive(Serialize, Deserialize)]
struct CountJob {
    text: String,
    chunks: usize,
}

/// Chain inputs: each step's input type picks the keys it needs from the bog.
#[derive(Deserialize)]
struct Quote {
    items: u64,
}

#[derive(Deserialize)]
struct Subtotal {
    subtotal: u64,
}

#[derive(Serialize, Deserialize)]
struct Chunk {
    words: Vec<String>,
}

/// `demo worker <service> <n>`: a worker process hosting the word-count service.
async fn worker_process(svc: String, n: String) -> anyhow::Result<()> {
    let who = format!("[worker process {n}]");
    let who2 = who.clone();
    let service = Service::new(&svc)
        // The splitter: one part per chunk of words.
        .method("count_part", move |_: Context, job: CountJob| {
            let who = who.clone();
            async move {
                let words: Vec<String> = job.text.split_whitespace().map(str::to_owned).collect();
                let size = words.len().div_ceil(job.chunks.max(1)).max(1);
                let parts: Vec<Chunk> = words
                    .chunks(size)
                    .map(|c| Chunk { words: c.to_vec() })
                    .collect();
                println!("  {who} split the text into {} parts", parts.len());
                Ok::<_, TaskError>(parts)
            }
        })
        // Each part counts the words of its chunk.
        .method("count", move |ctx: Context, chunk: Chunk| {
            let who = who2.clone();
            async move {
                let mut counts = std::collections::BTreeMap::<String, u32>::new();
                for w in chunk.words {
                    *counts.entry(w).or_default() += 1;
                }
                let part = ctx.part().map_or(0, |p| p.part_id);
                println!("  {who} part {part} done: {} distinct words", counts.len());
                Ok::<_, TaskError>(counts)
            }
        });
    let worker = Worker::builder()
        .service(service)
        .concurrency(2)
        .build()
        .await?;
    println!("READY");
    // Runs until the demo closes our stdin.
    worker
        .run_until(async {
            let mut stdin = BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(_)) = stdin.next_line().await {}
        })
        .await?;
    Ok(())
}

/// Starts `demo worker <svc> <n>`, relays its output, returns once it is consuming.
async fn spawn_worker(svc: &str, n: usize) -> anyhow::Result<tokio::process::Child> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["worker", svc, &n.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(
        child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
    )
    .lines();
    while let Some(line) = lines.next_line().await? {
        if line == "READY" {
            break;
        }
    }
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            println!("{line}");
        }
    });
    Ok(child)
}

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
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("worker") {
        return worker_process(
            args.get(2).cloned().unwrap_or_default(),
            args.get(3).cloned().unwrap_or_default(),
        )
        .await;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error,lapin=off".into()),
        )
        .init();
    // Unique service names per run, so demo runs never see each other's tasks.
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (greeter, billing, audit, words) = (
        format!("demo-greeter-{run}"),
        format!("demo-billing-{run}"),
        format!("demo-audit-{run}"),
        format!("demo-words-{run}"),
    );
    let (events, mut seen) = mpsc::unbounded_channel::<String>();
    let (tick_tx, mut ticks) = mpsc::unbounded_channel::<String>();
    let schedule = format!("demo-tick-{run}");
    let topic = format!("demo-shipped-{run}");

    println!("== warren demo ==");
    let flaky_calls = Arc::new(AtomicU32::new(0));
    let worker = {
        let ev1 = events.clone();
        let tick_tx = tick_tx.clone();
        let ev2 = events.clone();
        let flaky = flaky_calls.clone();
        Worker::builder()
            .service(
                Service::new(&greeter)
                    .method("hello", |ctx: Context, g: Greeting| async move {
                        Ok::<_, TaskError>(format!("hello, {}! (task {}, attempt {})", g.name, ctx.task_id(), ctx.attempt()))
                    })
                    .method("tick", move |ctx: Context, _: ()| {
                        let tick_tx = tick_tx.clone();
                        async move {
                            let _ = tick_tx.send(format!("[worker] scheduled tick: task {} (cid {})", ctx.task_id(), ctx.cid()));
                            Ok::<_, TaskError>(())
                        }
                    })
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
                    }),
            )
            .service(
                Service::new(&billing)
                    .method("invoice", move |ctx: Context, inv: Invoice| {
                        let ev = ev1.clone();
                        async move {
                            if inv.cents == 0 {
                                return Err(TaskError::reject(format!("order {} has nothing to bill", inv.order)));
                            }
                            let _ = ev.send(format!("[worker] billed order {} for {} cents (cid {})", inv.order, inv.cents, ctx.cid()));
                            Ok(inv.cents)
                        }
                    })
                    .method("on_shipped", {
                        let ev = events.clone();
                        move |ctx: Context, order: serde_json::Value| {
                            let ev = ev.clone();
                            async move {
                                let _ = ev.send(format!("[worker] subscriber {}.on_shipped got {order} from topic {:?}", ctx.service(), ctx.topic().unwrap_or_default()));
                                Ok::<_, TaskError>(())
                            }
                        }
                    })
                    .subscribe(&topic, "on_shipped")
                    // Chain steps return key-values merged into the chain's bog.
                    .method("quote", |_: Context, q: Quote| async move {
                        Ok::<_, TaskError>(serde_json::json!({"subtotal": q.items * 250}))
                    })
                    .method("tax", |_: Context, s: Subtotal| async move {
                        Ok::<_, TaskError>(serde_json::json!({"total": s.subtotal + s.subtotal / 5}))
                    }),
            )
            .service(Service::new(&audit).method("words", {
                let ev = events.clone();
                move |ctx: Context, counts: Vec<std::collections::BTreeMap<String, u32>>| {
                    let ev = ev.clone();
                    async move {
                        let mut total = std::collections::BTreeMap::<String, u32>::new();
                        for part in &counts {
                            for (w, n) in part {
                                *total.entry(w.clone()).or_default() += n;
                            }
                        }
                        let mut top: Vec<_> = total.into_iter().collect();
                        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                        top.truncate(3);
                        let _ = ev.send(format!("[worker] oncomplete hook, once, with {} part results in order (cid {}): top words {top:?}", counts.len(), ctx.cid()));
                        Ok::<_, TaskError>(())
                    }
                }
            }).method("step", {
                let ev = events.clone();
                move |ctx: Context, o: TargetOutcome| {
                    let ev = ev.clone();
                    async move {
                        let what = if o.ok { format!("ok {}", o.response.unwrap_or_default()) } else { format!("error {}", o.error.map(|e| e.to_string()).unwrap_or_default()) };
                        let _ = ev.send(format!("[worker] on-target callback ({:?}): target #{} {} -> {what}", ctx.via(), o.index, o.target));
                        Ok::<_, TaskError>(())
                    }
                }
            }).method("summary", {
                let ev = events.clone();
                move |ctx: Context, o: FanInOutcome| {
                    let ev = ev.clone();
                    async move {
                        let oks = o.outcomes.iter().filter(|t| t.ok).count();
                        let _ = ev.send(format!("[worker] fan-in callback ({:?}), once: {oks} of {} targets ok (cid {})", ctx.via(), o.outcomes.len(), o.cid));
                        Ok::<_, TaskError>(())
                    }
                }
            }).method("retried", {
                let ev = events.clone();
                move |_: Context, o: RetryOutcome| {
                    let ev = ev.clone();
                    async move {
                        let _ = ev.send(format!("[worker] invoke/retry callback, once: ok={} after {} attempts of {}, response {}, context {}", o.ok, o.attempts, o.target, o.response.unwrap_or_default(), o.context));
                        Ok::<_, TaskError>(())
                    }
                }
            }).method("on_shipped", {
                let ev = events.clone();
                move |ctx: Context, order: serde_json::Value| {
                    let ev = ev.clone();
                    async move {
                        let _ = ev.send(format!("[worker] subscriber {}.on_shipped got {order} from topic {:?}", ctx.service(), ctx.topic().unwrap_or_default()));
                        Ok::<_, TaskError>(())
                    }
                }
            }).subscribe(&topic, "on_shipped").method("record", move |ctx: Context, cents: u64| {
                let ev = ev2.clone();
                async move {
                    let _ = ev.send(format!("[worker] oncomplete hook: audit recorded {cents} cents (same cid {})", ctx.cid()));
                    Ok::<_, TaskError>(())
                }
            }))
            // One task per second, whatever number of workers carry the schedule.
            .schedule(&schedule, Schedule::every(Duration::from_secs(1)), format!("{greeter}.tick"), &())
            .concurrency(8)
            .part_queue_expiry(Duration::from_secs(60))
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
        .invoke(Task::new(
            format!("{greeter}.hello"),
            &Greeting { name: "Ada".into() },
        ))
        .await?;
    println!("1. invoke {greeter}.hello -> {hello:?}");

    // 2. Enqueue (fire and forget) with an oncomplete hook.
    let task = Task::new(
        format!("{billing}.invoice"),
        &Invoice {
            order: 7,
            cents: 1250,
        },
    )
    .with_cid("order-7")
    .on_complete(&Target::new(&audit, "record")?);
    let receipt = client.enqueue(task).await?;
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
        .invoke::<u64>(Task::new(
            format!("{billing}.invoice"),
            &Invoice { order: 8, cents: 0 },
        ))
        .await
    {
        Err(e) => println!(
            "3. invoke with a rejected payload -> {e} (kind {:?})",
            e.failure_kind()
        ),
        Ok(v) => println!("3. unexpected success {v}"),
    }

    // 4. A retried task: it asks for a retry twice, through a durable delay queue.
    let out: String = client
        .invoke(Task::new(format!("{greeter}.flaky"), &()))
        .await?;
    println!(
        "4. invoke {greeter}.flaky -> {out:?} ({} calls)",
        flaky_calls.load(Ordering::SeqCst)
    );

    // 5. Bad input: a payload of the wrong type is dead-lettered, never retried.
    match client
        .invoke::<String>(Task::new(format!("{greeter}.hello"), &42))
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

    // 6. A split job on two worker processes: words.count_part splits the text, the parts
    //    run on either process, and the oncomplete hook fires once with every part's result.
    let mut procs = vec![
        spawn_worker(&words, 1).await?,
        spawn_worker(&words, 2).await?,
    ];
    println!("6. two worker processes host {words}; enqueueing a word count split into 6 parts");
    let job = Task::new(
        format!("{words}.count"),
        &CountJob {
            text: TEXT.into(),
            chunks: 6,
        },
    )
    .with_cid("word-count-1")
    .on_complete(&Target::new(&audit, "words")?);
    client.enqueue(job).await?;
    if let Some(line) = tokio::time::timeout(Duration::from_secs(30), seen.recv()).await? {
        println!("   {line}");
    }
    for p in &mut procs {
        drop(p.stdin.take()); // closing stdin stops the worker gracefully
    }
    for mut p in procs {
        let _ = tokio::time::timeout(Duration::from_secs(30), p.wait()).await;
    }

    // 7. Parallel execution with callbacks: three targets (one rejects its payload), a
    //    callback after each target and a fan-in callback once after all of them.
    let parallel = Parallel::new()
        .target(
            format!("{greeter}.hello"),
            &Greeting {
                name: "Grace".into(),
            },
        )
        .target(
            format!("{billing}.invoice"),
            &Invoice {
                order: 9,
                cents: 300,
            },
        )
        .target(
            format!("{billing}.invoice"),
            &Invoice {
                order: 10,
                cents: 0,
            },
        )
        .on_target(format!("{audit}.step"))
        .on_final(format!("{audit}.summary"))
        .with_cid("checkout-9");
    let receipt = client.parallel(parallel).await?;
    println!(
        "7. parallel invoke of 3 targets with callbacks, cid {}",
        receipt.cid
    );
    let mut lines = Vec::new();
    while lines.len() < 5 {
        match tokio::time::timeout(Duration::from_secs(30), seen.recv()).await? {
            Some(line) => lines.push(line),
            None => break,
        }
    }
    lines.sort_by_key(|l| (l.contains("fan-in"), !l.contains("on-target")));
    for line in lines {
        println!("   {line}");
    }

    // 8. Invoke/retry: the first call blocks and fails; the next attempts run in background
    //    through a durable delay queue, and the callback runs once at the end.
    flaky_calls.store(0, Ordering::SeqCst);
    let call = InvokeRetry::new(format!("{greeter}.flaky"), &())
        .repeats(3)
        .seconds(1)
        .callback(format!("{audit}.retried"))
        .context(&serde_json::json!({"requested_by": "demo"}));
    match client.invoke_retry_fallback::<String>(call).await? {
        Retried::Done(v) => println!("8. invoke/retry done at once: {v}"),
        Retried::Background { cid } => {
            println!(
                "8. invoke/retry: the first attempt failed; retrying in background, cid {cid}"
            );
            if let Some(line) = tokio::time::timeout(Duration::from_secs(30), seen.recv()).await? {
                println!("   {line}");
            }
        }
    }

    // 9. Publish/subscribe: two services subscribe to a topic; one publish reaches both,
    //    each through its own durable queue.
    let published = client
        .publish(Message::new(
            &topic,
            &serde_json::json!({"order": 7, "carrier": "owl"}),
        ))
        .await?;
    println!("9. published to topic {topic} (id {})", published.id);
    for _ in 0..2 {
        if let Some(line) = tokio::time::timeout(Duration::from_secs(30), seen.recv()).await? {
            println!("   {line}");
        }
    }

    // 10. A chain: billing.quote then billing.tax, sharing a bog; the result is the bog after
    //     the last step (here: the values the steps returned).
    let chain = Chain::new()
        .step(format!("{billing}.quote"))
        .step(format!("{billing}.tax"))
        .input("items", &4)
        .with_timeout(Duration::from_secs(30));
    let result = client.run_chain(chain).await?;
    println!(
        "10. chain quote -> tax returned {}; total {}",
        serde_json::Value::Object(result.returned()),
        result.values(&["total"])[0]
    );

    // 11. The schedule has been ticking every second since the worker started.
    for i in 0..2 {
        match tokio::time::timeout(Duration::from_secs(10), ticks.recv()).await {
            Ok(Some(line)) => println!("11. schedule {schedule} tick {}: {line}", i + 1),
            _ => println!("11. schedule {schedule}: no tick within 10 s"),
        }
    }

    // 12. Graceful shutdown, then remove the demo's queues.
    let _ = stop_tx.send(());
    running.await??;
    println!("12. workers drained and stopped");
    for q in [
        warren::topology::subscription_queue(&topic, &billing, "on_shipped"),
        warren::topology::subscription_queue(&topic, &audit, "on_shipped"),
        warren::topology::recent_queue(&topic),
        format!("warren.sched.{schedule}.last"),
    ] {
        let _ = client.broker().delete_queue(&q).await;
    }
    for svc in [&greeter, &billing, &audit, &words] {
        for q in [format!("warren.svc.{svc}"), format!("warren.dead.{svc}")] {
            let _ = client.broker().delete_queue(&q).await;
        }
    }
    // The fan-in's done marker would expire by itself after the completion window.
    let fanin = warren::topology::fanout_queue(&receipt.job);
    for q in warren::topology::job_queues(&fanin) {
        let _ = client.broker().delete_queue(&q).await;
    }
    client.close().await;
    println!("== done ==");
    Ok(())
}
