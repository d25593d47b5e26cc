//! Trace propagation against the real broker: one trace id from a client call through a
//! split job's splitter, its parts and its hook (docs/operations.md#tracing).
//!
//! Each handler reads the context it runs in (`TraceContext::current()`); the worker took it
//! from the `traceparent` header of the delivery, which whoever published the task wrote
//! from its own context.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use warren::testing::{unique, TestWorker};
use warren::trace::TraceContext;
use warren::{Context, RetryPolicy, Service, Task, TaskError, Worker};

use crate::common::{config, poll};

/// (role, trace id, span id) of every handler run.
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

fn note(seen: &Seen, role: &str) {
    let cx = TraceContext::current().expect("a handler runs in a trace context");
    seen.lock()
        .unwrap()
        .push((role.to_owned(), cx.trace_id(), cx.span_id()));
}

#[tokio::test]
async fn one_trace_from_the_client_call_through_a_split_jobs_hook() {
    let svc = unique("trace");
    let seen: Seen = Arc::default();
    let (s1, s2, s3) = (seen.clone(), seen.clone(), seen.clone());
    let service = Service::new(&svc)
        .method("sum_part", move |_: Context, n: u64| {
            let seen = s1.clone();
            async move {
                note(&seen, "splitter");
                Ok::<_, TaskError>((1..=n).collect::<Vec<u64>>())
            }
        })
        .method("sum", move |_: Context, i: u64| {
            let seen = s2.clone();
            async move {
                note(&seen, "part");
                Ok::<_, TaskError>(i * 10)
            }
        })
        .method("done", move |_: Context, results: Vec<u64>| {
            let seen = s3.clone();
            async move {
                assert_eq!(results, vec![10, 20, 30]);
                note(&seen, "hook");
                Ok::<_, TaskError>(())
            }
        })
        .retry(RetryPolicy::none());
    let worker = TestWorker::start(
        Worker::builder()
            .amqp(config(warren::QueueType::Quorum))
            .service(service)
            .completion_window(Duration::from_secs(30))
            .part_queue_expiry(Duration::from_secs(60)),
    )
    .await
    .expect("worker starts");
    let client = worker.client().clone();

    // The caller's trace: whatever it publishes in this scope continues it.
    let root = TraceContext::new_root();
    let task = Task::new(format!("{svc}.sum"), &3u64).on_complete(format!("{svc}.done"));
    let receipt = root
        .clone()
        .scope(client.enqueue(task))
        .await
        .expect("enqueued");

    let seen = poll("the job's hook", Duration::from_secs(60), || {
        let seen = seen.clone();
        async move {
            let s = seen.lock().unwrap().clone();
            s.iter().any(|(role, ..)| role == "hook").then_some(s)
        }
    })
    .await;
    let roles: Vec<&str> = seen.iter().map(|(r, ..)| r.as_str()).collect();
    assert_eq!(
        roles.iter().filter(|r| **r == "splitter").count(),
        1,
        "{roles:?}"
    );
    assert_eq!(
        roles.iter().filter(|r| **r == "part").count(),
        3,
        "{roles:?}"
    );
    for (role, trace_id, _) in &seen {
        assert_eq!(
            trace_id,
            &root.trace_id(),
            "{role} of job {} is not in the caller's trace",
            receipt.id
        );
    }
    // Every task is a span of its own in that trace.
    let mut spans: Vec<String> = seen.iter().map(|(_, _, s)| s.clone()).collect();
    spans.push(root.span_id());
    let n = spans.len();
    spans.sort_unstable();
    spans.dedup();
    assert_eq!(spans.len(), n, "span ids repeat: {seen:?}");
    worker.stop().await.expect("worker stops");
}

/// A handler's own calls continue its trace: `ctx.invoke` from a handler lands in a task
/// of the same trace, and a call made outside any context starts a new one.
#[tokio::test]
async fn a_handlers_calls_continue_its_trace_and_unscoped_calls_start_one() {
    let svc = unique("trace-nest");
    let inner = svc.clone();
    let service = Service::new(&svc)
        .method("outer", move |ctx: Context, _: u32| {
            let target = format!("{inner}.inner");
            async move {
                let mine = TraceContext::current().expect("a context").trace_id();
                let theirs: String = ctx.client().invoke(Task::new(target, &0u32)).await?;
                Ok::<_, TaskError>((mine, theirs))
            }
        })
        .method("inner", |_: Context, _: u32| async move {
            Ok::<_, TaskError>(TraceContext::current().expect("a context").trace_id())
        });
    let worker = TestWorker::start(
        Worker::builder()
            .amqp(config(warren::QueueType::Quorum))
            .service(service),
    )
    .await
    .expect("worker starts");
    let client = worker.client().clone();

    let (outer, inner): (String, String) = client
        .invoke(Task::new(format!("{svc}.outer"), &0u32))
        .await
        .expect("outer answers");
    assert_eq!(
        outer, inner,
        "the nested call continues the outer task's trace"
    );
    let (again, _): (String, String) = client
        .invoke(Task::new(format!("{svc}.outer"), &0u32))
        .await
        .expect("outer answers");
    assert_ne!(again, outer, "each unscoped call starts its own trace");
    worker.stop().await.expect("worker stops");
}

