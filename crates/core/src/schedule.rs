//! Schedules: when a periodic task fires, and what warren keeps on the broker about it.
//!
//! A [`Schedule`] is a cron expression with seconds and an optional time zone, or a fixed
//! interval, plus what to do with ticks missed while no worker carried it ([`Missed`]).
//! Workers register schedules (`WorkerBuilder::schedule` in warren-worker); the worker that
//! holds a schedule's **lease** (an exclusive queue, `warren.sched.<name>.lease`) is its
//! ticker, and each tick is one publish to [`SCHEDULE_EXCHANGE`] that the broker routes both
//! to the target's service queue and to the schedule's **state queue**
//! (`warren.sched.<name>.last`, one message), so the last fired tick and the task it became
//! are stored by the same broker operation. See docs/time.md.
//!
//! This module holds what the worker and the `warren schedules` command share: the spec
//! and its tick arithmetic ([`Compiled`]), the names and arguments of the queues, the headers
//! and [`read_state`].

use std::time::Duration;

use chrono::{DateTime, TimeZone as _, Utc};
use serde::{Deserialize, Serialize};

use crate::amqp::{Broker, HeaderValue};
use crate::config::QueueType;
use crate::names::{check_amqp_len, validate_name, NameError};
use crate::topology::{QueueSpec, PREFIX};

/// The direct exchange ticks and schedule state records are published to: routing key
/// `<name>` for a tick (bound to the target's service queue and the state queue),
/// `<name>:state` for a state record (bound to the state queue only).
pub const SCHEDULE_EXCHANGE: &str = "warren.sched";
/// Header on a tick (and a state record): the schedule's name.
pub const H_SCHEDULE: &str = "x-warren-schedule";
/// Header on a tick: the tick's instant, ms since the Unix epoch (absent on a state record).
pub const H_TICK_MS: &str = "x-warren-tick-ms";
/// Header on a tick and a state record: the schedule's spec as JSON ([`Schedule`]).
pub const H_SCHEDULE_SPEC: &str = "x-warren-schedule-spec";
/// Header on a tick and a state record: the target, `svc.method`.
pub const H_SCHEDULE_TARGET: &str = "x-warren-schedule-target";
/// Shortest interval of [`Schedule::every`].
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Default of [`Schedule::grace`].
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// What a ticker does with ticks that are more than the grace period overdue when it gets to
/// them (every worker carrying the schedule was down, or the lease was changing hands for
/// longer than the grace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Missed {
    /// No task for the missed ticks: the schedule goes on with the first tick that is not
    /// overdue (the default).
    #[default]
    Skip,
    /// One task, for the latest missed tick, however many were missed; then the schedule goes
    /// on.
    RunOnce,
}

impl Missed {
    /// `skip` or `run_once`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::RunOnce => "run_once",
        }
    }
}

/// Why a schedule is refused (reported by `WorkerBuilder::build` before anything is
/// published).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScheduleError {
    /// The cron expression does not parse.
    #[error("invalid cron expression {expr:?}: {reason}")]
    Cron {
        /// The expression.
        expr: String,
        /// What croner says is wrong.
        reason: String,
    },
    /// The time zone is not an IANA name croner's time zone database knows.
    #[error("unknown time zone {0:?} (use an IANA name such as \"Europe/Paris\")")]
    TimeZone(String),
    /// A time zone was given to an interval schedule (intervals do not depend on one).
    #[error("a time zone applies to cron schedules only, not to Schedule::every")]
    TimeZoneOnInterval,
    /// The interval is shorter than [`MIN_INTERVAL`].
    #[error("the interval of Schedule::every must be at least {MIN_INTERVAL:?}, got {0:?}")]
    Interval(Duration),
    /// The cron expression never fires after the given instant.
    #[error("cron expression {0:?} has no future occurrence")]
    NoOccurrence(String),
    /// The schedule's name is not a valid name (`[a-z0-9_.-]`, queue names ≤ 255 bytes).
    #[error("invalid schedule name: {0}")]
    Name(#[from] NameError),
    /// The same schedule name was registered twice on one worker.
    #[error("schedule {0} is registered twice")]
    Duplicate(String),
    /// The payload could not be turned into JSON.
    #[error("the payload of schedule {name} does not serialize: {reason}")]
    Payload {
        /// The schedule.
        name: String,
        /// serde_json's error.
        reason: String,
    },
}

