//! warren-admin against a private RabbitMQ node with the management plugin
//! (`support::mgmt_node`, started once for the test binary): the management API client, the
//! queue listing the CLI prints (`warren queues|topics|dead list`), and the views the web
//! admin serves, with exact counts after a known workload.
//!
//! The API's counts lag (the node collects statistics every 500 ms here, 5 s by default):
//! every check polls until the expected figures appear, with a deadline.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use warren::testing::TestWorker;
use warren::{Context, Message, QueueType, RetryPolicy, Service, Task, TaskError, Worker};
use warren_admin::queues::{warren_queues, QueueKind, Source};
use warren_admin::views::{ChainView, JobView};
use warren_admin::{Admin, ManagementClient, MgmtError};
use warren_core::{Broker, Publisher};

use crate::common::{config_for, poll, unique};
use crate::support::mgmt_node::MgmtNode;

const DEADLINE: Duration = Duration::from_secs(30);

/// A worker on the management node: `<svc>.work` fails for good on odd numbers (dead
/// letter, no retries) and records the even ones; `<svc>.got` subscribes to `topic`.
async fn start_worker(
    node: &MgmtNode,
    svc: &str,
    topic: &str,
) -> (TestWorker, Arc<Mutex<Vec<u64>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let got = seen.clone();
    let service = Service::new(svc)
        .method("work", move |_: Context, n: u64| {
            let got = got.clone();
            async move {
                if n % 2 == 1 {
                    return Err(TaskError::reject(format!("odd {n}")));
                }
                got.lock().unwrap().push(n);
                Ok::<_, TaskError>(n)
            }
        })
        .method("got", |_: Context, _: serde_json::Value| async move {
            Ok::<_, TaskError>(())
        })
        .subscribe(topic, "got")
        .retry(RetryPolicy::none());
    let worker = TestWorker::start(
        Worker::builder()
            .amqp(config_for(&node.amqp_url(), QueueType::Quorum))
            .service(service),
    )
    .await
    .expect("worker starts on the management node");
    (worker, seen)
}

