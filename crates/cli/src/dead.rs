//! `warren dead`: look at dead letters and replay them.
//!
//! - `warren dead list` lists every `warren.dead.*` queue with its counts (from the
//!   management API, else `rabbitmqctl`, like `warren queues`);
//! - `warren dead list <svc>` shows the dead letters of one service without removing them:
//!   they are taken with `basic.get`, held unacked, and put back in their order;
//! - `warren dead replay <svc> --id <task id>... | --all` republishes dead letters to the
//!   queue they came from and removes each only after its republish was confirmed.
//!
//! The broker work is in [`warren_ops`]; this module parses options and
//! prints.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{ArgGroup, Args, Subcommand};
use serde::Serialize;
use serde_json::{json, Value};
use warren_admin::queues::{warren_queues, QueueRow};
use warren_core::topology::{dead_queue, service_queue};
use warren_core::{Broker, HeaderValue, Publisher};
use warren_ops::{DeadLetter, DeadLetterOps, DeadLetters, ReplayReport, ReplaySelection};

use crate::opts::Global;

/// Prefix of dead-letter queues.
const DEAD_PREFIX: &str = "warren.dead.";
/// Most characters of an error shown in the table (the JSON output has all of it).
const ERROR_WIDTH: usize = 60;

/// `warren dead` options.
#[derive(Debug, Args)]
pub struct DeadArgs {
    #[command(subcommand)]
    command: DeadCommand,
}

#[derive(Debug, Subcommand)]
enum DeadCommand {
    /// List the dead-letter queues, or the dead letters of one service (left in place)
    #[command(after_help = "Examples:\n  \
        warren dead list\n  \
        warren dead list images\n  \
        warren dead list images --limit 0 --json")]
    List(ListArgs),
    /// Republish dead letters to the queue they came from, then remove them
    #[command(after_help = "Examples:\n  \
        warren dead replay images --id 0195a3c2-7d1e-7c4b-9a51-3f0e2b6c8d11\n  \
        warren dead replay images --all\n\n\
        A dead letter is removed only after its republish was confirmed by the broker. If \
        the replay is interrupted between the two, the task is in its queue and still a \
        dead letter: replaying it again runs it twice (both copies carry x-warren-replayed).")]
    Replay(ReplayArgs),
}

/// `warren dead list` options.
#[derive(Debug, Args)]
struct ListArgs {
    /// The service whose dead letters to show; without it, every dead-letter queue and its
    /// count (needs the management API, or rabbitmqctl on this machine)
    #[arg(value_name = "SERVICE")]
    svc: Option<String>,
    /// Show at most this many dead letters, oldest first (0: all)
    #[arg(long, default_value_t = 100, value_name = "N")]
    limit: usize,
    /// Print JSON instead of a table (every field, bodies included)
    #[arg(long)]
    json: bool,
}

/// `warren dead replay` options.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["ids", "all"])))]
struct ReplayArgs {
    /// The service whose dead letters to replay
    #[arg(value_name = "SERVICE")]
    svc: String,
    /// Replay the dead letter with this task id (repeatable)
    #[arg(long = "id", value_name = "TASK_ID")]
    ids: Vec<String>,
    /// Replay every dead letter in the queue when the replay starts
    #[arg(long, conflicts_with = "ids")]
    all: bool,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

/// `warren dead`.
pub async fn run(global: &Global, args: DeadArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        DeadCommand::List(a) => match a.svc.as_deref() {
            None => list_queues(global, &a).await,
            Some(svc) => list_letters(global, svc, &a).await,
        },
        DeadCommand::Replay(a) => replay(global, &a).await,
    }
}

fn check_service(svc: &str) -> anyhow::Result<()> {
    warren_core::names::validate_name("service", svc).with_context(|| format!("{svc:?}"))?;
    dead_queue(svc)?;
    Ok(())
}

async fn connect(global: &Global) -> anyhow::Result<Broker> {
    Broker::connect(global.amqp("warren dead")?)
        .await
        .context("cannot connect to the broker")
}

// ---------------------------------------------------------------------------------------
// warren dead list (every queue)