/// When a schedule fires, and what it does with missed ticks. Build with
/// [`Schedule::cron`] or [`Schedule::every`]; nothing is checked until the worker is built
/// (or [`Schedule::compile`] is called).
///
/// ```
/// use std::time::Duration;
/// use warren_core::schedule::{Missed, Schedule};
/// // At second 0 of every 5th minute, Paris time; one catch-up task after an outage.
/// let s = Schedule::cron("0 */5 * * * *").tz("Europe/Paris").missed(Missed::RunOnce);
/// assert!(s.compile().is_ok());
/// // Every 30 s, on the 30 s grid of the Unix epoch.
/// assert!(Schedule::every(Duration::from_secs(30)).compile().is_ok());
/// assert!(Schedule::cron("61 * * * * *").compile().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// The cron expression (5 fields, or 6 with seconds first), if a cron schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// The interval in ms, if an interval schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<u64>,
    /// The IANA time zone a cron expression is read in (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tz: Option<String>,
    /// The missed-tick policy.
    #[serde(default)]
    pub missed: Missed,
    /// How late a tick may fire and still count as on time, in ms.
    #[serde(default = "default_grace_ms")]
    pub grace_ms: u64,
}

fn default_grace_ms() -> u64 {
    ms(DEFAULT_GRACE)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Schedule {
    /// A cron schedule: 6 fields `sec min hour day-of-month month day-of-week`, or the
    /// classic 5 (seconds = 0). croner's syntax: ranges, steps, names, `L`, `#`, `W`,
    /// `@hourly` and the like. Read in UTC unless [`Schedule::tz`] says otherwise.
    pub fn cron(expr: impl Into<String>) -> Self {
        Self {
            cron: Some(expr.into()),
            every_ms: None,
            tz: None,
            missed: Missed::default(),
            grace_ms: default_grace_ms(),
        }
    }

    /// A fixed interval (at least [`MIN_INTERVAL`]). Ticks fall on the interval's grid
    /// counted from the Unix epoch (every 10 s: at :00, :10, :20, ...), so every worker
    /// computes the same instants.
    pub fn every(interval: Duration) -> Self {
        Self {
            cron: None,
            every_ms: Some(ms(interval)),
            tz: None,
            missed: Missed::default(),
            grace_ms: default_grace_ms(),
        }
    }

    /// The IANA time zone the cron expression is read in (`"Europe/Paris"`): 9 o'clock is
    /// 9 o'clock local time, across daylight-saving changes.
    pub fn tz(mut self, tz: impl Into<String>) -> Self {
        self.tz = Some(tz.into());
        self
    }

    /// What to do with ticks missed while no worker carried the schedule (default
    /// [`Missed::Skip`]).
    pub fn missed(mut self, policy: Missed) -> Self {
        self.missed = policy;
        self
    }

    /// How overdue a tick may be and still fire as itself (default 10 s): a ticker that
    /// took over after a failover fires the ticks it finds overdue by less than this, each
    /// once, and applies the [`Missed`] policy only to older ones.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace_ms = ms(grace);
        self
    }

    /// Checks the expression and time zone and prepares the tick arithmetic.
    pub fn compile(&self) -> Result<Compiled, ScheduleError> {
        let kind = match (&self.cron, self.every_ms) {
            (Some(expr), _) => {
                let cron = croner::parser::CronParser::builder()
                    .seconds(croner::parser::Seconds::Optional)
                    .year(croner::parser::Year::Disallowed)
                    .build()
                    .parse(expr)
                    .map_err(|e| ScheduleError::Cron {
                        expr: expr.clone(),
                        reason: e.to_string(),
                    })?;
                let tz = match &self.tz {
                    None => chrono_tz::UTC,
                    Some(name) => name
                        .parse::<chrono_tz::Tz>()
                        .map_err(|_| ScheduleError::TimeZone(name.clone()))?,
                };
                Kind::Cron(Box::new(cron), tz)
            }
            (None, Some(every)) => {
                if self.tz.is_some() {
                    return Err(ScheduleError::TimeZoneOnInterval);
                }
                if every < ms(MIN_INTERVAL) {
                    return Err(ScheduleError::Interval(Duration::from_millis(every)));
                }
                Kind::Every(every)
            }
            (None, None) => {
                return Err(ScheduleError::Cron {
                    expr: String::new(),
                    reason: "neither a cron expression nor an interval".into(),
                })
            }
        };
        let compiled = Compiled {
            spec: self.clone(),
            kind,
        };
        // An expression that matches nothing (say, February 30th) is refused now.
        if compiled.next_after(crate::envelope::now_ms()).is_none() {
            return Err(ScheduleError::NoOccurrence(
                self.cron.clone().unwrap_or_default(),
            ));
        }
        Ok(compiled)
    }

    /// A short human form: `cron "0 */5 * * * *" Europe/Paris` or `every 2s`.
    #[must_use]
    pub fn describe(&self) -> String {
        match (&self.cron, self.every_ms) {
            (Some(c), _) => format!("cron {c:?} {}", self.tz.as_deref().unwrap_or("UTC")),
            (None, Some(e)) => format!(
                "every {}",
                humantime::format_duration(Duration::from_millis(e))
            ),
            (None, None) => String::from("(none)"),
        }
    }
}

