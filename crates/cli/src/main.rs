//! `warren`: the operator's command line for a warren deployment.
//!
//! # Layout
//! - `opts`: the options every command shares (`--url`, `--queue-type`, `--connect-timeout`)
//!   and how they become an [`warren_core::AmqpConfig`].
//! - `cancel`: `warren cancel <id> | --cid <cid>` (docs/cancellation.md).
//! - `check`: `warren check`, is the broker reachable, what is it, who are we.
//! - `enqueue`: `warren enqueue` and `warren invoke`.
//! - `queues`: `warren queues`, warren's queues and their counts.
//! - `dead`: `warren dead list` and `warren dead replay`, dead letters and their replay.
//! - `topics`: `warren topics`, `warren peek` and `warren status`.
//! - `web`: `warren web`, the web admin (warren-admin).
//! - Listings read RabbitMQ's management API (`--management-url`), else rabbitmqctl.
//! - `warren bench`, the same workloads through raw lapin and through warren, and the hidden
//!   `warren bench-worker` the bench starts as a separate process, come from the unpublished
//!   `warren-bench` crate, with the `bench` feature (on by default; `--no-default-features`
//!   builds a `warren` without them, and without warren-worker, lapin of its own or redis).

mod cancel;
mod check;
mod dead;
mod enqueue;
mod opts;
mod queues;
mod schedules;
mod topics;
mod web;

/// jemalloc rather than the system allocator: a delivery allocates many small short-lived
/// buffers (frames, envelopes, futures), and glibc's malloc spent about 15 % of the no-op
/// bench's CPU on them (its free-list consolidation above all). The library crates leave the
/// choice to the application; docs/operations.md recommends the same for worker binaries.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// The warren command line: check the broker, send tasks, look at queues, measure.
///
/// Every command reads the broker URL from `--url` or `WARREN_AMQP_URL` (default: a local
/// RabbitMQ as guest). Passwords are never printed.
#[derive(Debug, Parser)]
#[command(
    name = "warren",
    version,
    about = "Operate warren, the distributed worker framework on RabbitMQ",
    long_about = "Operate warren, the distributed worker framework on RabbitMQ.\n\n\
        Every command reads the broker URL from --url or WARREN_AMQP_URL (default: a local \
        RabbitMQ, amqp://guest:guest@127.0.0.1:5672/%2f). Passwords are never printed.\n\
        Log verbosity follows RUST_LOG (default: warn, lapin's own logs off).",
    after_help = "Examples:\n  \
        warren check\n  \
        warren enqueue images.resize '{\"w\": 64}'\n  \
        warren invoke math.add '{\"a\": 1, \"b\": 2}' --timeout 5s\n  \
        warren queues --json\n  \
        warren topics\n  \
        warren peek orders.created -n 5\n  \
        warren status order-42\n  \
        warren cancel --cid order-42\n  \
        warren dead list images\n  \
        warren dead replay images --all\n  \
        warren web --listen 127.0.0.1:8088\n  \
        cargo run --release -p warren-cli -- bench --only noop"
)]
struct Cli {
    #[command(flatten)]
    global: opts::Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check that the broker answers; show its version and what the URL resolves to.
    Check(check::CheckArgs),
    /// Enqueue a task (fire and forget) and print its id and cid.
    Enqueue(enqueue::EnqueueArgs),
    /// Invoke a service method, wait for its reply and print it.
    Invoke(enqueue::InvokeArgs),
    /// List warren's queues with their ready, unacked and consumer counts.
    Queues(queues::QueuesArgs),
    /// Schedules: spec, target, last tick and next fire times.
    Schedules(schedules::SchedulesArgs),
    /// Topics and their subscriptions: published, pending, unacked and dead counts.
    Topics(topics::TopicsArgs),
    /// Show the last messages published to a topic (without consuming them).
    Peek(topics::PeekArgs),
    /// Cancel a task by id, or every task of a cid (--cid); says what it found.
    Cancel(cancel::CancelArgs),
    /// Show what became of a task id or of every task of a cid (needs the status store).
    Status(topics::StatusArgs),
    /// List dead letters (per queue, or one service's) and replay them.
    Dead(dead::DeadArgs),
    /// Serve the web admin: services, dead letters and replay, topics, tasks, jobs.
    Web(web::WebArgs),
    /// Measure warren against raw lapin on the same broker, in one run.
    #[cfg(feature = "bench")]
    Bench(warren_bench::BenchArgs),
    /// (internal) The worker process `warren bench` starts to measure its memory.
    #[cfg(feature = "bench")]
    #[command(hide = true)]
    BenchWorker(warren_bench::BenchWorkerArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            // lapin logs every broker refusal at ERROR; warren reports them itself.
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,lapin=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, without repeating a cause whose text the line
/// already holds (lapin's errors include their source in their own message).
pub fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let global = cli.global;
    match cli.command {
        Command::Check(args) => check::run(&global, &args).await,
        Command::Cancel(args) => cancel::run(&global, args).await,
        Command::Enqueue(args) => enqueue::run_enqueue(&global, args).await,
        Command::Invoke(args) => enqueue::run_invoke(&global, args).await,
        Command::Queues(args) => queues::run(&global, &args).await,
        Command::Schedules(args) => schedules::run(&global, &args).await,
        Command::Dead(args) => dead::run(&global, args).await,
        Command::Topics(args) => topics::run_topics(&global, &args).await,
        Command::Peek(args) => topics::run_peek(&global, &args).await,
        Command::Status(args) => topics::run_status(&args).await,
        Command::Web(args) => web::run(&global, &args).await,
        #[cfg(feature = "bench")]
        Command::Bench(args) => {
            let product = broker_product(&global);
            warren_bench::run(global.bench_host(), args, product).await
        }
        #[cfg(feature = "bench")]
        Command::BenchWorker(args) => warren_bench::run_worker(&global.bench_host(), &args).await,
    }
}

/// What `warren bench`'s header line calls the broker: its product and version as
/// `warren check` reads them, when the first URL is plain AMQP.
#[cfg(feature = "bench")]
async fn broker_product(global: &opts::Global) -> String {
    let first = global
        .amqp("warren bench")
        .ok()
        .and_then(|c| c.urls().first().cloned());
    match first {
        Some(u) if u.redacted().starts_with("amqps:") => String::from("broker (TLS, not probed)"),
        Some(u) => match check::probe(&u.host_port(), std::time::Duration::from_secs(5)).await {
            Ok(info) => info.product_version(),
            Err(_) => String::from("unknown broker"),
        },
        None => String::from("unknown broker"),
    }
}
