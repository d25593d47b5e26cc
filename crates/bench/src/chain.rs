//! `chain`: chains of no-op steps, beside the same number of raw-lapin RPCs.
//!
//! - `chain10_ms`: a chain of 10 steps, from `run_chain` to its result, median of [`RUNS`]
//!   runs after [`WARMUP`] unmeasured ones. Raw: 10 sequential round trips of the `invoke`
//!   group's raw RPC (a persistent, confirmed request; a consumer answers with a confirmed
//!   publish to the caller's reply queue, then acks), the median of their total.
//! - `chains_cap64_throughput`: [`CHAINS`] chains of 2 steps through
//!   `enqueue_in_parallel(chains, 64)`, chains/s from the call to the last result, median
//!   of [`ROUNDS`] runs. Raw: [`CHAINS`] pairs of sequential round trips, [`CAP`] pairs in
//!   flight.
//!
//! Note the raw side does more broker work: a raw RPC is a request and a reply (two
//! confirmed messages), so 10 RPCs are 20 messages where a 10-step chain is 11 (10 step
//! tasks and one final reply). The figure compares against what a caller would write by
//! hand with RPCs, as the issue asks, not against the message floor.
//!
//! warren: one service whose `step` method returns `{}`, hosted by an in-process worker with
//! the bench's settings. Raw requests weigh what a chain step's envelope weighs.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Map, Value};
use warren_client::{Chain, Client};
use warren_core::chain::ChainState;
use warren_core::{Envelope, HookTarget, Target, Via};
use warren_worker::{Context, Service, TaskError};

use super::invoke::{RawCaller, RawRpc};
use super::stats::{median, per_sec};
use super::{note, Bench, Figure, Group, GroupRun};

/// The group.
pub const GROUP: Group = Group {
    name: "chain",
    about: "chain of 10 no-op steps, enqueue to result; 1,000 chains of 2 steps with 64 in flight",
    run,
};

/// Steps in the latency chain.
const STEPS: usize = 10;
/// Measured latency runs (the figure is their median).
const RUNS: usize = 30;
/// Unmeasured runs before them.
const WARMUP: usize = 3;
/// Chains in the throughput run.
const CHAINS: usize = 1_000;
/// Steps of each chain in the throughput run.
const CHAIN_STEPS: usize = 2;
/// Chains in flight at once in the throughput run.
const CAP: usize = 64;
/// Throughput runs per side (the figure is their median).
const ROUNDS: usize = 3;
/// Deadline of one chain.
const DEADLINE: Duration = Duration::from_secs(60);

/// What one side measured.
struct Measured {
    /// ms per latency run.
    chain10: Vec<f64>,
    /// Chains per second, one per throughput run.
    throughput: Vec<f64>,
}

fn run(b: &Bench) -> GroupRun<'_> {
    Box::pin(async move {
        note(format!(
            "chain: raw lapin, {WARMUP} warm-up + {RUNS} runs of {STEPS} sequential RPCs, then \
             {CHAINS} x {CHAIN_STEPS} RPCs with {CAP} in flight"
        ));
        let raw = raw_side(b).await.context("raw lapin side")?;
        note(format!(
            "chain: warren, {WARMUP} warm-up + {RUNS} chains of {STEPS} steps, then {CHAINS} \
             chains of {CHAIN_STEPS} steps with enqueue_in_parallel(.., {CAP})"
        ));
        let warren = warren_side(b).await.context("warren side")?;
        Ok(vec![
            Figure {
                name: "chain10_ms",
                value: median(warren.chain10),
                unit: "ms",
                raw: Some(median(raw.chain10)),
                decimals: 1,
            },
            Figure {
                name: "chains_cap64_throughput",
                value: median(warren.throughput),
                unit: "chains/s",
                raw: Some(median(raw.throughput)),
                decimals: 0,
            },
        ])
    })
}