async fn list_queues(global: &Global, args: &ListArgs) -> anyhow::Result<ExitCode> {
    let broker = connect(global).await?;
    let vhost = broker.identity().await.map(|(v, _)| v);
    broker.close().await;
    let vhost = vhost?;
    let mgmt = global.management().await?;
    let listing = warren_queues(mgmt.as_ref(), &vhost, global.broker_is_local())
        .await
        .context(
            "cannot list the dead-letter queues; name the service instead: warren dead list \
             <SERVICE>",
        )?;
    let source = listing.source;
    let mut rows: Vec<QueueRow> = listing
        .queues
        .into_iter()
        .filter(|r| r.name.starts_with(DEAD_PREFIX) && r.name.len() > DEAD_PREFIX.len())
        .collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    if args.json {
        let out: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({
                    "service": &r.name[DEAD_PREFIX.len()..],
                    "queue": r.name,
                    "type": r.kind,
                    "messages": r.messages(),
                    "ready": r.ready,
                    "unacked": r.unacked,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "# dead-letter queues of vhost {vhost} (counts from {})",
        source.as_str()
    );
    if rows.is_empty() {
        println!("# none");
        return Ok(ExitCode::SUCCESS);
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let show = |v: Option<u64>| v.map_or_else(|| String::from("-"), |n| n.to_string());
            vec![
                r.name[DEAD_PREFIX.len()..].to_owned(),
                show(r.ready),
                show(r.unacked),
                r.kind.clone().unwrap_or_else(|| String::from("-")),
                r.name.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["SERVICE", "READY", "UNACKED", "TYPE", "QUEUE"],
            &[false, true, true, false, false],
            &cells
        )
    );
    println!("# see one: warren dead list <SERVICE>");
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------
// warren dead list <svc>

async fn list_letters(global: &Global, svc: &str, args: &ListArgs) -> anyhow::Result<ExitCode> {
    check_service(svc)?;
    let broker = connect(global).await?;
    let limit = (args.limit > 0).then_some(args.limit);
    let listing = broker.dead_letters(svc, limit).await;
    broker.close().await;
    let Some(listing) = listing? else {
        bail!(
            "{} does not exist (no worker of service {svc:?} ever started on this vhost)",
            dead_queue(svc)?
        );
    };
    if args.json {
        let out: Vec<LetterJson<'_>> = listing.letters.iter().map(letter_json).collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", letters_table(svc, &listing));
    }
    Ok(ExitCode::SUCCESS)
}

/// One dead letter with every field, in `--json` output.
#[derive(Debug, Serialize)]
struct LetterJson<'a> {
    index: usize,
    task_id: Option<&'a str>,
    cid: Option<&'a str>,
    target: Option<&'a str>,
    reason: Option<&'a str>,
    error: Option<&'a str>,
    source_queue: Option<&'a str>,
    dead_at: Option<String>,
    dead_at_ms: Option<i64>,
    replayed: i64,
    by_broker: bool,
    redelivered: bool,
    headers: serde_json::Map<String, Value>,
    /// The body as JSON when it is JSON, else as (lossy UTF-8) text.
    body: Value,
}

fn letter_json(l: &DeadLetter) -> LetterJson<'_> {
    let headers = l
        .headers
        .iter()
        .map(|(k, v)| {
            let v = match v {
                HeaderValue::Str(s) | HeaderValue::Other(s) => Value::from(s.as_str()),
                HeaderValue::Int(i) => Value::from(*i),
                HeaderValue::Bool(b) => Value::from(*b),
                HeaderValue::StrList(l) => Value::from(l.clone()),
            };
            (k.clone(), v)
        })
        .collect();
    let body = serde_json::from_slice::<Value>(&l.body)
        .unwrap_or_else(|_| Value::from(String::from_utf8_lossy(&l.body).into_owned()));
    LetterJson {
        index: l.index,
        task_id: l.task_id.as_deref(),
        cid: l.cid.as_deref(),
        target: l.target.as_deref(),
        reason: l.reason.as_deref(),
        error: l.error.as_deref(),
        source_queue: l.source_queue.as_deref(),
        dead_at: l.dead_at_ms.map(|ms| utc(ms, true)),
        dead_at_ms: l.dead_at_ms,
        replayed: l.replayed,
        by_broker: l.by_broker,
        redelivered: l.redelivered,
        headers,
        body,
    }
}

/// The dead letters as a table: one line each, the error last and cut short.
fn letters_table(svc: &str, listing: &DeadLetters) -> String {
    let mut out = String::new();
    let shown = listing.letters.len();
    let total = usize::try_from(listing.total)
        .unwrap_or(usize::MAX)
        .max(shown);
    let default_source = service_queue(svc).unwrap_or_default();
    let all_default = listing
        .letters
        .iter()
        .all(|l| l.source_queue.as_deref().unwrap_or(&default_source) == default_source);
    let _ = write!(out, "# {}: {total} dead letter(s)", listing.queue);
    if shown < total {
        let _ = write!(out, ", showing the oldest {shown} (--limit)");
    }
    if shown > 0 && all_default {
        let _ = write!(out, ", all from {default_source}");
    }
    out.push('\n');
    if shown == 0 {
        return out;
    }
    let any_replayed = listing.letters.iter().any(|l| l.replayed > 0);
    let mut heads = vec!["#", "DEAD AT (UTC)", "TASK ID", "CID", "TARGET", "REASON"];
    let mut right = vec![true, false, false, false, false, false];
    if any_replayed {
        heads.push("REPLAYED");
        right.push(true);
    }
    if !all_default {
        heads.push("SOURCE");
        right.push(false);
    }
    heads.push("ERROR");
    right.push(false);
    let dash = || String::from("-");
    let cells: Vec<Vec<String>> = listing
        .letters
        .iter()
        .map(|l| {
            let mut row = vec![
                (l.index + 1).to_string(),
                l.dead_at_ms.map_or_else(dash, |ms| utc(ms, false)),
                l.task_id.clone().unwrap_or_else(dash),
                l.cid.as_deref().map_or_else(dash, |c| cut(c, 36)),
                l.target.as_deref().map_or_else(dash, |t| cut(t, 40)),
                l.reason.clone().unwrap_or_else(dash),
            ];
            if any_replayed {
                row.push(l.replayed.to_string());
            }
            if !all_default {
                row.push(l.source_queue.clone().unwrap_or_else(dash));
            }
            row.push(
                l.error
                    .as_deref()
                    .map_or_else(dash, |e| cut(e, ERROR_WIDTH)),
            );
            row
        })
        .collect();
    out.push_str(&table(&heads, &right, &cells));
    let _ = writeln!(
        out,
        "# replay: warren dead replay {svc} --id <TASK ID> (or --all); full errors and bodies: --json"
    );
    out
}

// ---------------------------------------------------------------------------------------
// warren dead replay

async fn replay(global: &Global, args: &ReplayArgs) -> anyhow::Result<ExitCode> {
    check_service(&args.svc)?;
    let selection = if args.all {
        ReplaySelection::All
    } else {
        ReplaySelection::Ids(args.ids.clone())
    };
    let broker = connect(global).await?;
    let publisher = Publisher::new(broker.clone(), 1);
    // A progress bar on stderr (hidden when stderr is not a terminal, and with --json).
    let bar = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(0)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "replaying {bar:40} {pos}/{len} dead letters ({elapsed})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let report = broker
        .replay_dead_letters_with_progress(&publisher, &args.svc, &selection, &progress)
        .await;
    bar.finish_and_clear();
    broker.close().await;
    let Some(report) = report? else {
        bail!(
            "{} does not exist (no worker of service {:?} ever started on this vhost)",
            dead_queue(&args.svc)?,
            args.svc
        );
    };
    if !report.unmatched.is_empty() {
        bail!(
            "no dead letter in {} has task id {} ({} dead letter(s) looked at); nothing was \
             replayed",
            report.queue,
            report.unmatched.join(", "),
            report.looked_at
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report_json(&report))?);
    } else {
        print!("{}", report_text(&report));
    }
    Ok(if report.failed.is_empty() && !report.interrupted {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `warren dead replay --json` output.
#[derive(Debug, Serialize)]
struct ReportJson<'a> {
    queue: &'a str,
    looked_at: usize,
    replayed: Vec<ReplayedJson<'a>>,
    skipped: usize,
    failed: Vec<FailedJson<'a>>,
    interrupted: bool,
}

#[derive(Debug, Serialize)]
struct ReplayedJson<'a> {
    task_id: Option<&'a str>,
    cid: Option<&'a str>,
    destination: &'a str,
    replay_count: i64,
}

#[derive(Debug, Serialize)]
struct FailedJson<'a> {
    task_id: Option<&'a str>,
    destination: Option<&'a str>,
    error: &'a str,
    /// The copy was published but the dead letter is still there.
    published: bool,
}

