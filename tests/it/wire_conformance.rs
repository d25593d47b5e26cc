//! `docs/wire-format.md` as a contract: a producer that knows only the doc, here raw lapin,
//! declares what the doc says, publishes what the doc says, and gets the answers, hooks and
//! join the doc promises from a warren worker. The bad-input half of the contract (every kind
//! of refusal, dead-lettered once and answered) is the `bad_input` module.

use crate::common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config, unique, Cleanup};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use warren::{Context, QueueType, Service, TaskError, Worker};

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Publishes `body` persistent, mandatory and confirmed, as the doc's table says.
async fn publish(ch: &Channel, exchange: &str, key: &str, body: &Value, reply_to: Option<&str>) {
    publish_with(ch, exchange, key, body, reply_to, FieldTable::default()).await;
}

/// [`publish`] with AMQP headers.
async fn publish_with(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &Value,
    reply_to: Option<&str>,
    headers: FieldTable,
) {
    let id = body["id"].as_str().unwrap();
    let cid = body["cid"].as_str().unwrap();
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(id.into())
        .with_correlation_id(cid.into())
        .with_headers(headers);
    if let Some(r) = reply_to {
        props = props.with_reply_to(r.into());
    }
    let confirm = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &serde_json::to_vec(body).unwrap(),
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(confirm, lapin::Confirmation::Ack(None), "{body}");
}

async fn declare_exchange(ch: &Channel, name: &str, kind: ExchangeKind, arguments: FieldTable) {
    ch.exchange_declare(
        name.into(),
        kind,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        arguments,
    )
    .await
    .unwrap();
}