/// The size of a chain step's envelope (the first step of a chain of `steps` to `target`).
fn step_envelope_len(target: &str, steps: usize) -> anyhow::Result<usize> {
    let t: Target = target.parse()?;
    let id = uuid::Uuid::new_v4();
    let state = ChainState {
        id,
        steps: vec![HookTarget::from(&t); steps],
        index: 0,
        bog: Map::new(),
        returned: BTreeSet::new(),
        children: Map::new(),
    };
    let mut env = Envelope::new(&t, Value::Null, Some(id.to_string()));
    env.id = state.step_id(0);
    env.channel = Via::Chain;
    env.chain = Some(state);
    Ok(env.to_bytes()?.len())
}

// ---- raw lapin ----------------------------------------------------------------------

async fn raw_side(b: &Bench) -> anyhow::Result<Measured> {
    let (rpc, mut caller) = RawRpc::start(b, "chain").await?;
    let result = raw_drive(&mut caller).await;
    rpc.close().await;
    result
}

async fn raw_drive(caller: &mut RawCaller) -> anyhow::Result<Measured> {
    // Same length as this run's service name.
    let like = "bench-0123456789-chain.step";
    caller.set_body_len(step_envelope_len(like, STEPS)?);
    let mut chain10 = Vec::with_capacity(RUNS);
    for k in 0..WARMUP + RUNS {
        let started = Instant::now();
        for _ in 0..STEPS {
            caller.call().await?;
        }
        if k >= WARMUP {
            chain10.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    caller.set_body_len(step_envelope_len(like, CHAIN_STEPS)?);
    let caller = &*caller;
    let mut throughput = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let results: Vec<anyhow::Result<()>> = stream::iter(0..CHAINS)
            .map(|_| async move {
                for _ in 0..CHAIN_STEPS {
                    caller.call().await?;
                }
                Ok(())
            })
            .buffer_unordered(CAP)
            .collect()
            .await;
        let took = started.elapsed();
        let failed = results.iter().filter(|r| r.is_err()).count();
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            return Err(e.context(format!("{failed} of {CHAINS} raw chains failed")));
        }
        throughput.push(per_sec(CHAINS as u64, took));
    }
    Ok(Measured {
        chain10,
        throughput,
    })
}

// ---- warren -------------------------------------------------------------------------

/// A chain of `steps` steps to `target`, with the bench's deadline.
fn chain_of(target: &str, steps: usize) -> anyhow::Result<Chain> {
    let mut chain = Chain::new().with_timeout(DEADLINE);
    for _ in 0..steps {
        chain = chain.step(target);
    }
    Ok(chain)
}

async fn warren_side(b: &Bench) -> anyhow::Result<Measured> {
    let svc = b.service("chain")?;
    let guard = b
        .start_worker(b.worker_builder("warren bench chain worker")?.service(
            Service::new(&svc).method("step", |_ctx: Context, _bog: Value| async move {
                Ok::<Value, TaskError>(json!({}))
            }),
        ))
        .await?;
    let client = b.client("warren bench chain client").await?;
    let target = format!("{svc}.step");
    let result = warren_drive(&client, &target).await;
    client.close().await;
    guard.stop().await;
    result
}

async fn warren_drive(client: &Client, target: &str) -> anyhow::Result<Measured> {
    let mut chain10 = Vec::with_capacity(RUNS);
    for k in 0..WARMUP + RUNS {
        let chain = chain_of(target, STEPS)?;
        let started = Instant::now();
        let result = client
            .run_chain(chain)
            .await
            .with_context(|| format!("chain of {STEPS} steps (run {k})"))?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        if !result.bog().is_empty() {
            bail!("a chain of no-op steps ended with bog {:?}", result.bog());
        }
        if k >= WARMUP {
            chain10.push(ms);
        }
    }
    let mut throughput = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let chains = (0..CHAINS)
            .map(|_| chain_of(target, CHAIN_STEPS))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let started = Instant::now();
        let results = client.enqueue_in_parallel(chains, CAP).await?;
        let took = started.elapsed();
        if results.len() != CHAINS {
            bail!("{CHAINS} chains sent, {} results", results.len());
        }
        let failed = results.iter().filter(|r| r.is_err()).count();
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            bail!("{failed} of {CHAINS} chains failed; first: {e}");
        }
        throughput.push(per_sec(CHAINS as u64, took));
    }
    Ok(Measured {
        chain10,
        throughput,
    })
}