#[derive(Debug, Clone)]
enum Kind {
    Cron(Box<croner::Cron>, chrono_tz::Tz),
    Every(u64),
}

/// A checked [`Schedule`]: computes tick instants (ms since the Unix epoch, UTC).
#[derive(Debug, Clone)]
pub struct Compiled {
    spec: Schedule,
    kind: Kind,
}

fn utc(ms: u64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(i64::try_from(ms).ok()?).single()
}

fn to_ms<T: chrono::TimeZone>(t: &DateTime<T>) -> Option<u64> {
    u64::try_from(t.timestamp_millis()).ok()
}

impl Compiled {
    /// The schedule it was compiled from.
    #[must_use]
    pub fn spec(&self) -> &Schedule {
        &self.spec
    }

    /// The grace period ([`Schedule::grace`]) in ms.
    #[must_use]
    pub fn grace_ms(&self) -> u64 {
        self.spec.grace_ms
    }

    /// The first tick strictly after `after_ms`, or `None` if there is none.
    #[must_use]
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        match &self.kind {
            Kind::Every(iv) => (after_ms / iv).checked_add(1)?.checked_mul(*iv),
            Kind::Cron(cron, tz) => {
                // Whole seconds: a tick is never between two seconds.
                let floor = utc(after_ms - after_ms % 1000)?.with_timezone(tz);
                let next = cron.find_next_occurrence(&floor, false).ok()?;
                to_ms(&next)
            }
        }
    }

    /// The last tick at or before `at_ms`, or `None` if there is none.
    #[must_use]
    pub fn last_at_or_before(&self, at_ms: u64) -> Option<u64> {
        match &self.kind {
            Kind::Every(iv) => Some(at_ms / iv * iv),
            Kind::Cron(cron, tz) => {
                let floor = utc(at_ms - at_ms % 1000)?.with_timezone(tz);
                let prev = cron.find_previous_occurrence(&floor, true).ok()?;
                to_ms(&prev)
            }
        }
    }

    /// The next `n` ticks strictly after `after_ms`.
    #[must_use]
    pub fn upcoming(&self, after_ms: u64, n: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(n);
        let mut at = after_ms;
        while out.len() < n {
            match self.next_after(at) {
                Some(t) => {
                    out.push(t);
                    at = t;
                }
                None => break,
            }
        }
        out
    }

    /// What a ticker whose last fired tick is `last` does at `now` (ms): the tick to fire
    /// next, and whether it is a missed tick fired under [`Missed::RunOnce`].
    ///
    /// - The first tick after `last` (after `now` when nothing fired yet), if it is not more
    ///   than the grace overdue: fire it (at once if due, else wait for it).
    /// - Older: ticks were missed. [`Missed::Skip`] jumps to the first tick that is not
    ///   more than the grace overdue; [`Missed::RunOnce`] fires the latest missed tick once
    ///   (then the schedule goes on from it).
    #[must_use]
    pub fn plan(&self, last: Option<u64>, now: u64) -> Option<Plan> {
        let first = self.next_after(last.unwrap_or(now))?;
        let oldest_on_time = now.saturating_sub(self.spec.grace_ms);
        if first >= oldest_on_time {
            return Some(Plan {
                tick: first,
                missed: 0,
            });
        }
        match self.spec.missed {
            Missed::Skip => {
                let tick = self.next_after(oldest_on_time.saturating_sub(1))?;
                Some(Plan {
                    tick,
                    missed: self.count_between(first, tick),
                })
            }
            Missed::RunOnce => {
                let latest_missed = self
                    .last_at_or_before(oldest_on_time.saturating_sub(1))
                    .filter(|t| *t >= first)
                    .unwrap_or(first);
                Some(Plan {
                    tick: latest_missed,
                    missed: self.count_between(first, latest_missed),
                })
            }
        }
    }

    /// Ticks in `[from, to)` (counted up to 100,000, for logs).
    fn count_between(&self, from: u64, to: u64) -> u64 {
        match &self.kind {
            Kind::Every(iv) => to.saturating_sub(from) / iv,
            Kind::Cron(..) => {
                let mut n = 0;
                let mut at = from;
                while at < to && n < 100_000 {
                    n += 1;
                    match self.next_after(at) {
                        Some(t) => at = t,
                        None => break,
                    }
                }
                n
            }
        }
    }
}

