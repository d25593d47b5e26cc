//! `warren schedules`: every schedule with its spec, target, last tick and next fire times.
//!
//! Schedules are found by their state queues (`warren.sched.<name>.last`): names from the
//! management API when it answers, else from `rabbitmqctl list_queues` when the broker is on
//! this machine, else the `--name` arguments. Each state queue is read over AMQP (`basic.get`
//! of its one message, then requeued: `warren_core::schedule::read_state`), and the next
//! fire times are computed from the spec stored there, by this machine's clock.

use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::Args;
use serde::Serialize;
use warren_admin::queues::warren_queues;
use warren_core::envelope::now_ms;
use warren_core::schedule::{parse_state_queue, read_state, ScheduleState};
use warren_core::Broker;

use crate::opts::Global;

/// `warren schedules` options.
#[derive(Debug, Args)]
pub struct SchedulesArgs {
    /// Only this schedule (repeatable); required when neither the management API nor
    /// rabbitmqctl is usable
    #[arg(long = "name", value_name = "NAME")]
    names: Vec<String>,
    /// How many next fire times to show
    #[arg(long, default_value_t = 3)]
    next: usize,
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
}

/// One schedule as listed.
#[derive(Debug, Serialize)]
struct Row {
    #[serde(flatten)]
    state: ScheduleState,
    /// The spec in short human form.
    describe: Option<String>,
    /// The next fire times, ms since the Unix epoch.
    next_ms: Vec<u64>,
    /// An error computing them (a spec this build cannot read).
    error: Option<String>,
}

/// `warren schedules`.
pub async fn run(global: &Global, args: &SchedulesArgs) -> anyhow::Result<ExitCode> {
    for n in &args.names {
        warren_core::names::validate_name("schedule", n)
            .with_context(|| format!("--name {n:?}"))?;
    }
    let broker = Broker::connect(global.amqp("warren schedules")?)
        .await
        .context("cannot connect to the broker")?;
    let names = if args.names.is_empty() {
        let (vhost, _) = broker.identity().await?;
        let listed = match global.management().await {
            Err(e) => Err(crate::describe(&e)),
            Ok(mgmt) => warren_queues(mgmt.as_ref(), &vhost, global.broker_is_local())
                .await
                .map_err(|e| e.to_string()),
        };
        match listed {
            Ok(l) => l
                .queues
                .iter()
                .filter_map(|q| parse_state_queue(&q.name).map(str::to_owned))
                .collect::<Vec<_>>(),
            Err(why) => {
                broker.close().await;
                bail!(
                    "cannot list schedules ({why}); set --management-url / \
                     WARREN_MANAGEMENT_URL, or name them with --name NAME"
                );
            }
        }
    } else {
        args.names.clone()
    };
    let now = now_ms();
    let mut rows = Vec::new();
    for name in names {
        let Some(state) = read_state(&broker, &name)
            .await
            .with_context(|| format!("reading schedule {name}"))?
        else {
            if !args.names.is_empty() {
                eprintln!("warning: no schedule {name} (no queue warren.sched.{name}.last)");
            }
            continue;
        };
        let (next_ms, error) = match state.spec.as_ref().map(|s| s.compile()) {
            Some(Ok(c)) => {
                // From the last tick when it is in the future (a clock behind the ticker's).
                (
                    c.upcoming(now.max(state.last_tick_ms.unwrap_or(0)), args.next),
                    None,
                )
            }
            Some(Err(e)) => (Vec::new(), Some(e.to_string())),
            None => (Vec::new(), Some(String::from("no spec stored yet"))),
        };
        rows.push(Row {
            describe: state
                .spec
                .as_ref()
                .map(warren_core::schedule::Schedule::describe),
            state,
            next_ms,
            error,
        });
    }
    broker.close().await;
    rows.sort_by(|a, b| a.state.name.cmp(&b.state.name));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows, now);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(rows: &[Row], now: u64) {
    if rows.is_empty() {
        println!("# no schedules");
        return;
    }
    for r in rows {
        let s = &r.state;
        println!("{}", s.name);
        println!(
            "  spec     {}{}",
            r.describe.as_deref().unwrap_or("-"),
            s.spec
                .as_ref()
                .map(|p| format!(", missed: {}", p.missed.as_str()))
                .unwrap_or_default()
        );
        println!("  target   {}", s.target.as_deref().unwrap_or("-"));
        match s.last_tick_ms {
            Some(t) => println!(
                "  last     {} ({} ago), task {}",
                at(t),
                ago(now, t),
                s.last_task.as_deref().unwrap_or("-")
            ),
            None => println!("  last     never"),
        }
        match &r.error {
            Some(e) => println!("  next     - ({e})"),
            None => println!(
                "  next     {}",
                r.next_ms
                    .iter()
                    .map(|t| at(*t))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// An instant as RFC 3339 UTC with milliseconds.
fn at(ms: u64) -> String {
    warren_core::schedule::format_ms(ms)
}

/// How long ago, in whole seconds (`3h 2m 5s`).
fn ago(now: u64, t: u64) -> String {
    let s = now.saturating_sub(t) / 1000;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m {s}s"),
        (h, m, s) => format!("{h}h {m}m {s}s"),
    }
}
