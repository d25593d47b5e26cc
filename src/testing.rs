//! A worker for your own tests: in process, on the real broker, with unique names and
//! cleanup.
//!
//! [`TestWorker::start`] builds and runs a worker in the background of the test's tokio
//! runtime, and gives you a [`Client`] that shares its connection. [`unique`] makes service
//! (and topic) names that no other test, or a second run of the same test, uses. When the
//! `TestWorker` is stopped ([`TestWorker::stop`]) or dropped (also when the test panics), the
//! worker stops and every queue it declared by name is deleted (its services' queues and
//! dead-letter queues, subscription queues and done-marker queue). Delay and part queues
//! expire by themselves (`x-expires`). The broker is `WARREN_AMQP_URL`, else the local default,
//! unless the builder sets another.
//!
//! ```
//! use warren::testing::{unique, TestWorker};
//! use warren::{Context, Service, Task, TaskError, Worker};
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let svc = unique("math");
//! let worker = TestWorker::start(
//!     Worker::builder().service(
//!         Service::new(&svc).method("double", |_: Context, n: i64| async move {
//!             Ok::<_, TaskError>(n * 2)
//!         }),
//!     ),
//! )
//! .await?;
//! let out: i64 = worker.client().invoke(Task::new(&format!("{svc}.double"), &21)).await?;
//! assert_eq!(out, 42);
//! worker.stop().await?; // or drop it: the queues are deleted either way
//! # Ok(()) }
//! ```

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warren_client::Client;
use warren_core::{AmqpConfig, Broker};
use warren_worker::{WorkerBuilder, WorkerError};

/// `<prefix>-t<12 hex digits>`: a name (for a service or a topic) no other test uses.
///
/// ```
/// let a = warren::testing::unique("billing");
/// assert!(a.starts_with("billing-t"));
/// assert_ne!(a, warren::testing::unique("billing"));
/// ```
#[must_use]
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-t{}", &id[..12])
}

/// A worker running in the background of a test; see the [module docs](self).
pub struct TestWorker {
    client: Client,
    amqp: AmqpConfig,
    queues: Vec<String>,
    stop: CancellationToken,
    handle: Option<JoinHandle<Result<(), WorkerError>>>,
}

impl std::fmt::Debug for TestWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestWorker")
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

impl TestWorker {
    /// Builds the worker (with `WARREN_AMQP_URL` or the local default when the builder sets
    /// no broker) and runs it until stopped or dropped.
    pub async fn start(builder: WorkerBuilder) -> Result<Self, WorkerError> {
        let amqp = match builder.amqp_config() {
            Some(c) => c.clone(),
            None => AmqpConfig::from_env()?,
        };
        let worker = builder.amqp(amqp.clone()).build().await?;
        let queues = worker.queue_names();
        let client = worker.client();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(worker.run_until(stop.clone().cancelled_owned()));
        Ok(Self {
            client,
            amqp,
            queues,
            stop,
            handle: Some(handle),
        })
    }

    /// A client sharing the worker's connection: enqueue, invoke, publish.
    #[must_use]
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The queues deleted when the worker stops.
    #[must_use]
    pub fn queues(&self) -> &[String] {
        &self.queues
    }

    /// Stops the worker (draining running tasks), deletes its queues, and returns what the
    /// worker's run returned.
    pub async fn stop(mut self) -> Result<(), WorkerError> {
        self.stop.cancel();
        let result = match self.handle.take() {
            Some(h) => h.await.unwrap_or(Ok(())),
            None => Ok(()),
        };
        delete_queues(&self.amqp, &std::mem::take(&mut self.queues)).await;
        result
    }
}

impl Drop for TestWorker {
    /// Stops the worker and deletes its queues (on a thread of its own, so it works while
    /// a test unwinds from a panic).
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(h) = self.handle.take() {
            h.abort();
        }
        let queues = std::mem::take(&mut self.queues);
        if queues.is_empty() {
            return;
        }
        let amqp = self.amqp.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(delete_queues(&amqp, &queues));
            }
        })
        .join();
    }
}

async fn delete_queues(amqp: &AmqpConfig, queues: &[String]) {
    let Ok(broker) =
        Broker::connect(amqp.clone().with_connection_name("warren test cleanup")).await
    else {
        tracing::warn!("could not connect to delete the test worker's queues");
        return;
    };
    for q in queues {
        if let Err(e) = broker.delete_queue(q).await {
            tracing::warn!(queue = %q, error = %e, "could not delete a test queue");
        }
    }
    broker.close().await;
}
