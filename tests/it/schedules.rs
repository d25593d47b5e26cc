//! Schedules (docs/time.md#schedules): each tick becomes exactly one task, however many
//! workers carry the schedule and whichever of them die; missed ticks follow the
//! schedule's policy; an invalid spec fails `build()` and publishes nothing.
//!
//! The ledger is the target's service queue itself: no worker consumes it, so after the
//! workers stopped it holds exactly the tasks the schedule fired, each with its tick instant
//! in the `x-warren-tick-ms` header.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{config, ledger_path, poll, unique, Cleanup, FixtureWorker};
use warren::{Missed, QueueType, Schedule, ScheduleError, Service, TaskError, Worker, WorkerError};
use warren_core::envelope::now_ms;
use warren_core::schedule::{read_state, state_queue, tick_id, H_TICK_MS};
use warren_core::Broker;

/// Deletes a schedule's state queue when dropped (its lease queue goes with its holder's
/// connection; the target's queues go with `Cleanup`).
struct DropState(String);

impl Drop for DropState {
    fn drop(&mut self) {
        let name = self.0.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    if let Ok(b) = Broker::connect(config(QueueType::Classic)).await {
                        let _ = b.delete_queue(&state_queue(&name).unwrap()).await;
                        b.close().await;
                    }
                });
            }
        })
        .join();
    }
}

/// Tick instants of the tasks in `svc`'s queue, with how many tasks carry each, after
/// checking every task's id is the tick's id.
async fn ticks_in_queue(broker: &Broker, name: &str, svc: &str) -> BTreeMap<u64, usize> {
    let held = broker
        .hold(&format!("warren.svc.{svc}"), None)
        .await
        .expect("read the target queue")
        .expect("the target queue exists");
    let mut ticks = BTreeMap::new();
    for m in &held.messages {
        let tick = m
            .header(H_TICK_MS)
            .and_then(|v| v.as_int())
            .and_then(|t| u64::try_from(t).ok())
            .expect("every tick task carries x-warren-tick-ms");
        assert_eq!(
            m.message_id(),
            Some(tick_id(name, tick).to_string().as_str()),
            "a tick's task id is derived from the schedule and the tick"
        );
        let env: serde_json::Value = serde_json::from_slice(&m.body).expect("JSON envelope");
        assert!(
            env["payload"]["from"].is_string(),
            "the schedule's payload: {env}"
        );
        *ticks.entry(tick).or_insert(0) += 1;
    }
    held.release().await.expect("release");
    ticks
}

async fn ready(broker: &Broker, svc: &str) -> u32 {
    broker
        .queue_stats(&format!("warren.svc.{svc}"))
        .await
        .expect("queue check")
        .map_or(0, |s| s.ready)
}

/// The pid that holds the lease according to the fixtures' lease file, if any: the last
/// `taken` line not followed by a `released` of the same pid.
fn holder(path: &std::path::Path) -> Option<i32> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut holder = None;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (pid, what) = (it.next()?.parse::<i32>().ok()?, it.next()?);
        match what {
            "taken" => holder = Some(pid),
            "released" if holder == Some(pid) => holder = None,
            _ => {}
        }
    }
    holder
}

fn taken_count(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" taken "))
        .count()
}