fn mgmt(node: &MgmtNode) -> ManagementClient {
    ManagementClient::new(node.management_url()).expect("management URL parses")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_count_exactly_what_a_workload_left() {
    let node = MgmtNode::shared().await;
    let svc = unique("adm-list");
    let topic = unique("adm-topic");
    let (worker, seen) = start_worker(node, &svc, &topic).await;
    let client = worker.client().clone();
    for n in 0..6u64 {
        client
            .enqueue(Task::new(format!("{svc}.work"), &n))
            .await
            .expect("enqueue");
    }
    for i in 0..4u64 {
        client
            .publish(Message::new(&topic, &i))
            .await
            .expect("publish");
    }
    // 0, 2, 4 succeed; 1, 3, 5 are dead letters.
    poll("three tasks handled", DEADLINE, || {
        let seen = seen.clone();
        async move { (seen.lock().unwrap().len() == 3).then_some(()) }
    })
    .await;
    let m = mgmt(node);
    let overview = m.overview().await.expect("overview");
    assert!(
        overview
            .rabbitmq_version
            .as_deref()
            .is_some_and(|v| !v.is_empty()),
        "{overview:?}"
    );
    let listing = poll(
        "the API to count 3 dead letters and 1 consumer",
        DEADLINE,
        || {
            let m = m.clone();
            let svc = svc.clone();
            async move {
                let l = warren_queues(Some(&m), "/", false).await.ok()?;
                let q = |name: String| l.queues.iter().find(|q| q.name == name).cloned();
                let dead = q(format!("warren.dead.{svc}"))?;
                let work = q(format!("warren.svc.{svc}"))?;
                (dead.ready == Some(3) && work.consumers == Some(1) && work.ready == Some(0))
                    .then_some(l)
            }
        },
    )
    .await;
    assert_eq!(listing.source, Source::Management);
    let mine: Vec<&str> = listing
        .queues
        .iter()
        .map(|q| q.name.as_str())
        .filter(|n| n.contains(&svc))
        .collect();
    assert!(
        mine.contains(&format!("warren.svc.{svc}").as_str()),
        "{mine:?}"
    );
    assert!(
        mine.contains(&format!("warren.sub.{topic}:{svc}:got").as_str()),
        "{mine:?}"
    );
    let work = listing
        .queues
        .iter()
        .find(|q| q.name == format!("warren.svc.{svc}"))
        .expect("work queue");
    assert_eq!(work.kind.as_deref(), Some("quorum"));
    assert!(work.publish_rate.is_some(), "the API reports rates");

    // The views the web admin and the CLI show.
    let broker = Broker::connect(config_for(&node.amqp_url(), QueueType::Quorum))
        .await
        .expect("broker");
    let admin = Admin::new(broker.clone(), Some(m.clone()), None, false)
        .await
        .expect("admin");
    let ov = poll(
        "the overview to show the service and its worker",
        DEADLINE,
        || {
            let admin = admin.clone();
            let svc = svc.clone();
            async move {
                let ov = admin.overview().await.ok()?;
                let s = ov.services.iter().find(|s| s.name == svc)?;
                let w = ov
                    .workers
                    .as_ref()?
                    .iter()
                    .find(|w| w.services.contains(&svc))?;
                (s.dead == Some(3)
                    && s.consumers == Some(1)
                    && s.subscriptions == 1
                    && w.consumers >= 2)
                    .then(|| ov.clone())
            }
        },
    )
    .await;
    assert!(ov
        .broker
        .management_url
        .as_deref()
        .is_some_and(|u| !u.contains("guest")));
    let topics = admin.topics().await.expect("topics");
    let t = topics.iter().find(|t| t.topic == topic).expect("our topic");
    assert_eq!(t.recent, Some(4));
    assert_eq!(t.subscribers.len(), 1);
    assert_eq!(t.subscribers[0].target, format!("{svc}.got"));
    assert_eq!(t.subscribers[0].dead, Some(3));
    let peek = admin
        .peek(&topic, 2)
        .await
        .expect("peek")
        .expect("topic exists");
    assert_eq!(peek.total, 4);
    let payloads: Vec<_> = peek.messages.iter().map(|m| m.payload.clone()).collect();
    assert_eq!(payloads, [serde_json::json!(2), serde_json::json!(3)]);

    let view = admin.service(&svc).await.expect("service view");
    assert_eq!(view.dead_total, 3);
    let ids: Vec<_> = view
        .dead_letters
        .iter()
        .map(|d| d.body["payload"].clone())
        .collect();
    assert_eq!(
        ids,
        [
            serde_json::json!(1),
            serde_json::json!(3),
            serde_json::json!(5)
        ]
    );
    assert_eq!(view.methods.len(), 1);
    assert_eq!(view.methods[0].method, "work");
    assert_eq!(view.methods[0].dead, 3);
    assert_eq!(view.methods[0].reasons.get("rejected"), Some(&3));
    assert_eq!(view.methods[0].last_error.as_deref(), Some("odd 5"));

    // Replay one by id with the handler still refusing odd numbers: it dies again (a new
    // dead letter, marked replayed once), the others stay.
    let first = view.dead_letters[0].task_id.clone().expect("task id");
    let report = admin
        .replay(
            &svc,
            &warren_ops::ReplaySelection::Ids(vec![first.clone()]),
            &|_, _| {},
        )
        .await
        .expect("replay");
    assert_eq!(report.replayed.len(), 1);
    let again = poll("the replayed task to die again", DEADLINE, || {
        let admin = admin.clone();
        let svc = svc.clone();
        let first = first.clone();
        async move {
            let v = admin.service(&svc).await.ok()?;
            v.dead_letters
                .iter()
                .find(|d| d.task_id.as_deref() == Some(first.as_str()) && d.replayed == 1)
                .map(|_| v.clone())
        }
    })
    .await;
    assert_eq!(again.dead_total, 3);

    // Purge the dead letters: exactly three removed, none left.
    let purged = admin
        .purge(&svc, warren_admin::views::PurgeTarget::Dead)
        .await
        .expect("purge");
    assert_eq!(purged.removed, 3);
    assert_eq!(admin.service(&svc).await.expect("view").dead_total, 0);
    broker.close().await;
    worker.stop().await.expect("worker stops");
    // The recent-messages queue is not the worker's: delete it.
    let b = Broker::connect(config_for(&node.amqp_url(), QueueType::Quorum))
        .await
        .expect("broker");
    let _ = b.delete_queue(&format!("warren.topic.{topic}")).await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_in_flight_are_found_by_their_part_queues() {
    let node = MgmtNode::shared().await;
    let svc = unique("adm-jobs");
    // A split job whose parts nobody runs: its part queue holds the results published by
    // hand (two of three), as a job waiting for its last part would.
    let broker = Broker::connect(config_for(&node.amqp_url(), QueueType::Quorum))
        .await
        .expect("broker");
    broker
        .declare(&[
            warren_core::topology::QueueSpec::service(&svc, QueueType::Quorum).expect("spec"),
        ])
        .await
        .expect("declare service queue");
    let id = uuid::Uuid::now_v7();
    let part_q = warren_core::topology::part_queue(&svc, "sum", &id).expect("name");
    broker
        .declare(&[warren_core::topology::QueueSpec::part(&part_q, 60_000).expect("spec")])
        .await
        .expect("declare part queue");
    let publisher = Publisher::new(broker.clone(), 1);
    for part in 0..2 {
        let msg = warren_core::Outgoing::new(
            "",
            part_q.clone(),
            serde_json::to_vec(&serde_json::json!({"part_id": part, "ok": part})).unwrap(),
        );
        publisher.publish(&msg).await.expect("publish a result");
    }
    let admin = Admin::new(broker.clone(), Some(mgmt(node)), None, false)
        .await
        .expect("admin");
    let jobs = poll("the job with 2 parts in", DEADLINE, || {
        let admin = admin.clone();
        let part_q = part_q.clone();
        async move {
            let j = admin.jobs().await.ok()?;
            j.split_jobs
                .iter()
                .any(|x| x.queue == part_q && x.parts_in == Some(2))
                .then_some(j)
        }
    })
    .await;
    let job = jobs
        .split_jobs
        .iter()
        .find(|x| x.queue == part_q)
        .expect("job");
    assert_eq!(job.service.as_deref(), Some(svc.as_str()));
    assert_eq!(job.target, Some(format!("{svc}.sum")));
    assert_eq!(job.id, id.to_string());
    assert_eq!(job.parts_total, None, "no status store: total unknown");
    assert!(!job.joining);
    assert!(matches!(
        warren_admin::queues::classify(&part_q),
        QueueKind::SplitJob { .. }
    ));
    broker
        .delete_queue(&part_q)
        .await
        .expect("delete part queue");
    broker
        .delete_queue(&format!("warren.svc.{svc}"))
        .await
        .expect("delete service queue");
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_say_whether_retrying_helps_and_hide_credentials() {
    let node = MgmtNode::shared().await;
    let good = node.management_url().to_owned();
    let bad = good.replace("guest:guest", "guest:not-the-Secret-pw");
    let e = ManagementClient::new(&bad)
        .expect("parses")
        .overview()
        .await
        .expect_err("wrong password");
    assert!(
        matches!(e, MgmtError::Unauthorized { status: 401, .. }),
        "{e:?}"
    );
    assert!(!e.is_transient());
    assert!(!e.to_string().contains("not-the-Secret-pw"), "{e}");
    assert!(!format!("{e:?}").contains("not-the-Secret-pw"), "{e:?}");

    // Nothing listens on port 1.
    let e = ManagementClient::new("http://ops:not-the-Secret-pw@127.0.0.1:1")
        .expect("parses")
        .queues("/")
        .await
        .expect_err("unreachable");
    assert!(matches!(e, MgmtError::Unreachable { .. }), "{e:?}");
    assert!(e.is_transient());
    assert!(!e.to_string().contains("not-the-Secret-pw"), "{e}");

    // A queue that does not exist.
    let m = ManagementClient::new(&good).expect("parses");
    assert_eq!(m.queue("/", &unique("nope")).await.expect("answers"), None);

    // Discovery: an explicit URL wins; without one, the AMQP host's port 15672 is probed,
    // and the shared node has no management plugin (never enabled there): no client.
    let found = ManagementClient::discover(
        Some(&good),
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        Duration::from_secs(1),
    )
    .await
    .expect("explicit");
    assert!(found.is_some_and(|c| !c.url().contains("guest")));
}

// ---- what the status store adds to the views: chains in flight, fan-in totals, methods
// that never failed, children apart from hooks ----

/// A status store under a prefix of its own (removed by [`drop_store`]).
fn test_store(prefix: &str) -> Arc<dyn warren::StatusStore> {
    Arc::new(
        warren::RedisStore::new(&crate::cancel_common::redis_url(), Duration::from_secs(600))
            .expect("redis URL")
            .with_prefix(prefix.to_owned()),
    )
}

/// Asserts that every key the test left under `prefix` expires by itself (a bounded
/// lifetime), then removes them.
async fn drop_store(prefix: &str) {
    let mut c = crate::cancel_common::redis().await;
    let keys = crate::cancel_common::keys(prefix).await;
    for k in &keys {
        let ttl: i64 = redis::cmd("TTL").arg(k).query_async(&mut c).await.unwrap();
        // -2: expired in between.
        assert!(ttl > 0 || ttl == -2, "{k} has no expiry (TTL {ttl})");
    }
    crate::cancel_common::drop_keys(prefix).await;
}

/// A gate handlers wait on until the test opens it.
fn gate() -> (
    tokio::sync::watch::Sender<bool>,
    tokio::sync::watch::Receiver<bool>,
) {
    tokio::sync::watch::channel(false)
}

async fn admin_with_store(node: &MgmtNode, store: Arc<dyn warren::StatusStore>) -> (Broker, Admin) {
    let broker = Broker::connect(config_for(&node.amqp_url(), QueueType::Quorum))
        .await
        .expect("broker");
    let admin = Admin::new(broker.clone(), Some(mgmt(node)), Some(store), false)
        .await
        .expect("admin");
    (broker, admin)
}

/// The chain, fan-in and split job with the ids `[chain, fan-in job, split task]` as the
/// admin's jobs view lists them (`None` for one it does not list), or `None` while the view
/// cannot be read.
async fn listed_jobs(
    admin: Admin,
    [chain, fan_in, split]: [String; 3],
) -> Option<(Option<ChainView>, Option<JobView>, Option<JobView>)> {
    let j = admin.jobs().await.ok()?;
    Some((
        j.chains.into_iter().find(|c| c.id == chain),
        j.fan_ins.into_iter().find(|f| f.id == fan_in),
        j.split_jobs.into_iter().find(|s| s.id == split),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_list_a_chain_at_its_current_step_and_split_and_fan_in_totals() {
    let node = MgmtNode::shared().await;
    let svc = unique("adm-chain");
    let prefix = format!("warren-test:{svc}:");
    let store = test_store(&prefix);
    let (open, shut) = gate();
    let fin_calls = Arc::new(Mutex::new(0u32));
    let fins = fin_calls.clone();
    let (s1, s2, s3) = (shut.clone(), shut.clone(), shut);
    let service = Service::new(&svc)
        .method("first", |_: Context, _: serde_json::Value| async move {
            Ok::<_, TaskError>(serde_json::json!({"first": 1}))
        })
        .method("block", move |_: Context, _: serde_json::Value| {
            let mut gate = s1.clone();
            async move {
                let _ = gate.wait_for(|open| *open).await;
                Ok::<_, TaskError>(serde_json::json!({"block": 2}))
            }
        })
        .method("last", |_: Context, _: serde_json::Value| async move {
            Ok::<_, TaskError>(serde_json::json!({"last": 3}))
        })
        .method("slow", move |_: Context, n: u64| {
            let mut gate = s2.clone();
            async move {
                let _ = gate.wait_for(|open| *open).await;
                Ok::<_, TaskError>(n)
            }
        })
        // A split job of 3 parts, each held until the gate opens.
        .method("sum_part", |_: Context, n: u64| async move {
            Ok::<_, TaskError>((0..n).collect::<Vec<u64>>())
        })
        .method("sum", move |_: Context, n: u64| {
            let mut gate = s3.clone();
            async move {
                let _ = gate.wait_for(|open| *open).await;
                Ok::<_, TaskError>(n)
            }
        })
        .method("fin", move |_: Context, _: serde_json::Value| {
            let fins = fins.clone();
            async move {
                *fins.lock().unwrap() += 1;
                Ok::<_, TaskError>(())
            }
        })
        .retry(RetryPolicy::none());
    let worker = TestWorker::start(
        Worker::builder()
            .amqp(config_for(&node.amqp_url(), QueueType::Quorum))
            .status_store(store.clone())
            .concurrency(8)
            .service(service),
    )
    .await
    .expect("worker starts");
    let client = worker.client().clone();
    let chain = client
        .enqueue_chain(
            warren::Chain::new()
                .step(format!("{svc}.first"))
                .step(format!("{svc}.block"))
                .step(format!("{svc}.last"))
                .input("n", &1)
                .with_timeout(DEADLINE),
        )
        .await
        .expect("chain sent");
    let chain_id = chain.id.to_string();
    // A fan-in of 4 targets, all held until the gate opens.
    let mut p = warren::Parallel::new().on_final(format!("{svc}.fin"));
    for n in 0..4u64 {
        p = p.target(format!("{svc}.slow"), &n);
    }
    let receipt = client.parallel(p).await.expect("parallel sent");
    let split = client
        .enqueue(Task::new(format!("{svc}.sum"), &3u64))
        .await
        .expect("split job sent");
    let split_id = split.id.to_string();
    let (broker, admin) = admin_with_store(node, store).await;

    let ids = [chain_id, receipt.job.to_string(), split_id];
    let (c, f, s) = poll(
        "the chain at step 2 / 3 and the fan-in of 4",
        DEADLINE,
        || {
            let listed = listed_jobs(admin.clone(), ids.clone());
            async move {
                let (c, f, s) = listed.await?;
                let (c, f, s) = (c?, f?, s?);
                // The API counts a part queue once it collected its statistics.
                (c.step == 2
                    && c.state == warren::TaskState::Running
                    && f.parts_total.is_some()
                    && f.parts_in.is_some()
                    && s.parts_total.is_some()
                    && s.parts_in.is_some())
                .then_some((c, f, s))
            }
        },
    )
    .await;
    assert_eq!(c.steps_total, 3);
    assert_eq!(c.progress, "2 / 3");
    assert_eq!(c.target, Some(format!("{svc}.block")));
    assert_eq!(
        c.steps,
        [
            format!("{svc}.first"),
            format!("{svc}.block"),
            format!("{svc}.last")
        ]
    );
    assert_eq!(f.parts_total, Some(4), "{f:?}");
    assert_eq!(f.parts_in, Some(0), "no target finished yet: {f:?}");
    assert_eq!(s.parts_total, Some(3), "{s:?}");
    assert_eq!(s.parts_in, Some(0), "no part finished yet: {s:?}");
    assert_eq!(s.target, Some(format!("{svc}.sum")));

    // Open the gate: the chain ends and leaves the list; the fan-in joins once.
    open.send_replace(true);
    let result = chain.wait().await.expect("the chain ends");
    assert_eq!(result.bog()["last"], 3);
    poll("the fan-in's callback", DEADLINE, || {
        let fins = fin_calls.clone();
        async move { (*fins.lock().unwrap() == 1).then_some(()) }
    })
    .await;
    poll(
        "the chain, fan-in and split job to leave the jobs view",
        DEADLINE,
        || {
            let listed = listed_jobs(admin.clone(), ids.clone());
            async move { matches!(listed.await?, (None, None, None)).then_some(()) }
        },
    )
    .await;
    broker.close().await;
    worker.stop().await.expect("worker stops");
    drop_store(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_lists_its_methods_that_never_failed_and_a_task_its_children_apart_from_its_hooks(
) {
    let node = MgmtNode::shared().await;
    let svc = unique("adm-meth");
    let prefix = format!("warren-test:{svc}:");
    let store = test_store(&prefix);
    let ran = Arc::new(Mutex::new(Vec::<String>::new()));
    let (r1, r2, r3) = (ran.clone(), ran.clone(), ran.clone());
    let child_target = format!("{svc}.child");
    let service = Service::new(&svc)
        .method("parent", move |ctx: Context, _: serde_json::Value| {
            let child_target = child_target.clone();
            async move {
                ctx.enqueue(Task::new(child_target, &1))
                    .await
                    .map_err(|e| TaskError::fail(e.to_string()))?;
                Ok::<_, TaskError>(serde_json::json!("parent done"))
            }
        })
        .method("child", move |_: Context, _: serde_json::Value| {
            let ran = r1.clone();
            async move {
                ran.lock().unwrap().push("child".into());
                Ok::<_, TaskError>(())
            }
        })
        .method("hook", move |_: Context, _: serde_json::Value| {
            let ran = r2.clone();
            async move {
                ran.lock().unwrap().push("hook".into());
                Ok::<_, TaskError>(())
            }
        })
        .method("fails", move |_: Context, _: serde_json::Value| {
            let ran = r3.clone();
            async move {
                ran.lock().unwrap().push("fails".into());
                Err::<(), _>(TaskError::reject("always"))
            }
        })
        .method("never", |_: Context, _: serde_json::Value| async move {
            Ok::<_, TaskError>(())
        })
        .retry(RetryPolicy::none());
    let worker = TestWorker::start(
        Worker::builder()
            .amqp(config_for(&node.amqp_url(), QueueType::Quorum))
            .status_store(store.clone())
            .service(service),
    )
    .await
    .expect("worker starts");
    let client = worker.client().clone();
    let parent = client
        .enqueue(Task::new(format!("{svc}.parent"), &0).on_complete(format!("{svc}.hook")))
        .await
        .expect("enqueue parent");
    client
        .enqueue(Task::new(format!("{svc}.fails"), &0))
        .await
        .expect("enqueue a failing task");
    let (broker, admin) = admin_with_store(node, store).await;

    // Methods: every one the worker hosts, with 0 failures but for `fails`.
    let view = poll("the service's methods", DEADLINE, || {
        let admin = admin.clone();
        let svc = svc.clone();
        async move {
            let v = admin.service(&svc).await.ok()?;
            (v.dead_total == 1 && v.methods.len() == 5).then_some(v)
        }
    })
    .await;
    let by_name = |m: &str| {
        view.methods
            .iter()
            .find(|x| x.method == m)
            .unwrap_or_else(|| panic!("{m} listed: {:?}", view.methods))
    };
    for m in ["parent", "child", "hook", "never"] {
        assert_eq!(by_name(m).dead, 0, "{m}");
        assert!(by_name(m).advertised_at.is_some(), "{m}");
        assert!(by_name(m).reasons.is_empty(), "{m}");
    }
    assert_eq!(by_name("fails").dead, 1);
    assert_eq!(by_name("fails").reasons.get("rejected"), Some(&1));

    // The parent's lookup: the child in one list, the hook in the other.
    let lookup = poll("the parent's child and hook", DEADLINE, || {
        let admin = admin.clone();
        let id = parent.id.to_string();
        async move {
            let t = admin.task(&id).await.ok()?;
            let done = |l: &[warren_admin::views::LinkedTask]| {
                l.len() == 1 && l[0].status.state == warren::TaskState::Succeeded
            };
            (done(&t.children) && done(&t.hooks)).then_some(t)
        }
    })
    .await;
    assert_eq!(lookup.found.len(), 1);
    assert_eq!(lookup.children[0].status.target, format!("{svc}.child"));
    assert_eq!(
        lookup.children[0].relation,
        warren_core::status::Relation::Child
    );
    assert_eq!(lookup.hooks[0].status.target, format!("{svc}.hook"));
    assert_eq!(
        lookup.hooks[0].relation,
        warren_core::status::Relation::Hook
    );
    assert!(
        lookup.related.is_empty(),
        "nothing else in the cid: {:?}",
        lookup.related
    );
    // The child's own lookup has neither.
    let child = admin
        .task(&lookup.children[0].status.id.to_string())
        .await
        .expect("child lookup");
    assert!(child.children.is_empty() && child.hooks.is_empty());
    let mut seen = ran.lock().unwrap().clone();
    seen.sort();
    assert_eq!(seen, ["child", "fails", "hook"]);

    broker.close().await;
    worker.stop().await.expect("worker stops");
    drop_store(&prefix).await;
}