/// With the `otel` feature (on for this test binary) and a `tracing-opentelemetry` layer,
/// every task of a split job is an OpenTelemetry span in the caller's trace, each the child
/// of the span that published it.
///
/// The layer must be the process's global subscriber: a thread-local default misses spans
/// when other tests of the binary register the same callsites at the same time. So the test
/// runs itself again, alone, in a child process, which installs it.
#[test]
fn otel_spans_of_a_split_job_are_in_the_callers_trace() {
    use opentelemetry::trace::{SpanId, TraceContextExt, TracerProvider as _};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
    use tracing::Instrument;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::layer::SubscriberExt;

    const CHILD: &str = "WARREN_TEST_OTEL_CHILD";
    const NAME: &str = "tracing::otel_spans_of_a_split_job_are_in_the_callers_trace";
    if std::env::var_os(CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().expect("the test binary"))
            .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .expect("run the test in a child process");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "the child run failed:\n{stdout}\n{stderr}"
        );
        return;
    }

    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("warren-test")));
    tracing::subscriber::set_global_default(subscriber).expect("the child's only subscriber");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (trace_id, caller_span) = rt.block_on(async {
        let svc = unique("otel");
        let (tx, mut hooked) = tokio::sync::mpsc::unbounded_channel::<()>();
        let service = Service::new(&svc)
            .method("sum_part", |_: Context, n: u64| async move {
                Ok::<_, TaskError>((1..=n).collect::<Vec<u64>>())
            })
            .method(
                "sum",
                |_: Context, i: u64| async move { Ok::<_, TaskError>(i) },
            )
            .method("done", move |_: Context, _: Vec<u64>| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(());
                    Ok::<_, TaskError>(())
                }
            })
            .retry(RetryPolicy::none());
        let worker = TestWorker::start(
            Worker::builder()
                .amqp(config(warren::QueueType::Quorum))
                .service(service)
                .completion_window(Duration::from_secs(30))
                .part_queue_expiry(Duration::from_secs(60)),
        )
        .await
        .expect("worker starts");
        let caller = tracing::info_span!("caller");
        let cx = caller.context();
        let ids = (
            cx.span().span_context().trace_id(),
            cx.span().span_context().span_id(),
        );
        let task = Task::new(format!("{svc}.sum"), &3u64).on_complete(format!("{svc}.done"));
        worker
            .client()
            .enqueue(task)
            .instrument(caller)
            .await
            .expect("enqueued");
        tokio::time::timeout(Duration::from_secs(60), hooked.recv())
            .await
            .expect("the hook runs");
        worker.stop().await.expect("worker stops");
        ids
    });
    provider.force_flush().expect("flush");
    let spans = exporter.get_finished_spans().expect("spans");
    let tasks: Vec<_> = spans.iter().filter(|s| s.name == "task").collect();
    // The split task, 3 parts, the hook, and any join re-check (its own task).
    assert!(tasks.len() >= 5, "{tasks:#?}");
    let method = |s: &opentelemetry_sdk::trace::SpanData| {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == "method")
            .map(|kv| kv.value.as_str().into_owned())
    };
    let hooks = tasks
        .iter()
        .filter(|s| method(s).as_deref() == Some("done"))
        .count();
    assert_eq!(hooks, 1, "{tasks:#?}");
    for s in &tasks {
        assert_eq!(s.span_context.trace_id(), trace_id, "{s:#?}");
        assert!(s.parent_span_is_remote, "{s:#?}");
        assert_ne!(s.parent_span_id, SpanId::INVALID, "{s:#?}");
    }
    // The split task's parent is the caller's span; the parts' is the split task's.
    let split = tasks
        .iter()
        .find(|s| s.parent_span_id == caller_span)
        .expect("a task whose parent is the caller");
    let parts = tasks
        .iter()
        .filter(|s| s.parent_span_id == split.span_context.span_id())
        .count();
    assert_eq!(parts, 3, "{tasks:#?}");
}
