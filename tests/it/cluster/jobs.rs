//! A split job and a fan-in through a kill of their part queue's node.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use warren::{Client, FanInOutcome, Parallel, Target, Task};
use warren_core::topology::fanout_queue;

use super::{duplicates, is_idle, runs_by_key, wait_for, Scene};
use crate::common::{self, hook_lines, read_ledger};

/// Distinct parts of job `cid` in the ledger (lines `<cid>/<i> …`).
fn parts_done(ledger: &Path, cid: &str) -> usize {
    let prefix = format!("{cid}/");
    read_ledger(ledger)
        .into_iter()
        .filter(|(k, _, _)| k.starts_with(&prefix))
        .map(|(k, _, _)| k)
        .collect::<HashSet<_>>()
        .len()
}

/// Starts the fixture worker with `concurrency`, recording hooks (in the returned file) and
/// with a 30 s completion window; returns it with its client.
async fn start_with_hooks(
    scene: &Scene,
    concurrency: usize,
) -> (common::FixtureWorker, Client, PathBuf) {
    let hooks = scene.ledger.with_extension("hooks");
    let env = [
        ("FIXTURE_HOOKS", hooks.display().to_string()),
        ("FIXTURE_COMPLETION_WINDOW_MS", "30000".to_owned()),
    ];
    let worker = scene.worker(concurrency, &env).await;
    (worker, scene.client().await, hooks)
}

