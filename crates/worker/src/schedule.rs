//! Schedules carried by workers: each tick becomes exactly one task, however many workers
//! carry the schedule and whichever of them die. There is no scheduler process.
//!
//! - **Lease.** Every worker carrying schedule `S` tries, about once a second, to declare the
//!   exclusive queue `warren.sched.<S>.lease` on its schedule connection
//!   ([`warren_core::Broker::try_lease`]). One connection holds it; its worker is the
//!   ticker. When that worker dies, the broker deletes the queue with its connection and
//!   another worker takes the lease within about a second.
//! - **Tick and state in one publish.** A tick is one mandatory, confirmed publish of the
//!   target's task to `warren.sched` with routing key `S`, on the lease's own channel
//!   ([`warren_core::amqp::Lease::publish`]). The broker routes it to the target's service
//!   queue and to `warren.sched.<S>.last` (one message, oldest dropped): the last fired tick
//!   is stored by the same operation as its task.
//! - **Ticker.** On taking the lease, the ticker reads the last tick from the state queue,
//!   plans the next one ([`warren_core::schedule::Compiled::plan`]: on time, late within
//!   the grace, or missed and handled per [`Missed`]), sleeps until it is due, publishes it,
//!   and goes on. A ticker that dies before its publish reached the broker leaves the state
//!   without that tick, so the next one fires it; one that dies after leaves it in the
//!   state, so it is not fired again.
//!
//! Details, guarantees and their edges: docs/time.md.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use warren_core::amqp::Lease;
use warren_core::envelope::now_ms;
use warren_core::schedule::{
    lease_queue, read_state, specs, state_key, state_queue, tick_id, Compiled, Missed, Schedule,
    ScheduleError, StateRecord, H_SCHEDULE, H_SCHEDULE_SPEC, H_SCHEDULE_TARGET, H_TICK_MS,
    SCHEDULE_EXCHANGE,
};
use warren_core::{Broker, Envelope, Error, HeaderValue, IntoTarget, Outgoing, QueueType, Target};

use crate::WorkerError;

/// How often a worker that does not hold a schedule's lease tries to take it.
const LEASE_RETRY: Duration = Duration::from_secs(1);
/// The longest single sleep while waiting for a tick (the wall clock is read again after
/// each, so a clock step or a long wait never overshoots by more than this).
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// One schedule registered on a worker, checked.
#[derive(Debug)]
pub(crate) struct Registered {
    pub(crate) name: String,
    compiled: Compiled,
    target: Target,
    payload: serde_json::Value,
}