/// One schedule every 2 s carried by 3 worker processes, for at least 30 ticks, while the
/// worker that fires the ticks is SIGKILLed three times (and replaced). Every tick from the
/// first to the last is fired exactly once: no duplicates and no gaps (a failover takes
/// about a second, within the schedule's 10 s grace, so late ticks still fire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_under_kills_fires_every_tick_exactly_once() {
    let url = common::url();
    let (svc, target, name) = (unique("schedw"), unique("schedt"), unique("sched"));
    let _cleanup = Cleanup::new(&[&svc, &target]);
    let _state = DropState(name.clone());
    let ledger = ledger_path("sched");
    let leases = ledger.with_extension("leases");
    let env = vec![
        ("FIXTURE_SCHEDULE", name.clone()),
        ("FIXTURE_SCHEDULE_EVERY_MS", "2000".to_owned()),
        ("FIXTURE_SCHEDULE_TARGET", format!("{target}.tick")),
        ("FIXTURE_LEASES", leases.display().to_string()),
    ];
    let start = || FixtureWorker::start_with(&url, &svc, QueueType::Quorum, &ledger, 2, &env);
    let mut workers = vec![start().await, start().await, start().await];
    let broker = Broker::connect(config(QueueType::Quorum)).await.unwrap();
    poll("the first ticks", Duration::from_secs(30), || async {
        (ready(&broker, &target).await >= 2).then_some(())
    })
    .await;
    const KILLS: usize = 3;
    for kill in 1..=KILLS {
        let pid = poll("a lease holder", Duration::from_secs(30), || async {
            holder(&leases).filter(|p| workers.iter().any(|w| w.pid() == *p))
        })
        .await;
        let before = ready(&broker, &target).await;
        let taken = taken_count(&leases);
        let at = workers.iter().position(|w| w.pid() == pid).unwrap();
        workers.remove(at).kill9().await;
        eprintln!("kill {kill}: SIGKILLed the ticker (pid {pid}) after {before} ticks");
        workers.push(start().await);
        // Another worker takes the lease, and ticks go on.
        poll("a new lease holder", Duration::from_secs(30), || async {
            (taken_count(&leases) > taken).then_some(())
        })
        .await;
        poll(
            "ticks after the failover",
            Duration::from_secs(30),
            || async { (ready(&broker, &target).await >= before + 3).then_some(()) },
        )
        .await;
    }
    poll("30 ticks", Duration::from_secs(120), || async {
        (ready(&broker, &target).await >= 31).then_some(())
    })
    .await;
    for w in workers {
        assert!(w.terminate().await, "worker exits cleanly");
    }
    let ticks = ticks_in_queue(&broker, &name, &target).await;
    let dups: Vec<_> = ticks.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "ticks fired more than once: {dups:?}");
    let instants: Vec<u64> = ticks.keys().copied().collect();
    let gaps: Vec<_> = instants
        .windows(2)
        .filter(|w| w[1] - w[0] != 2000)
        .map(|w| (w[0], w[1]))
        .collect();
    assert!(gaps.is_empty(), "ticks missing between: {gaps:?}");
    assert!(instants.len() >= 30, "{} ticks", instants.len());
    let state = read_state(&broker, &name).await.unwrap().unwrap();
    assert_eq!(state.last_tick_ms, instants.last().copied());
    eprintln!(
        "schedule ledger: {} ticks fired ({}..={}), {KILLS} ticker kills, {} lease takeovers, 0 duplicates, 0 gaps",
        instants.len(),
        instants[0],
        instants[instants.len() - 1],
        taken_count(&leases)
    );
    broker.close().await;
}

fn schedule_worker(name: &str, target: &str, missed: Missed) -> warren::WorkerBuilder {
    Worker::builder().amqp(config(QueueType::Quorum)).schedule(
        name,
        Schedule::every(Duration::from_secs(2))
            .missed(missed)
            .grace(Duration::ZERO),
        format!("{target}.tick"),
        &serde_json::json!({"from": "test"}),
    )
}