fn report_json(r: &ReplayReport) -> ReportJson<'_> {
    ReportJson {
        queue: &r.queue,
        looked_at: r.looked_at,
        replayed: r
            .replayed
            .iter()
            .map(|x| ReplayedJson {
                task_id: x.task_id.as_deref(),
                cid: x.cid.as_deref(),
                destination: &x.destination,
                replay_count: x.replay_count,
            })
            .collect(),
        skipped: r.skipped,
        failed: r
            .failed
            .iter()
            .map(|f| FailedJson {
                task_id: f.task_id.as_deref(),
                destination: f.destination.as_deref(),
                error: &f.error,
                published: f.published,
            })
            .collect(),
        interrupted: r.interrupted,
    }
}

fn report_text(r: &ReplayReport) -> String {
    let mut out = String::new();
    let id = |t: &Option<String>| t.clone().unwrap_or_else(|| String::from("(no task id)"));
    for x in &r.replayed {
        let _ = writeln!(
            out,
            "replayed {}  cid {}  -> {}  (x-warren-replayed={})",
            id(&x.task_id),
            x.cid.as_deref().unwrap_or("-"),
            x.destination,
            x.replay_count
        );
    }
    for f in &r.failed {
        let _ = writeln!(
            out,
            "FAILED   {}  -> {}: {}",
            id(&f.task_id),
            f.destination.as_deref().unwrap_or("?"),
            f.error
        );
        if f.published {
            let _ = writeln!(
                out,
                "         (its copy is in {}: replaying the dead letter again would run the \
                 task twice)",
                f.destination.as_deref().unwrap_or("its queue")
            );
        } else {
            let _ = writeln!(out, "         (still a dead letter)");
        }
    }
    if r.interrupted {
        let _ = writeln!(
            out,
            "interrupted: the connection was lost; dead letters not reached are still in {}",
            r.queue
        );
    }
    let _ = write!(out, "replayed {}, skipped {}", r.replayed.len(), r.skipped);
    if !r.failed.is_empty() {
        let _ = write!(out, ", failed {}", r.failed.len());
    }
    let _ = writeln!(out, " (of {} in {})", r.looked_at, r.queue);
    out
}