/// The next tick a ticker fires ([`Compiled::plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The tick's instant, ms since the Unix epoch.
    pub tick: u64,
    /// How many ticks before it are given up (skipped, or folded into this one by
    /// [`Missed::RunOnce`]).
    pub missed: u64,
}

/// An instant (ms since the Unix epoch) as RFC 3339 UTC with milliseconds.
#[must_use]
pub fn format_ms(ms: u64) -> String {
    utc(ms).map_or_else(
        || ms.to_string(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
}

/// `warren.sched.<name>.lease`: the exclusive queue whose holder is the schedule's ticker.
pub fn lease_queue(name: &str) -> Result<String, NameError> {
    validate_name("schedule", name)?;
    let q = format!("{PREFIX}sched.{name}.lease");
    check_amqp_len("schedule lease queue", &q)?;
    Ok(q)
}

/// `warren.sched.<name>.last`: the schedule's state queue (its last tick, one message).
pub fn state_queue(name: &str) -> Result<String, NameError> {
    validate_name("schedule", name)?;
    let q = format!("{PREFIX}sched.{name}.last");
    check_amqp_len("schedule state queue", &q)?;
    Ok(q)
}

/// The schedule name of a state queue name, if it is one.
#[must_use]
pub fn parse_state_queue(queue: &str) -> Option<&str> {
    queue
        .strip_prefix(PREFIX)?
        .strip_prefix("sched.")?
        .strip_suffix(".last")
        .filter(|n| validate_name("schedule", n).is_ok())
}

/// The routing key of a schedule's state records (`<name>:state`; `:` is not allowed in
/// names, so it never collides with another schedule's tick key).
#[must_use]
pub fn state_key(name: &str) -> String {
    format!("{name}:state")
}

/// The queues a ticker declares, in order: the state queue bound with the tick key and
/// with the state key, and the target service's queues, its service queue also bound to
/// [`SCHEDULE_EXCHANGE`] with the tick key.
pub fn specs(name: &str, svc: &str, qt: QueueType) -> Result<Vec<QueueSpec>, NameError> {
    let state = QueueSpec {
        name: state_queue(name)?,
        durable: true,
        queue_type: Some(qt),
        max_length: Some(1),
        bind: Some((SCHEDULE_EXCHANGE.to_owned(), name.to_owned())),
        ..QueueSpec::default()
    };
    let mut state_records = state.clone();
    state_records.bind = Some((SCHEDULE_EXCHANGE.to_owned(), state_key(name)));
    check_amqp_len("routing key", &state_key(name))?;
    let mut ticks = QueueSpec::service(svc, qt)?;
    ticks.bind = Some((SCHEDULE_EXCHANGE.to_owned(), name.to_owned()));
    Ok(vec![
        state,
        state_records,
        QueueSpec::dead(svc, qt)?,
        QueueSpec::service(svc, qt)?,
        ticks,
    ])
}

/// The task id of a schedule's tick: UUIDv5 of `warren-schedule:<name>:<tick ms>`, the same
/// in every worker, so a tick fired twice (see docs/time.md) has one id.
#[must_use]
pub fn tick_id(name: &str, tick_ms: u64) -> uuid::Uuid {
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_URL,
        format!("warren-schedule:{name}:{tick_ms}").as_bytes(),
    )
}

/// A state record's body (published with the state key before a schedule's first tick).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateRecord {
    /// The schedule's name.
    pub schedule: String,
    /// Its spec.
    pub spec: Schedule,
    /// Its target, `svc.method`.
    pub target: String,
    /// When the record was written, ms since the Unix epoch.
    pub at_ms: u64,
}

