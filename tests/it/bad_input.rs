//! Bad input never stops a worker: every kind of bad message, sent as raw AMQP, is
//! dead-lettered exactly once with its reason, answered as an error when someone waits, never
//! retried, and good tasks sent after it are still handled.

use crate::common;
use warren::Task;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{config, unique, Cleanup};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use warren::{Client, Context, QueueType, Service, TaskError, Worker};

async fn bad_input(qt: QueueType) {
    let svc = unique("bad");
    let _cleanup = Cleanup::new(&[&svc]);
    let panics = Arc::new(AtomicU32::new(0));
    let p = panics.clone();
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let service = Service::new(&svc)
        .method("double", move |_: Context, n: i64| {
            r.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, TaskError>(n * 2) }
        })
        .method(
            "job",
            |_: Context, n: i64| async move { Ok::<_, TaskError>(n) },
        )
        .method("job_part", |_: Context, n: i64| async move {
            Ok::<_, TaskError>((0..n).collect::<Vec<i64>>())
        })
        .method("boom", move |_: Context, _: ()| {
            p.fetch_add(1, Ordering::SeqCst);
            async move {
                if true {
                    panic!("kaboom");
                }
                Ok::<(), TaskError>(())
            }
        });
    let worker = Worker::builder()
        .amqp(config(qt))
        .service(service)
        .build()
        .await
        .unwrap();
    let common::Running { stop, handle } = common::run_in_background(worker);

    let conn = Connection::connect(&common::url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    // A reply queue of our own, named the way warren names them, to see answers.
    let reply_q = format!("warren.reply.{}", uuid::Uuid::new_v4());
    ch.queue_declare(
        reply_q.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();

    let id = |n: u8| format!("00000000-0000-7000-8000-0000000000{n:02}");
    let env = |n: u8, svc: &str, method: &str, payload: &str| {
        format!(
            r#"{{"v":1,"id":"{}","cid":"c{n}","svc":"{svc}","method":"{method}","payload":{payload}}}"#,
            id(n)
        )
    };
    let with = |n: u8, extra: &str| {
        format!(
            r#"{{"v":1,"id":"{}","cid":"c{n}","svc":"{svc}","method":"double","payload":1,{extra}}}"#,
            id(n)
        )
    };
    let part = |n: u8, part_id: u32, total: u32, queue: &str| {
        with(
            n,
            &format!(
                r#""part":{{"part_id":{part_id},"total_parts":{total},"part_queue":"{queue}"}}"#
            ),
        )
    };
    // (case, body, the AMQP message id it is sent with, reason). Every name and number an
    // envelope carries is checked when it is decoded: the handler never runs on any of them.
    let cases: Vec<(u8, String, Option<String>, &str)> = vec![
        (1, "{not json".into(), Some(id(1)), "bad_envelope"),
        (2, r#"{"v":2,"id":"x"}"#.into(), Some(id(2)), "bad_envelope"),
        (
            3,
            r#"{"id":"no version"}"#.into(),
            Some(id(3)),
            "bad_envelope",
        ),
        (4, env(4, &svc, "nope", "1"), Some(id(4)), "unknown_target"),
        (
            5,
            env(5, "other-service", "double", "1"),
            Some(id(5)),
            "unknown_target",
        ),
        (
            6,
            env(6, &svc, "double", r#""not a number""#),
            Some(id(6)),
            "bad_payload",
        ),
        (7, env(7, &svc, "boom", "null"), Some(id(7)), "panic"),
        (
            8,
            env(8, "BAD NAME", "double", "1"),
            Some(id(8)),
            "bad_envelope",
        ),
        (
            9,
            with(
                9,
                r#""hooks":{"oncomplete":{"svc":"BAD NAME","method":"x"}}"#,
            ),
            Some(id(9)),
            "bad_envelope",
        ),
        (
            10,
            with(10, r#""notify":"Not A Topic""#),
            Some(id(10)),
            "bad_envelope",
        ),
        (
            11,
            part(11, 0, 2, "amq.parts"),
            Some(id(11)),
            "bad_envelope",
        ),
        (12, part(12, 2, 2, "part.x"), Some(id(12)), "bad_envelope"),
        (13, part(13, 0, 0, "part.x"), Some(id(13)), "bad_envelope"),
        (14, with(14, r#""attempt":0"#), Some(id(14)), "bad_envelope"),
        // No AMQP message id, or one that is not a UUID: dead-lettered and answered under
        // the envelope's own id.
        (15, with(15, r#""attempt":0"#), None, "bad_envelope"),
        (
            16,
            with(16, r#""attempt":0"#),
            Some("not-a-uuid".into()),
            "bad_envelope",
        ),
        // A concurrency key is 1 to 255 bytes (it goes into names).
        (19, with(19, r#""key":"""#), Some(id(19)), "bad_envelope"),
        (
            20,
            with(20, &format!(r#""key":"{}""#, "k".repeat(256))),
            Some(id(20)),
            "bad_envelope",
        ),
        // A lone UTF-16 surrogate escape, even in a field warren does not know: the body is
        // not JSON to other readers (answered under the AMQP message id).
        (
            21,
            with(21, r#""x-extra":"\ud800""#),
            Some(id(21)),
            "bad_envelope",
        ),
        // A number beyond a 64-bit float, likewise.
        (
            23,
            with(23, r#""x-extra":1e400"#),
            Some(id(23)),
            "bad_envelope",
        ),
    ];
    let good: Vec<(u8, String)> = vec![
        (17, with(17, r#""hooks":null"#)),
        (18, with(18, r#""retry":{"max_attempts":2}"#)),
        // A surrogate pair is a character like any other.
        (22, with(22, r#""x-extra":"\ud83d\ude00""#)),
        // The largest exponent that still fits.
        (24, with(24, r#""x-extra":1e308"#)),
    ];
    for (_, body, mid, _) in cases
        .iter()
        .map(|(n, b, m, r)| (n, b, m.clone(), r))
        .chain(good.iter().map(|(n, b)| (n, b, Some(id(*n)), &"ok")))
    {
        let mut props = BasicProperties::default()
            .with_reply_to(reply_q.as_str().into())
            .with_delivery_mode(2);
        if let Some(m) = mid {
            props = props.with_message_id(m.into());
        }
        let confirm = ch
            .basic_publish(
                "warren.tasks".into(),
                svc.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body.as_bytes(),
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(confirm, lapin::Confirmation::Ack(None));
    }

    // A good task after all of them is still handled.
    let client = Client::builder().amqp(config(qt)).connect().await.unwrap();
    let v: i64 = client
        .invoke(Task::new(format!("{svc}.double"), &21))
        .await
        .unwrap();
    assert_eq!(v, 42);

    // Every bad message is in the dead-letter queue exactly once, with its reason.
    let dead_q = format!("warren.dead.{svc}");
    let mut dead: HashMap<String, Vec<String>> = HashMap::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    while dead.values().map(Vec::len).sum::<usize>() < cases.len() {
        assert!(
            tokio::time::Instant::now() < end,
            "bad messages not all dead-lettered: {dead:?}"
        );
        match ch
            .basic_get(dead_q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(msg) => {
                let mid = msg
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.to_string())
                    .unwrap_or_default();
                let headers = msg.properties.headers().clone().unwrap_or_default();
                let reason = match headers.inner().get("x-warren-reason") {
                    Some(AMQPValue::LongString(s)) => {
                        String::from_utf8_lossy(s.as_bytes()).into_owned()
                    }
                    other => format!("{other:?}"),
                };
                assert!(headers.inner().contains_key("x-warren-error"));
                dead.entry(mid).or_default().push(reason);
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    for (n, body, mid, reason) in &cases {
        let key = match mid {
            Some(m) => m.clone(),
            None => id(*n),
        };
        assert_eq!(
            dead.get(&key),
            Some(&vec![(*reason).to_owned()]),
            "case {n}: {body}"
        );
    }
    // The good ones ran; no bad one did.
    assert_eq!(
        usize::try_from(runs.load(Ordering::SeqCst)).unwrap(),
        good.len() + 1,
        "handler runs: {} good cases + 1 invoke",
        good.len()
    );
    assert_eq!(
        panics.load(Ordering::SeqCst),
        1,
        "a panicking task is never retried"
    );

    // Every one of them was answered with an error on the reply queue.
    let mut answered = HashMap::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while answered.len() < cases.len() + good.len() {
        assert!(
            tokio::time::Instant::now() < end,
            "not every bad message was answered: {answered:?}"
        );
        match ch
            .basic_get(reply_q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(msg) => {
                let reply: serde_json::Value = serde_json::from_slice(&msg.data).unwrap();
                answered.insert(
                    reply["id"].as_str().unwrap().to_owned(),
                    reply["error"]["kind"].as_str().unwrap_or("ok").to_owned(),
                );
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    for (n, _, _, reason) in &cases {
        assert_eq!(
            answered.get(&id(*n)).map(String::as_str),
            Some(*reason),
            "case {n}"
        );
    }
    for (n, _) in &good {
        assert_eq!(
            answered.get(&id(*n)).map(String::as_str),
            Some("ok"),
            "case {n}"
        );
    }

    // Invoking a split method answers at once: the job started, with its part count.
    let started: warren::SplitStarted = client
        .invoke(Task::new(format!("{svc}.job"), &3))
        .await
        .unwrap();
    assert_eq!(started.parts, 3);

    // Nothing is left in the service queue, and the worker is still running.
    let stats = common::service_stats(client.broker(), &svc).await;
    assert_eq!(stats.ready, 0);
    assert!(!handle.is_finished());
    stop.cancel();
    handle.await.unwrap().unwrap();
    let _ = ch
        .queue_delete(reply_q.as_str().into(), QueueDeleteOptions::default())
        .await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_quorum() {
    bad_input(QueueType::Quorum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_classic() {
    bad_input(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_to_outside_warren_is_not_honoured() {
    let svc = unique("replyto");
    let _cleanup = Cleanup::new(&[&svc]);
    let service = Service::new(&svc).method("double", |_: Context, n: i64| async move {
        Ok::<_, TaskError>(n * 2)
    });
    let worker = Worker::builder()
        .amqp(config(QueueType::Classic))
        .service(service)
        .build()
        .await
        .unwrap();
    let common::Running { stop, handle } = common::run_in_background(worker);
    let conn = Connection::connect(&common::url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let foreign = format!("victim-{}", uuid::Uuid::new_v4());
    ch.queue_declare(
        foreign.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let body = format!(
        r#"{{"v":1,"id":"{}","cid":"c","svc":"{svc}","method":"double","payload":2}}"#,
        uuid::Uuid::new_v4()
    );
    ch.basic_publish(
        "warren.tasks".into(),
        svc.as_str().into(),
        BasicPublishOptions::default(),
        body.as_bytes(),
        BasicProperties::default().with_reply_to(foreign.as_str().into()),
    )
    .await
    .unwrap();
    // Prove the task ran by running a second one through a real client and waiting for it.
    let client = Client::builder()
        .amqp(config(QueueType::Classic))
        .connect()
        .await
        .unwrap();
    let _: i64 = client
        .invoke(Task::new(format!("{svc}.double"), &1))
        .await
        .unwrap();
    let stats = common::service_stats(client.broker(), &svc).await;
    assert_eq!(stats.ready, 0);
    let got = ch
        .basic_get(foreign.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap();
    assert!(
        got.is_none(),
        "the worker must not publish to a queue warren did not create"
    );
    stop.cancel();
    handle.await.unwrap().unwrap();
    client.close().await;
}
