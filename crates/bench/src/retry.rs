//! `retry`: what two retries add to an invoke (`retry_overhead_ms`).
//!
//! warren: one method that fails (`TaskError::fail`) while `ctx.attempt()` is at most its
//! payload, then answers. Both calls are `Client::invoke` with the same
//! `RetryPolicy::fixed(3, Duration::ZERO)`: the plain call (payload 0) succeeds at once; the
//! retried call (payload 2) fails twice, each failure republished by the worker straight to
//! the service queue (zero delay: no wait queue), and succeeds on the third attempt. The
//! figure is median(retried call) − median(plain call), end to end at the caller, over
//! [`CALLS`] sequential calls of each, alternated, after [`WARMUP`] unmeasured pairs.
//!
//! raw lapin: the same difference for a hand-written RPC whose server, instead of failing,
//! republishes the request to its own queue (persistent, mandatory, confirmed, then acks) while
//! a `retries-left` header is above 0, and otherwise answers with a confirmed publish to the
//! caller's reply queue and acks; requests carry 2 (retried) or 0 (plain). So raw's value is
//! the cost of two extra confirmed publish + consume round trips through the broker, the floor
//! of what a retry can cost. Both sides use one connection to consume and one to publish on
//! the server side, messages of the same size, and the run's queue type.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use warren_client::Task;
use warren_core::{Envelope, RetryPolicy, Target};
use warren_worker::{Context, Service, TaskError};

use super::invoke::RawRpc;
use super::stats::median;
use super::{note, Bench, Figure, Group, GroupRun};

/// The group.
pub const GROUP: Group = Group {
    name: "retry",
    about: "an invoke that fails twice then succeeds (zero-delay retries), minus a plain invoke",
    run,
};

/// Measured calls of each kind (the figure compares their medians).
const CALLS: usize = 50;
/// Unmeasured pairs before them.
const WARMUP: usize = 5;
/// Failures before the retried call succeeds.
const FAILS: u32 = 2;
/// Deadline of one call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Latencies in ms of one side's plain and retried calls.
struct Measured {
    plain: Vec<f64>,
    retried: Vec<f64>,
}

impl Measured {
    /// median(retried) − median(plain), in ms; and both medians.
    fn overhead(self) -> (f64, f64, f64) {
        let (p, r) = (median(self.plain), median(self.retried));
        (r - p, p, r)
    }
}

fn run(b: &Bench) -> GroupRun<'_> {
    Box::pin(async move {
        note(format!(
            "retry: raw lapin, {CALLS} plain and {CALLS} with {FAILS} republishes, alternated"
        ));
        let (raw, raw_plain, raw_retried) = raw_side(b).await.context("raw lapin side")?.overhead();
        note(format!(
            "retry: warren, {CALLS} plain and {CALLS} failing {FAILS} times, alternated"
        ));
        let (warren, plain, retried) = warren_side(b).await.context("warren side")?.overhead();
        note(format!(
            "retry: medians: raw lapin plain {raw_plain:.2} ms, with {FAILS} republishes \
             {raw_retried:.2} ms; warren plain {plain:.2} ms, with {FAILS} retries {retried:.2} ms"
        ));
        Ok(vec![Figure {
            name: "retry_overhead_ms",
            value: warren,
            unit: "ms",
            raw: Some(raw),
            decimals: 2,
        }])
    })
}

/// Warm-up pairs, then `CALLS` pairs of (plain, retried) calls; `call(fails)` makes one.
async fn drive<F, Fut>(call: F) -> anyhow::Result<Measured>
where
    F: Fn(u32) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    for _ in 0..WARMUP {
        call(0).await?;
        call(FAILS).await?;
    }
    let mut m = Measured {
        plain: Vec::with_capacity(CALLS),
        retried: Vec::with_capacity(CALLS),
    };
    for _ in 0..CALLS {
        for (fails, out) in [(0, &mut m.plain), (FAILS, &mut m.retried)] {
            let t = Instant::now();
            call(fails).await?;
            out.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(m)
}

// ---- raw lapin ----------------------------------------------------------------------

async fn raw_side(b: &Bench) -> anyhow::Result<Measured> {
    let (rpc, mut caller) = RawRpc::start(b, "retry").await?;
    let result = async {
        let target: Target = "bench-0123456789-retry.flaky".parse()?;
        caller.set_body_len(
            Envelope::new(&target, serde_json::json!(FAILS), None)
                .to_bytes()?
                .len(),
        );
        let caller = &caller;
        drive(|fails| async move { caller.call_with(Some(i32::try_from(fails)?)).await }).await
    }
    .await;
    rpc.close().await;
    result
}

// ---- warren -------------------------------------------------------------------------

async fn warren_side(b: &Bench) -> anyhow::Result<Measured> {
    let svc = b.service("retry")?;
    let guard = b
        .start_worker(b.worker_builder("warren bench retry worker")?.service(
            Service::new(&svc).method("flaky", |ctx: Context, fails: u32| async move {
                if ctx.attempt() <= fails {
                    return Err(TaskError::fail(format!(
                        "bench: planned failure {} of {fails}",
                        ctx.attempt()
                    )));
                }
                Ok::<u32, TaskError>(ctx.attempt())
            }),
        ))
        .await?;
    let client = b
        .client_builder("warren bench retry client")?
        .invoke_timeout(CALL_TIMEOUT)
        .connect()
        .await?;
    let target = format!("{svc}.flaky");
    let result = drive(|fails| {
        let (client, target) = (&client, &target);
        async move {
            let task =
                Task::new(target, &fails).with_retry(RetryPolicy::fixed(FAILS + 1, Duration::ZERO));
            let attempt: u32 = client.invoke(task).await?;
            if attempt != fails + 1 {
                bail!("answered on attempt {attempt}, expected {}", fails + 1);
            }
            Ok(())
        }
    })
    .await;
    client.close().await;
    guard.stop().await;
    result
}