/// What the state queue of a schedule says.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScheduleState {
    /// The schedule's name.
    pub name: String,
    /// Its spec, as its ticker last wrote it (`None` if unreadable).
    pub spec: Option<Schedule>,
    /// Its target, `svc.method`.
    pub target: Option<String>,
    /// The last tick fired, ms since the Unix epoch (`None`: none yet).
    pub last_tick_ms: Option<u64>,
    /// The task id of the last tick.
    pub last_task: Option<String>,
}

/// Reads a schedule's state queue (`basic.get` of its message(s), then requeued), or
/// `None` when the queue does not exist. The message is invisible to other readers for the
/// moment it is held. When more than one message is there (a reader held one while a tick
/// arrived), the latest tick wins.
pub async fn read_state(broker: &Broker, name: &str) -> crate::Result<Option<ScheduleState>> {
    let queue = state_queue(name)?;
    let Some(held) = broker.hold(&queue, None).await? else {
        return Ok(None);
    };
    let mut state = ScheduleState {
        name: name.to_owned(),
        spec: None,
        target: None,
        last_tick_ms: None,
        last_task: None,
    };
    for m in &held.messages {
        let tick = m
            .header(H_TICK_MS)
            .and_then(|v| v.as_int())
            .and_then(|t| u64::try_from(t).ok());
        if tick.is_some() && tick <= state.last_tick_ms {
            continue;
        }
        if tick.is_none() && state.last_tick_ms.is_some() {
            continue;
        }
        state.spec = m
            .header(H_SCHEDULE_SPEC)
            .as_ref()
            .and_then(HeaderValue::as_str)
            .and_then(|s| serde_json::from_str(s).ok());
        state.target = m
            .header(H_SCHEDULE_TARGET)
            .as_ref()
            .and_then(HeaderValue::as_str)
            .map(str::to_owned);
        if tick.is_some() {
            state.last_tick_ms = tick;
            state.last_task = m.message_id().map(str::to_owned);
        }
    }
    held.release().await?;
    Ok(Some(state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_on_the_epoch_grid() {
        let c = Schedule::every(Duration::from_secs(2)).compile().unwrap();
        assert_eq!(c.next_after(10_000), Some(12_000));
        assert_eq!(c.next_after(10_001), Some(12_000));
        assert_eq!(c.last_at_or_before(11_999), Some(10_000));
        assert_eq!(c.upcoming(0, 3), vec![2_000, 4_000, 6_000]);
    }

    #[test]
    fn cron_with_seconds_and_time_zone() {
        let c = Schedule::cron("0 0 9 * * *")
            .tz("Europe/Paris")
            .compile()
            .unwrap();
        // 2026-01-15T00:00:00Z → next 09:00 Paris (UTC+1) = 08:00Z.
        let t = 1_768_435_200_000;
        assert_eq!(c.next_after(t), Some(t + 8 * 3_600_000));
        let s = Schedule::cron("*/5 * * * * *").compile().unwrap();
        assert_eq!(s.next_after(t + 500), Some(t + 5_000));
        assert_eq!(s.last_at_or_before(t + 7_000), Some(t + 5_000));
    }

    #[test]
    fn bad_specs_are_typed_errors() {
        assert!(matches!(
            Schedule::cron("not cron").compile(),
            Err(ScheduleError::Cron { .. })
        ));
        assert!(matches!(
            Schedule::cron("0 * * * * *").tz("Mars/Olympus").compile(),
            Err(ScheduleError::TimeZone(_))
        ));
        assert!(matches!(
            Schedule::every(Duration::from_millis(5)).compile(),
            Err(ScheduleError::Interval(_))
        ));
        assert!(matches!(
            Schedule::every(Duration::from_secs(1)).tz("UTC").compile(),
            Err(ScheduleError::TimeZoneOnInterval)
        ));
    }

    #[test]
    fn plans_follow_the_missed_policy() {
        let skip = Schedule::every(Duration::from_secs(2))
            .grace(Duration::from_secs(3))
            .compile()
            .unwrap();
        // On time, or overdue within the grace: the next tick after the last.
        assert_eq!(skip.plan(Some(10_000), 11_000).unwrap().tick, 12_000);
        assert_eq!(skip.plan(Some(10_000), 14_500).unwrap().tick, 12_000);
        // Nothing fired yet: the next tick after now.
        assert_eq!(skip.plan(None, 11_000).unwrap().tick, 12_000);
        // Down from 10 s to 30 s: ticks 12..=26 missed; 28 is within the grace.
        let p = skip.plan(Some(10_000), 30_000).unwrap();
        assert_eq!((p.tick, p.missed), (28_000, 8));
        let once = Schedule::every(Duration::from_secs(2))
            .grace(Duration::from_secs(3))
            .missed(Missed::RunOnce)
            .compile()
            .unwrap();
        let p = once.plan(Some(10_000), 30_000).unwrap();
        assert_eq!((p.tick, p.missed), (26_000, 7));
        // After the run-once tick, the schedule goes on within the grace.
        assert_eq!(once.plan(Some(26_000), 30_000).unwrap().tick, 28_000);
    }

    #[test]
    fn names() {
        assert_eq!(state_queue("a.b").unwrap(), "warren.sched.a.b.last");
        assert_eq!(parse_state_queue("warren.sched.a.b.last"), Some("a.b"));
        assert_eq!(parse_state_queue("warren.svc.x"), None);
        assert!(lease_queue("Bad").is_err());
        assert_eq!(tick_id("a", 1), tick_id("a", 1));
        assert_ne!(tick_id("a", 1), tick_id("a", 2));
    }
}