fn envelope(svc: &str, method: &str, payload: Value) -> Value {
    json!({
        "v": 1,
        "id": uuid::Uuid::now_v7().to_string(),
        "cid": format!("conf-{}", uuid::Uuid::new_v4().simple()),
        "svc": svc,
        "method": method,
        "payload": payload,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_follows_the_doc() {
    let svc = unique("wire");
    let _cleanup = Cleanup::new(&[&svc]);
    let conn = Connection::connect(&common::url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();

    // "Publishing a task": the exchange and the service queue, declared by the producer
    // before any warren process, with exactly the documented arguments. The worker declares
    // them again at start; RabbitMQ would refuse it if the arguments differed.
    ch.exchange_declare(
        "warren.tasks".into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let svc_q = format!("warren.svc.{svc}");
    ch.queue_declare(
        svc_q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args(&[
            ("x-queue-type", text("quorum")),
            ("x-dead-letter-exchange", text("warren.dead")),
            ("x-delivery-limit", AMQPValue::LongLongInt(20)),
            ("x-dead-letter-strategy", text("at-least-once")),
            ("x-overflow", text("reject-publish")),
        ]),
    )
    .await
    .unwrap();
    ch.queue_bind(
        svc_q.as_str().into(),
        "warren.tasks".into(),
        svc.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // "Delayed tasks": the delivery exchange (and its alternate exchange and queue), the
    // due queue bound to it, and the 25 levels, as documented.
    declare_exchange(
        &ch,
        "warren.delay.unrouted",
        ExchangeKind::Fanout,
        FieldTable::default(),
    )
    .await;
    declare_exchange(
        &ch,
        "warren.delay.deliver",
        ExchangeKind::Headers,
        args(&[("alternate-exchange", text("warren.delay.unrouted"))]),
    )
    .await;
    ch.queue_declare(
        "warren.delay.unrouted".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args(&[("x-queue-type", text("classic"))]),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "warren.delay.unrouted".into(),
        "warren.delay.unrouted".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // The due queue every due message lands in, bound to the delivery exchange without
    // header arguments (it matches everything); a worker moves each message on from there
    // to its `warren-dest` queue. The service queue is not bound to the delivery exchange.
    ch.queue_declare(
        "warren.delay.due".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args(&[("x-queue-type", text("classic"))]),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "warren.delay.due".into(),
        "warren.delay.deliver".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for k in 0..25u32 {
        let level = format!("warren.delay.{k}");
        let below = if k == 0 {
            "warren.delay.deliver".to_owned()
        } else {
            format!("warren.delay.{}", k - 1)
        };
        let pattern = |bit: char| format!("{}{bit}.#", "*.".repeat(24 - k as usize));
        declare_exchange(&ch, &level, ExchangeKind::Topic, FieldTable::default()).await;
        ch.exchange_bind(
            below.as_str().into(),
            level.as_str().into(),
            pattern('0').as_str().into(),
            lapin::options::ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_declare(
            level.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args(&[
                ("x-queue-type", text("classic")),
                ("x-dead-letter-exchange", text(&below)),
                ("x-message-ttl", AMQPValue::LongLongInt(100 << k)),
            ]),
        )
        .await
        .unwrap();
        ch.queue_bind(
            level.as_str().into(),
            level.as_str().into(),
            pattern('1').as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }

    // The worker: `double`, a hook target `record`, `flaky` (fails its first attempt) and
    // `piece` for a job the producer splits itself.
    let (hooks_tx, mut hooks) = mpsc::unbounded_channel::<(String, Value)>();
    let flaky_runs = Arc::new(AtomicU32::new(0));
    let f = flaky_runs.clone();
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    let service = Service::new(&svc)
        .method("double", |_: Context, n: i64| async move {
            Ok::<_, TaskError>(n * 2)
        })
        .method("record", move |ctx: Context, v: Value| {
            let tx = hooks_tx.clone();
            async move {
                let _ = tx.send((ctx.cid().to_owned(), v));
                Ok::<_, TaskError>(())
            }
        })
        .method("flaky", move |ctx: Context, n: i64| {
            f.fetch_add(1, Ordering::SeqCst);
            async move {
                if ctx.attempt() == 1 {
                    return Err(TaskError::fail("first attempt fails"));
                }
                Ok::<_, TaskError>(n + ctx.attempt() as i64)
            }
        })
        .method("piece", |_: Context, n: i64| async move {
            Ok::<_, TaskError>(n * 10)
        })
        .method("sleepy", |_: Context, ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, TaskError>(ms)
        })
        .method("waits", move |_: Context, ms: u64| {
            let started = started_tx.clone();
            async move {
                let _ = started.send(());
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, TaskError>(ms)
            }
        });
    let worker = Worker::builder()
        .amqp(config(QueueType::Quorum))
        .cancel_grace(Duration::from_millis(300))
        .service(service)
        .build()
        .await
        .expect("the worker accepts the queues the doc describes");
    let common::Running { stop, handle } = common::run_in_background(worker);

    // "Request/response": a reply queue named `warren.reply.*`.
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
    let rch = conn.create_channel().await.unwrap();
    let mut replies = rch
        .basic_consume(
            reply_q.as_str().into(),
            "conformance".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut answer = async || -> Value {
        let d = tokio::time::timeout(Duration::from_secs(30), replies.next())
            .await
            .expect("an answer within 30 s")
            .unwrap()
            .unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
        let v: Value = serde_json::from_slice(&d.data).unwrap();
        assert_eq!(
            d.properties.message_id().as_ref().map(|m| m.to_string()),
            v["id"].as_str().map(str::to_owned),
            "message_id = task id"
        );
        v
    };

    // 1. An invoke: the answer's shape.
    let call = envelope(&svc, "double", json!(21));
    publish(&ch, "warren.tasks", &svc, &call, Some(&reply_q)).await;
    let a = answer().await;
    assert_eq!(
        a,
        json!({"v": 1, "id": call["id"], "cid": call["cid"], "ok": 42})
    );

    // 2. An enqueue with an oncomplete hook, and `hooks: null` on the hook's own shape.
    let mut task = envelope(&svc, "double", json!(5));
    task["hooks"] = json!({"oncomplete": {"svc": svc, "method": "record"}});
    publish(&ch, "warren.tasks", &svc, &task, None).await;
    let (cid, v) = tokio::time::timeout(Duration::from_secs(30), hooks.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (cid.as_str(), v),
        (task["cid"].as_str().unwrap(), json!(10))
    );
    let mut nulls = envelope(&svc, "double", json!(1));
    nulls["hooks"] = Value::Null;
    nulls["retry"] = Value::Null;
    nulls["parent"] = Value::Null;
    publish(&ch, "warren.tasks", &svc, &nulls, Some(&reply_q)).await;
    assert_eq!(answer().await["ok"], json!(2));

    // 2b. "Cancellation": a running task is cancelled by a `{"v":1,"cid":..}` message on
    //     the `warren.cancel` fanout exchange; the waiting caller is answered `cancelled`
    //     once the worker's grace (300 ms here) is over.
    let waits = envelope(&svc, "waits", json!(30_000));
    publish(&ch, "warren.tasks", &svc, &waits, Some(&reply_q)).await;
    tokio::time::timeout(Duration::from_secs(30), started.recv())
        .await
        .unwrap()
        .unwrap();
    let sent = Instant::now();
    let cancel = json!({"v": 1, "cid": waits["cid"]});
    let confirm = ch
        .basic_publish(
            "warren.cancel".into(),
            "".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &serde_json::to_vec(&cancel).unwrap(),
            BasicProperties::default().with_content_type("application/json".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(
        confirm,
        lapin::Confirmation::Ack(None),
        "a worker's queue is bound"
    );
    let a = answer().await;
    assert_eq!(a["id"], waits["id"]);
    assert_eq!(a["error"]["kind"], json!("cancelled"), "{a}");
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "{:?}",
        sent.elapsed()
    );

    // 2c. `unique`: a key (1 to 255 bytes) is carried and the task runs as usual (only
    //     `Task::unique` claims it in the store); an empty key is refused as bad_envelope.
    let mut keyed = envelope(&svc, "double", json!(4));
    keyed["unique"] = json!("nightly");
    publish(&ch, "warren.tasks", &svc, &keyed, Some(&reply_q)).await;
    assert_eq!(answer().await["ok"], json!(8));
    let mut empty_key = envelope(&svc, "double", json!(4));
    empty_key["unique"] = json!("");
    publish(&ch, "warren.tasks", &svc, &empty_key, Some(&reply_q)).await;
    let a = answer().await;
    assert_eq!(a["id"], empty_key["id"]);
    assert_eq!(a["error"]["kind"], json!("bad_envelope"), "{a}");

    // 3. A task delayed as documented (1 s = 10 units = 0b1010: routing key of 25 bits and
    //    `d`, published to the level of its highest 1 bit, with `warren-dest`) reaches the
    //    service after it.
    let later = envelope(&svc, "double", json!(50));
    let key: String = (0..25u32)
        .rev()
        .map(|k| if 10u32 >> k & 1 == 1 { "1." } else { "0." })
        .chain(["d"])
        .collect();
    let mut headers = FieldTable::default();
    headers.insert("warren-dest".into(), text(&svc_q));
    let sent = Instant::now();
    publish_with(&ch, "warren.delay.3", &key, &later, Some(&reply_q), headers).await;
    let a = answer().await;
    assert_eq!(
        (a["id"].clone(), a["ok"].clone()),
        (later["id"].clone(), json!(100))
    );
    assert!(
        sent.elapsed() >= Duration::from_millis(950),
        "{:?}",
        sent.elapsed()
    );

    // 4. A partial retry object (only `max_attempts` and `base_ms`): retried once through
    //    the delay levels after 1 s, answered once with the final outcome.
    let mut flaky = envelope(&svc, "flaky", json!(40));
    flaky["retry"] = json!({"max_attempts": 2, "base_ms": 1000});
    publish(&ch, "warren.tasks", &svc, &flaky, Some(&reply_q)).await;
    let a = answer().await;
    assert_eq!(
        (a["id"].clone(), a["ok"].clone()),
        (flaky["id"].clone(), json!(42))
    );
    assert_eq!(flaky_runs.load(Ordering::SeqCst), 2);

    // 4b. `time_limit_ms`: a handler past the task's own limit is stopped and, with no
    //     attempt left, answered as `timeout`.
    let mut limited = envelope(&svc, "sleepy", json!(10_000));
    limited["time_limit_ms"] = json!(200);
    limited["retry"] = json!({"max_attempts": 1});
    let sent = Instant::now();
    publish(&ch, "warren.tasks", &svc, &limited, Some(&reply_q)).await;
    let a = answer().await;
    assert_eq!(a["id"], limited["id"]);
    assert_eq!(a["error"]["kind"], json!("timeout"), "{a}");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "{:?}",
        sent.elapsed()
    );

    // 4c. `key` and `priority` (docs/flow.md): optional fields every worker reads; on a
    //     method without limits and a queue without a priority range they change nothing.
    let mut keyed = envelope(&svc, "double", json!(4));
    keyed["key"] = json!("customer-7");
    keyed["priority"] = json!(0);
    publish(&ch, "warren.tasks", &svc, &keyed, Some(&reply_q)).await;
    let a = answer().await;
    assert_eq!(
        (a["id"].clone(), a["ok"].clone()),
        (keyed["id"].clone(), json!(8))
    );

    // 5. A job the producer splits itself: it declares the part queue (durable classic,
    //    `x-expires`), sends every part with the same hooks, and the hook gets the results
    //    in part order, once.
    let job = uuid::Uuid::now_v7();
    let part_q = format!("part.{svc}-piece-{job}");
    ch.queue_declare(
        part_q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args(&[
            ("x-queue-type", text("classic")),
            ("x-expires", AMQPValue::LongLongInt(86_400_000)),
        ]),
    )
    .await
    .unwrap();
    let cid = format!("conf-job-{job}");
    for part_id in 0..3u32 {
        let mut p = envelope(&svc, "piece", json!(part_id + 1));
        p["cid"] = json!(cid);
        p["channel"] = json!("part");
        p["parent"] = json!(job.to_string());
        p["hooks"] = json!({"oncomplete": {"svc": svc, "method": "record"}});
        p["part"] = json!({"part_id": part_id, "total_parts": 3, "part_queue": part_q});
        publish(&ch, "warren.tasks", &svc, &p, None).await;
    }
    let (hook_cid, results) = tokio::time::timeout(Duration::from_secs(30), hooks.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((hook_cid, results), (cid, json!([10, 20, 30])));
    // The join deleted the part queue.
    common::poll(
        "the part queue to be deleted",
        Duration::from_secs(10),
        || {
            let conn = &conn;
            let part_q = part_q.clone();
            async move {
                let probe = conn.create_channel().await.ok()?;
                let gone = probe
                    .queue_declare(
                        part_q.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .is_err();
                gone.then_some(())
            }
        },
    )
    .await;
    // No second hook: a sentinel enqueued after the job reaches `record` next.
    let mut sentinel = envelope(&svc, "double", json!(0));
    sentinel["hooks"] = json!({"oncomplete": {"svc": svc, "method": "record"}});
    publish(&ch, "warren.tasks", &svc, &sentinel, None).await;
    let (next_cid, _) = tokio::time::timeout(Duration::from_secs(30), hooks.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next_cid, sentinel["cid"].as_str().unwrap());

    // 6. "Trace context": a task carrying a W3C `traceparent` (and `tracestate`) runs in
    //    that trace, and what the worker publishes for it (here its answer) carries the same
    //    trace id and state, with the task's own span as the parent.
    let traced = envelope(&svc, "double", json!(7));
    let (trace_id, parent) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    publish_with(
        &ch,
        "warren.tasks",
        &svc,
        &traced,
        Some(&reply_q),
        args(&[
            ("traceparent", text(&format!("00-{trace_id}-{parent}-01"))),
            ("tracestate", text("congo=t61rcWkgMzE")),
        ]),
    )
    .await;
    let d = tokio::time::timeout(Duration::from_secs(30), replies.next())
        .await
        .expect("an answer within 30 s")
        .unwrap()
        .unwrap();
    d.ack(BasicAckOptions::default()).await.unwrap();
    let v: Value = serde_json::from_slice(&d.data).unwrap();
    assert_eq!(
        (v["id"].clone(), v["ok"].clone()),
        (traced["id"].clone(), json!(14))
    );
    let header = |k: &str| match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(k))
    {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("header {k}: {other:?}"),
    };
    let tp = header("traceparent");
    let fields: Vec<&str> = tp.split('-').collect();
    assert_eq!(fields.len(), 4, "{tp}");
    assert_eq!(
        (fields[0], fields[1], fields[3]),
        ("00", trace_id, "01"),
        "{tp}"
    );
    assert_ne!(fields[2], parent, "the task's own span is the parent: {tp}");
    assert_eq!(header("tracestate"), "congo=t61rcWkgMzE");

    stop.cancel();
    handle.await.unwrap().unwrap();
    let _ = ch
        .queue_delete(reply_q.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
}