/// Polls every 100 ms until job `cid`'s hook is in `hooks`, its part queue is gone and the
/// service queue has nothing ready; after `deadline` panics with `stuck(hook fired, part
/// queue gone, service queue idle)`.
async fn wait_job_finished(
    scene: &Scene,
    client: &Client,
    (hooks, cid, part_queue): (&Path, &str, &str),
    deadline: Duration,
    stuck: impl Fn(bool, bool, bool) -> String,
) {
    let broker = client.broker();
    let end = tokio::time::Instant::now() + deadline;
    loop {
        let fired = !hook_lines(hooks, cid).is_empty();
        let gone = matches!(broker.queue_stats(part_queue).await, Ok(None));
        let idle = is_idle(broker, &scene.queue).await;
        if fired && gone && idle {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{}",
            stuck(fired, gone, idle)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_job_through_a_node_kill() {
    const N: u64 = 200;
    let scene = Scene::take("split", "clsplit").await;
    let (svc, ledger) = (&scene.svc, &scene.ledger);
    let (worker, client, hooks) = start_with_hooks(&scene, 8).await;
    let cid = common::unique("job");
    let task = Task::new(
        format!("{svc}.sum"),
        &serde_json::json!({"n": N, "ms": 100}),
    )
    .with_cid(&cid)
    .on_complete(Target::new(svc, "done").unwrap())
    .on_error(Target::new(svc, "failed").unwrap());
    let receipt = client.enqueue(task).await.expect("split job enqueued");
    let part_queue = format!("part.{svc}-sum-{}", receipt.id);

    // Mid-job: a quarter of the parts ran.
    wait_for("a quarter of the parts", Duration::from_secs(120), || {
        parts_done(ledger, &cid) >= N as usize / 4
    })
    .await;
    let home = scene
        .cluster
        .leader_of(&part_queue)
        .await
        .expect("part queue's node");
    let done_before = parts_done(ledger, &cid);
    scene
        .kill(home, || {
            format!(" (the part queue's) after {done_before} parts")
        })
        .await;
    // What the client's broker connection sees of the part queue while its node is down.
    match client.broker().queue_stats(&part_queue).await {
        Ok(s) => eprintln!("[split] passive declare with its node down: Ok({s:?})"),
        Err(e) => eprintln!("[split] passive declare with its node down: Err({e:#})"),
    }
    scene
        .restart(home, async {
            format!("; {} parts done", parts_done(ledger, &cid))
        })
        .await;

    // The hook fires, the part queue goes, the service queue is idle.
    let job = (hooks.as_path(), cid.as_str(), part_queue.as_str());
    wait_job_finished(&scene, &client, job, Duration::from_secs(180), |fired, gone, idle| {
        format!(
            "job {cid} did not finish (hook {fired}, part queue gone {gone}, idle {idle}; {} parts ran)",
            parts_done(ledger, &cid)
        )
    })
    .await;
    assert!(worker.terminate().await, "worker exits cleanly");
    common::cleanup_job(&scene.urls, &part_queue).await;
    client.close().await;
    let fired = hook_lines(&hooks, &cid);
    eprintln!(
        "[split] hooks: {:?}; test took {:?}",
        fired.iter().map(|(m, _)| m).collect::<Vec<_>>(),
        scene.took()
    );
    assert_eq!(fired.len(), 1, "exactly one hook: {fired:?}");
    assert_eq!(fired[0].0, "done", "the job completed: {fired:?}");
    let squares = Value::Array((0..N).map(|i| Value::from(i * i)).collect());
    assert_eq!(fired[0].1, squares, "every result, in part order");
    assert_eq!(parts_done(ledger, &cid), N as usize, "every part ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_in_through_a_node_kill() {
    const N: usize = 100;
    let scene = Scene::take("fanin", "clfanin").await;
    let (svc, ledger) = (&scene.svc, &scene.ledger);
    let (worker, client, hooks) = start_with_hooks(&scene, 4).await;
    let cid = common::unique("cid");
    let work = format!("{svc}.work");
    let mut p = Parallel::new();
    for i in 0..N {
        p = p.target(
            &work,
            &serde_json::json!({"key": format!("k{i}"), "ms": 200}),
        );
    }
    let receipt = client
        .parallel(p.on_final(format!("{svc}.done")).with_cid(&cid))
        .await
        .expect("fan-in sent");
    let part_queue = fanout_queue(&receipt.job);
    let home = scene
        .cluster
        .leader_of(&part_queue)
        .await
        .expect("part queue");
    wait_for("a quarter of the targets", Duration::from_secs(60), || {
        read_ledger(ledger).len() >= N / 4
    })
    .await;
    let before = read_ledger(ledger).len();
    scene
        .kill(home, || {
            format!(" (the fan-in's part queue's) after {before} targets")
        })
        .await;
    scene
        .restart(home, async {
            format!("; {} targets ran", read_ledger(ledger).len())
        })
        .await;

    let job = (hooks.as_path(), cid.as_str(), part_queue.as_str());
    wait_job_finished(&scene, &client, job, Duration::from_secs(180), |fired, gone, idle| {
        format!(
            "fan-in {cid} did not finish (callback {fired}, part queue gone {gone}, idle {idle}; {} targets ran)",
            read_ledger(ledger).len()
        )
    })
    .await;
    assert!(worker.terminate().await, "worker exits cleanly");
    common::cleanup_job(&scene.urls, &part_queue).await;
    client.close().await;
    let runs = runs_by_key(ledger);
    let (dups, unmarked) = duplicates(&runs);
    let lines = hook_lines(&hooks, &cid);
    eprintln!(
        "[fanin] {} targets ran, {dups} re-runs ({} unmarked); {} callbacks; test took {:?}",
        runs.len(),
        unmarked.len(),
        lines.len(),
        scene.took()
    );
    assert_eq!(runs.len(), N, "every target ran");
    assert!(unmarked.is_empty(), "unmarked re-runs: {unmarked:?}");
    assert_eq!(lines.len(), 1, "exactly one final callback: {lines:?}");
    let out: FanInOutcome = serde_json::from_value(lines[0].1.clone()).expect("a FanInOutcome");
    assert!(out.ok, "every target succeeded");
    assert_eq!(out.outcomes.len(), N, "one outcome per target");
    for (i, o) in out.outcomes.iter().enumerate() {
        assert_eq!(o.index as usize, i, "outcomes in target order");
        assert_eq!(o.response, Some(Value::from(format!("k{i}"))), "target {i}");
    }
}