/// Every worker down across several ticks: `skip` fires no task for them, `run_once` fires
/// exactly one (for the latest), and both go on from there.
async fn missed_ticks(missed: Missed) {
    let (target, name) = (unique("missedt"), unique("missed"));
    let _cleanup = Cleanup::new(&[&target]);
    let _state = DropState(name.clone());
    let broker = Broker::connect(config(QueueType::Quorum)).await.unwrap();
    let run = common::run_in_background(
        schedule_worker(&name, &target, missed)
            .build()
            .await
            .unwrap(),
    );
    poll("3 ticks", Duration::from_secs(30), || async {
        (ready(&broker, &target).await >= 3).then_some(())
    })
    .await;
    run.stop.cancel();
    run.handle.await.unwrap().unwrap();
    let state = read_state(&broker, &name).await.unwrap().unwrap();
    let last = state
        .last_tick_ms
        .unwrap_or_else(|| panic!("the state queue holds the last tick: {state:?}"));
    // Every worker stays down for 4 ticks or more; the new one starts early in a 2 s
    // period, so it plans (and a run-once fires) the latest missed tick in that period.
    loop {
        let now = now_ms();
        if now >= last + 8_000 && now % 2000 < 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fired_before = ready(&broker, &target).await;
    let restart = now_ms();
    let run = common::run_in_background(
        schedule_worker(&name, &target, missed)
            .build()
            .await
            .unwrap(),
    );
    poll(
        "2 ticks after the restart",
        Duration::from_secs(30),
        || async {
            let n = ready(&broker, &target).await;
            (n >= fired_before + 2 && now_ms() > restart + 4_500).then_some(())
        },
    )
    .await;
    run.stop.cancel();
    run.handle.await.unwrap().unwrap();
    let ticks = ticks_in_queue(&broker, &name, &target).await;
    assert!(ticks.values().all(|n| *n == 1), "duplicates: {ticks:?}");
    let during: Vec<u64> = ticks
        .keys()
        .copied()
        .filter(|t| *t > last && *t < restart)
        .collect();
    let after: Vec<u64> = ticks.keys().copied().filter(|t| *t >= restart).collect();
    match missed {
        Missed::Skip => assert!(during.is_empty(), "skip fired missed ticks {during:?}"),
        Missed::RunOnce => {
            assert_eq!(
                during.len(),
                1,
                "run_once fires one missed tick: {during:?}"
            );
            assert!(
                during[0] >= restart - 2000,
                "the latest missed tick: {during:?}"
            );
        }
    }
    assert!(!after.is_empty(), "the schedule goes on: {after:?}");
    assert!(after.windows(2).all(|w| w[1] - w[0] == 2000), "{after:?}");
    eprintln!(
        "missed ticks ({}): last {last}, down until {restart}, fired for the gap {during:?}, then {after:?}",
        missed.as_str()
    );
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_ticks_are_skipped_under_skip() {
    missed_ticks(Missed::Skip).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_ticks_fire_once_under_run_once() {
    missed_ticks(Missed::RunOnce).await;
}

/// An invalid cron expression, time zone or interval, or a name given twice: a typed error
/// from `build()`, and nothing on the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_schedules_fail_build_and_publish_nothing() {
    let (svc, name) = (unique("badsched"), unique("badsched"));
    let _cleanup = Cleanup::new(&[&svc]);
    let service = || {
        Service::new(&svc).method("tick", |_: warren::Context, _: serde_json::Value| async {
            Ok::<_, TaskError>(())
        })
    };
    let target = format!("{svc}.tick");
    let build = |s: Schedule| {
        Worker::builder()
            .amqp(config(QueueType::Quorum))
            .service(service())
            .schedule(&name, s, target.as_str(), &1)
            .build()
    };
    let err = build(Schedule::cron("0 61 * * * *")).await.unwrap_err();
    assert!(
        matches!(err, WorkerError::Schedule(ScheduleError::Cron { .. })),
        "{err}"
    );
    let err = build(Schedule::cron("0 0 9 * * *").tz("Europe/Pariss"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, WorkerError::Schedule(ScheduleError::TimeZone(tz)) if tz == "Europe/Pariss"),
        "{err}"
    );
    let err = build(Schedule::every(Duration::from_millis(1)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, WorkerError::Schedule(ScheduleError::Interval(_))),
        "{err}"
    );
    let every = || Schedule::every(Duration::from_secs(1));
    let err = Worker::builder()
        .amqp(config(QueueType::Quorum))
        .service(service())
        .schedule(&name, every(), target.as_str(), &1)
        .schedule(&name, every(), target.as_str(), &1)
        .schedule("Bad Name", every(), target.as_str(), &1)
        .schedule("ok", every(), "no-method", &1)
        .build()
        .await
        .unwrap_err();
    let WorkerError::Registration(all) = &err else {
        panic!("several errors are reported together: {err}");
    };
    assert_eq!(all.len(), 3, "{err}");
    assert!(
        matches!(&all[0], WorkerError::Schedule(ScheduleError::Duplicate(n)) if *n == name),
        "{err}"
    );
    assert!(
        matches!(all[1], WorkerError::Schedule(ScheduleError::Name(_))),
        "{err}"
    );
    assert!(matches!(all[2], WorkerError::Name(_)), "{err}");
    // Nothing was declared or published: no state queue, no target queue.
    let broker = Broker::connect(config(QueueType::Quorum)).await.unwrap();
    assert_eq!(
        broker
            .queue_stats(&state_queue(&name).unwrap())
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        broker
            .queue_stats(&format!("warren.svc.{svc}"))
            .await
            .unwrap(),
        None
    );
    broker.close().await;
}
