//! The worker process of `worker_rss_peak`, and how the bench drives it.
//!
//! The bench starts its own executable as `warren bench-worker`, a warren worker hosting
//! one no-op service, so the memory measured is a worker's alone (not the bench's, nor the
//! client's). The protocol over the child's stdio is three lines and a hang-up:
//! the child prints `ready` once subscribed and `done <n>` once it handled `--count` tasks;
//! the bench then reads `VmHWM` (peak resident set) from `/proc/<pid>/status` and closes
//! the child's stdin, which makes the child drain and exit.

use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use std::io::Read as _;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};
use warren_worker::Worker;

use super::noop::{enqueue_all, noop_service, Tally};
use super::{procfs, Bench, Host};

/// `warren bench-worker` options (internal).
#[derive(Debug, Args)]
pub struct BenchWorkerArgs {
    /// The service to host (its method `noop` does nothing).
    #[arg(long)]
    service: String,
    /// Print `done` after this many tasks.
    #[arg(long)]
    count: u64,
    /// Worker concurrency.
    #[arg(long)]
    concurrency: usize,
    /// Consumer prefetch.
    #[arg(long)]
    prefetch: u16,
}

/// `warren bench-worker`: runs until stdin closes.
pub async fn run(host: &Host, args: &BenchWorkerArgs) -> anyhow::Result<ExitCode> {
    let tally = Tally::new(args.count);
    let worker = Worker::builder()
        .amqp((host.amqp)("warren bench-worker")?)
        .service(noop_service(&args.service, tally.clone())?)
        .concurrency(args.concurrency)
        .prefetch(args.prefetch)
        .drain_timeout(Duration::from_secs(5))
        .build()
        .await?;
    println!("ready");
    tokio::spawn(async move {
        tally.done().await;
        println!("done {}", tally.handled());
    });
    worker
        .run_until(async {
            // A blocking read on a thread of its own: the worker stops when stdin closes.
            let _ = tokio::task::spawn_blocking(|| {
                let mut stdin = std::io::stdin();
                let mut buf = [0u8; 64];
                while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
            })
            .await;
        })
        .await?;
    Ok(ExitCode::SUCCESS)
}

/// What the worker-process run measured.
pub struct RssRun {
    /// Peak resident memory of the worker process, MiB (`None` where `/proc` is missing).
    pub peak_mib: Option<f64>,
    /// Tasks per second through the worker process.
    pub throughput: f64,
    /// CPU time the worker process used per task (start-up included).
    pub cpu_us_per_task: Option<f64>,
}

/// Runs the no-op load against a worker in its own process and reads its peak memory.
pub async fn rss_run(b: &Bench) -> anyhow::Result<RssRun> {
    let n = b.args.count;
    let svc = b.service("rss")?;
    let exe = std::env::current_exe().context("finding the warren executable")?;
    let mut child = Command::new(exe)
        .arg("bench-worker")
        .args(["--service", &svc])
        .args(["--count", &n.to_string()])
        .args(["--concurrency", &b.args.concurrency.to_string()])
        .args(["--prefetch", &b.args.prefetch.to_string()])
        .args(["--queue-type", b.queue_type.as_str()])
        .args([
            "--connect-timeout",
            &format!("{}ms", b.host.connect_timeout.as_millis()),
        ])
        // The URL goes through the environment, not the command line, where `ps` shows it.
        .env("WARREN_AMQP_URL", &b.host.urls)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting `warren bench-worker`")?;
    let pid = child.id().context("the worker process exited at once")?;
    let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let result = async {
        expect_line(&mut lines, "ready", Duration::from_secs(60)).await?;
        let client = b.client("warren bench client").await?;
        client.ensure_service(&svc).await?;
        let started = Instant::now();
        let sent = enqueue_all(&client, &format!("{svc}.noop"), n, b.args.in_flight).await;
        client.close().await;
        sent?;
        expect_line(&mut lines, "done", Duration::from_secs(600)).await?;
        #[allow(clippy::cast_precision_loss)]
        let throughput = n as f64 / started.elapsed().as_secs_f64().max(1e-9);
        Ok::<_, anyhow::Error>(RssRun {
            peak_mib: procfs::peak_rss_mib(pid),
            cpu_us_per_task: procfs::us_per(Some(Duration::ZERO), procfs::cpu_time(Some(pid)), n),
            throughput,
        })
    }
    .await;
    drop(child.stdin.take());
    if tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    result
}

async fn expect_line(
    lines: &mut Lines<BufReader<ChildStdout>>,
    word: &str,
    within: Duration,
) -> anyhow::Result<()> {
    let line = tokio::time::timeout(within, lines.next_line())
        .await
        .with_context(|| format!("the worker process did not say {word:?} within {within:?}"))?
        .context("reading from the worker process")?;
    match line {
        Some(l) if l.starts_with(word) => Ok(()),
        Some(l) => bail!("the worker process said {l:?}, expected {word:?}"),
        None => bail!("the worker process exited before saying {word:?}"),
    }
}