// ---------------------------------------------------------------------------------------
// formatting

/// A plain-text table: a header line, then one line per row, columns two spaces apart,
/// the last column not padded.
fn table(heads: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = heads.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        let n = widths.len();
        for (i, (c, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            let pad = w.saturating_sub(c.chars().count());
            if right.get(i).copied().unwrap_or(false) {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                if i + 1 < n {
                    s.push_str(&" ".repeat(pad));
                }
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(&mut heads.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// `s` on one line (control characters as spaces), at most `max` characters, with `…`
/// when cut.
fn cut(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        return flat;
    }
    let mut out: String = flat.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// ms since the Unix epoch as UTC: `2026-03-02 14:07:31`, or with `iso`
/// `2026-03-02T14:07:31.123Z`.
fn utc(ms: i64, iso: bool) -> String {
    let secs = ms.div_euclid(1000);
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, sod % 3600 / 60, sod % 60);
    if iso {
        let milli = ms.rem_euclid(1000);
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{milli:03}Z")
    } else {
        format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02}:{ss:02}")
    }
}

/// The proleptic Gregorian date of a day count from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times() {
        assert_eq!(utc(0, false), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400_000, false), "2000-02-29 00:00:00");
        assert_eq!(utc(1_772_460_451_123, true), "2026-03-02T14:07:31.123Z");
        assert_eq!(utc(-1, true), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn cuts_long_text_to_one_line() {
        assert_eq!(cut("short", 10), "short");
        assert_eq!(cut("a\nb", 10), "a b");
        assert_eq!(cut("abcdefghijkl", 5), "abcd…");
        assert_eq!(cut("ééééé", 5), "ééééé");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["#", "NAME", "ERR"],
            &[true, false, false],
            &[
                vec!["1".into(), "a".into(), "x".into()],
                vec!["10".into(), "long".into(), "".into()],
            ],
        );
        assert_eq!(t, " #  NAME  ERR\n 1  a     x\n10  long\n");
    }

    #[test]
    fn replay_needs_ids_or_all() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct T {
            #[command(subcommand)]
            c: DeadCommand,
        }
        assert!(T::try_parse_from(["t", "replay", "svc"]).is_err());
        assert!(T::try_parse_from(["t", "replay", "svc", "--all", "--id", "x"]).is_err());
        assert!(T::try_parse_from(["t", "replay", "svc", "--all"]).is_ok());
        assert!(T::try_parse_from(["t", "replay", "svc", "--id", "a", "--id", "b"]).is_ok());
        assert!(T::try_parse_from(["t", "list"]).is_ok());
    }
}