/// Checks a registration: the name, the spec (cron expression, time zone, interval), the
/// target and the payload. Errors are reported by `WorkerBuilder::build`.
pub(crate) fn register(
    name: &str,
    schedule: &Schedule,
    target: impl IntoTarget,
    payload: &impl Serialize,
) -> Result<Registered, WorkerError> {
    lease_queue(name).map_err(ScheduleError::from)?;
    state_queue(name).map_err(ScheduleError::from)?;
    let compiled = schedule.compile()?;
    let target = target.into_target()?;
    let payload = serde_json::to_value(payload).map_err(|e| ScheduleError::Payload {
        name: name.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(Registered {
        name: name.to_owned(),
        compiled,
        target,
        payload,
    })
}

/// The schedules of one worker, and the leases it holds.
#[derive(Debug, Default)]
pub(crate) struct Tickers {
    schedules: Vec<Arc<Registered>>,
    broker: Option<Broker>,
    leases: Option<watch::Sender<BTreeSet<String>>>,
}

impl Tickers {
    pub(crate) fn new(schedules: Vec<Registered>, broker: Option<Broker>) -> Self {
        Self {
            schedules: schedules.into_iter().map(Arc::new).collect(),
            broker,
            leases: Some(watch::Sender::new(BTreeSet::new())),
        }
    }

    /// The state queues of the schedules (durable; the lease queues go with their
    /// connection).
    pub(crate) fn queue_names(&self) -> Vec<String> {
        self.schedules
            .iter()
            .filter_map(|s| state_queue(&s.name).ok())
            .collect()
    }

    /// Names of the schedules whose lease this worker holds, as they change.
    pub(crate) fn leases(&self) -> watch::Receiver<BTreeSet<String>> {
        match &self.leases {
            Some(tx) => tx.subscribe(),
            None => watch::Sender::new(BTreeSet::new()).subscribe(),
        }
    }

    /// Starts one ticker task per schedule; they stop when `stop` is cancelled.
    pub(crate) fn start(&self, stop: &CancellationToken) -> JoinSet<()> {
        let mut set = JoinSet::new();
        let (Some(broker), Some(leases)) = (&self.broker, &self.leases) else {
            return set;
        };
        let qt = broker.config().queue_type;
        for s in &self.schedules {
            set.spawn(run(
                broker.clone(),
                s.clone(),
                qt,
                leases.clone(),
                stop.clone(),
            ));
        }
        set
    }

    /// Closes the schedule connection (after the tickers stopped).
    pub(crate) async fn close(&self) {
        if let Some(b) = &self.broker {
            b.close().await;
        }
    }
}

/// One schedule's loop: take the lease when it is free, tick while holding it, give it up
/// on shutdown or when ticking fails.
async fn run(
    broker: Broker,
    reg: Arc<Registered>,
    qt: QueueType,
    leases: watch::Sender<BTreeSet<String>>,
    stop: CancellationToken,
) {
    let name = reg.name.as_str();
    let Ok(lease_q) = lease_queue(name) else {
        return;
    };
    let mut pauses = backon::ConstantBuilder::default()
        .with_delay(LEASE_RETRY)
        .with_jitter()
        .without_max_times()
        .build();
    while !stop.is_cancelled() {
        match broker.try_lease(&lease_q).await {
            Ok(Some(lease)) => {
                tracing::info!(
                    schedule = name,
                    "schedule lease taken: this worker ticks it"
                );
                leases.send_modify(|s| {
                    s.insert(name.to_owned());
                });
                let res = tick_while_held(&lease, &reg, qt, &stop).await;
                leases.send_modify(|s| {
                    s.remove(name);
                });
                lease.release().await;
                match res {
                    Ok(()) => tracing::info!(schedule = name, "schedule lease given up"),
                    Err(e) => tracing::warn!(
                        schedule = name,
                        error = %e,
                        "schedule ticking stopped; lease given up (the next holder goes on from the last stored tick)"
                    ),
                }
            }
            Ok(None) => tracing::trace!(schedule = name, "schedule lease held elsewhere"),
            Err(e) => {
                tracing::debug!(schedule = name, error = %e, "could not try the schedule lease")
            }
        }
        let pause = pauses.next().unwrap_or(LEASE_RETRY);
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// Ticks while the lease is held: `Ok` on shutdown, `Err` when a publish or declaration
/// failed (the lease is then given up, and whoever takes it reads the stored state).
async fn tick_while_held(
    lease: &Lease,
    reg: &Registered,
    qt: QueueType,
    stop: &CancellationToken,
) -> Result<(), Error> {
    let name = reg.name.as_str();
    let broker = lease.broker();
    let mut queues = specs(name, reg.target.service(), qt)?;
    // The target service's queue, declared with its priority range if it has one
    // (docs/flow.md#priorities), or the broker would refuse the declaration.
    let svc_queue = warren_core::topology::service_queue(reg.target.service())?;
    for q in queues.iter_mut().filter(|q| q.name == svc_queue) {
        q.max_priority = broker.config().max_priority(reg.target.service());
    }
    broker.declare_direct_exchange(SCHEDULE_EXCHANGE).await?;
    broker.declare(&queues).await?;
    let spec_json = serde_json::to_string(reg.compiled.spec())?;
    let mut last = read_state(broker, name).await?.and_then(|s| s.last_tick_ms);
    if last.is_none() {
        // So `warren schedules` shows the schedule before its first tick. Only when no
        // tick is stored: the state queue keeps one message, and this would replace it.
        let record = StateRecord {
            schedule: name.to_owned(),
            spec: reg.compiled.spec().clone(),
            target: reg.target.to_string(),
            at_ms: now_ms(),
        };
        let mut msg = Outgoing::new(
            SCHEDULE_EXCHANGE,
            state_key(name),
            serde_json::to_vec(&record)?,
        );
        msg.headers = headers(reg, &spec_json, None);
        lease.publish(&msg).await?;
    }
    tracing::debug!(schedule = name, last_tick_ms = ?last, "schedule state read");
    loop {
        let Some(plan) = reg.compiled.plan(last, now_ms()) else {
            tracing::warn!(
                schedule = name,
                "the schedule has no future tick; holding the lease idle"
            );
            stop.cancelled().await;
            return Ok(());
        };
        if plan.missed > 0 {
            tracing::info!(
                schedule = name,
                missed = plan.missed,
                policy = reg.compiled.spec().missed.as_str(),
                tick_ms = plan.tick,
                "ticks were missed while no worker carried the schedule"
            );
        }
        loop {
            let now = now_ms();
            if plan.tick <= now {
                break;
            }
            let wait = Duration::from_millis(plan.tick - now).min(MAX_SLEEP);
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = tokio::time::sleep(wait) => {}
            }
        }
        let msg = tick_message(reg, plan.tick, &spec_json)?;
        match lease.publish(&msg).await {
            Ok(()) => {}
            Err(Error::Unroutable { .. }) => {
                // Every bound queue is gone (deleted by hand): declare them, then try once more.
                broker.declare(&queues).await?;
                lease.publish(&msg).await?;
            }
            Err(e) => return Err(e),
        }
        tracing::debug!(
            schedule = name,
            tick_ms = plan.tick,
            late_ms = now_ms().saturating_sub(plan.tick),
            run_once = reg.compiled.spec().missed == Missed::RunOnce && plan.missed > 0,
            "schedule ticked"
        );
        last = Some(plan.tick);
    }
}

fn headers(reg: &Registered, spec_json: &str, tick: Option<u64>) -> Vec<(String, HeaderValue)> {
    let mut h = vec![
        (H_SCHEDULE.to_owned(), HeaderValue::Str(reg.name.clone())),
        (
            H_SCHEDULE_SPEC.to_owned(),
            HeaderValue::Str(spec_json.to_owned()),
        ),
        (
            H_SCHEDULE_TARGET.to_owned(),
            HeaderValue::Str(reg.target.to_string()),
        ),
    ];
    if let Some(t) = tick {
        h.push((
            H_TICK_MS.to_owned(),
            HeaderValue::Int(i64::try_from(t).unwrap_or(i64::MAX)),
        ));
    }
    h
}

/// The task a tick becomes: an ordinary envelope for the target, whose id is derived from
/// the schedule and the tick ([`tick_id`]) and whose cid is `schedule-<name>-<tick ms>`.
fn tick_message(reg: &Registered, tick: u64, spec_json: &str) -> Result<Outgoing, Error> {
    let id = tick_id(&reg.name, tick);
    let cid = format!("schedule-{}-{tick}", reg.name);
    let cid = if cid.len() <= 255 {
        cid
    } else {
        id.to_string()
    };
    let mut env = Envelope::new(&reg.target, reg.payload.clone(), Some(cid));
    env.id = id;
    let mut msg = Outgoing::new(SCHEDULE_EXCHANGE, reg.name.clone(), env.to_bytes()?);
    msg.message_id = Some(env.id.to_string());
    msg.correlation_id = Some(env.cid.clone());
    msg.headers = headers(reg, spec_json, Some(tick));
    Ok(msg)
}
