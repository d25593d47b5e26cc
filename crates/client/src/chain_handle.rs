//! Waiting for chains: [`ChainHandle`] (awaitable, cloneable), [`ChainResult`] and its
//! extraction knobs ([`Extract`]), wait-any ([`as_completed`]) and capped parallel runs.

use std::collections::BTreeSet;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::stream::{FuturesUnordered, Stream, StreamExt};
use serde_json::{Map, Value};
use uuid::Uuid;
use warren_core::chain::ChainOutcome;
use warren_core::status::TaskState;
use warren_core::Failure;

use crate::{Client, Error};

/// How a chain ended, as every clone of its handle sees it.
#[derive(Debug, Clone)]
pub(crate) enum Ended {
    Ok(ChainOutcome),
    Failed(Failure),
    /// No outcome could be had (the client stopped listening, a bad record).
    Lost(String),
}

/// A chain that was sent. Await it (`handle.await`, [`ChainHandle::wait`],
/// [`ChainHandle::wait_for`]) for its result, or [`ChainHandle::outcome_of`] for an outcome
/// instead of an error. Clones share one wait; dropping every clone does not stop the chain.
///
/// Handles come from [`Client::enqueue_chain`] (answered through the client's reply queue)
/// or, in any process, from [`Client::chain_handle`] (read from the status store).
#[derive(Clone)]
pub struct ChainHandle {
    /// The chain's id (its status in a store is recorded under it).
    pub id: Uuid,
    /// The chain's correlation id (empty for a handle re-created from its id).
    pub cid: String,
    /// How long [`ChainHandle::wait`] waits ([`Chain::with_timeout`](crate::Chain::with_timeout)).
    pub(crate) timeout: Option<Duration>,
    /// When the chain was sent: its timeout counts from here.
    pub(crate) started: tokio::time::Instant,
    pub(crate) ended: Shared<BoxFuture<'static, Ended>>,
}

impl std::fmt::Debug for ChainHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainHandle")
            .field("id", &self.id)
            .field("cid", &self.cid)
            .field("ended", &self.ended.peek().is_some())
            .finish()
    }
}

impl ChainHandle {
    /// Waits for the chain to end: its result, or [`Error::Failed`] with the failing step's
    /// error. Bounded by the chain's [`Chain::with_timeout`](crate::Chain::with_timeout),
    /// if it set one ([`Error::Timeout`]), which counts from the start of the call that sent
    /// the chain (its publish included), not from this wait.
    pub async fn wait(self) -> Result<ChainResult, Error> {
        match self.timeout {
            Some(t) => {
                let (id, cid) = (self.id, self.cid.clone());
                match tokio::time::timeout_at(self.started + t, self.ended()).await {
                    Ok(r) => r,
                    Err(_) => Err(Error::Timeout { id, cid, after: t }),
                }
            }
            None => self.ended().await,
        }
    }

    async fn ended(self) -> Result<ChainResult, Error> {
        let ended = self.ended.clone().await;
        self.result_of(ended)
    }

    /// Like [`ChainHandle::wait`], giving up after `timeout` with [`Error::Timeout`] (the
    /// chain goes on; a clone of the handle can wait again).
    pub async fn wait_for(self, timeout: Duration) -> Result<ChainResult, Error> {
        let (id, cid) = (self.id, self.cid.clone());
        match tokio::time::timeout(timeout, self.ended()).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                id,
                cid,
                after: timeout,
            }),
        }
    }

    /// Waits and returns the outcome instead of raising: `Ok(result)` or `Err(failure)`;
    /// the outer `Result` fails only when no outcome could be had.
    pub async fn outcome_of(self) -> Result<Result<ChainResult, Failure>, Error> {
        match self.wait().await {
            Ok(r) => Ok(Ok(r)),
            Err(Error::Failed { failure, .. }) => Ok(Err(failure)),
            Err(e) => Err(e),
        }
    }

    /// The outcome if the chain has already ended, without waiting.
    #[must_use]
    pub fn try_result(&self) -> Option<Result<ChainResult, Error>> {
        self.ended.peek().cloned().map(|e| self.result_of(e))
    }

    fn result_of(&self, ended: Ended) -> Result<ChainResult, Error> {
        match ended {
            Ended::Ok(o) => Ok(ChainResult {
                bog: o.bog,
                returned: o.returned,
                children: o.children,
            }),
            Ended::Failed(failure) => Err(Error::Failed {
                id: self.id,
                cid: self.cid.clone(),
                failure,
            }),
            Ended::Lost(why) => Err(Error::ReplyListener(why)),
        }
    }
}

impl IntoFuture for ChainHandle {
    type Output = Result<ChainResult, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    /// `handle.await` is [`ChainHandle::wait`].
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.wait())
    }
}

/// Yields each handle's id and result as its chain ends, in completion order (wait-any).
///
/// ```no_run
/// # async fn demo(client: warren_client::Client) -> Result<(), warren_client::Error> {
/// use futures_util::StreamExt;
/// use warren_client::{as_completed, Chain};
/// let mut handles = Vec::new();
/// for w in [64, 128, 256] {
///     handles.push(client.enqueue_chain(Chain::new().step("images.resize").input("w", &w)).await?);
/// }
/// let mut done = as_completed(handles);
/// while let Some((id, result)) = done.next().await {
///     println!("{id}: {:?}", result.map(|r| r.returned()));
/// }
/// # Ok(()) }
/// ```
pub fn as_completed(
    handles: impl IntoIterator<Item = ChainHandle>,
) -> impl Stream<Item = (Uuid, Result<ChainResult, Error>)> + Send + Unpin {
    handles
        .into_iter()
        .map(|h| async move { (h.id, h.wait().await) }.boxed())
        .collect::<FuturesUnordered<_>>()
}

/// Runs `run` over `chains` with at most `max_parallel` running at once; the results come
/// back in input order. [`crate::Client::enqueue_in_parallel`] and the handler context's
/// version are built on it; it works for any capped fan-out.
pub async fn run_capped<C, F, Fut>(
    chains: impl IntoIterator<Item = C>,
    max_parallel: usize,
    run: F,
) -> Result<Vec<Result<ChainResult, Error>>, Error>
where
    F: FnMut(C) -> Fut,
    Fut: Future<Output = Result<ChainResult, Error>>,
{
    if max_parallel == 0 {
        return Err(Error::ZeroParallel);
    }
    Ok(futures_util::stream::iter(chains)
        .map(run)
        .buffered(max_parallel)
        .collect()
        .await)
}

/// Which part of a chain's bog a result shows: the three knobs of result extraction.
///
/// Default: the values steps returned, inputs and child chains excluded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[must_use]
pub struct Extract {
    inputs: bool,
    children: bool,
}

impl Extract {
    /// Returned values only (the default).
    pub fn new() -> Self {
        Self::default()
    }

    /// Includes the bog's input values (a step's returned value still wins).
    pub fn with_inputs(mut self) -> Self {
        self.inputs = true;
        self
    }

    /// Merges the results of child chains the steps enqueued (through their handler
    /// context) and saw end; the chain's own values win over its children's.
    pub fn merge_children(mut self) -> Self {
        self.children = true;
        self
    }
}

/// The result of a chain: its bog after the last step, and what its children returned.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainResult {
    bog: Map<String, Value>,
    returned: BTreeSet<String>,
    children: Map<String, Value>,
}

impl ChainResult {
    /// The values steps returned (default extraction: input values and children excluded).
    #[must_use]
    pub fn returned(&self) -> Map<String, Value> {
        self.extract(Extract::new())
    }

    /// The whole bog, input values included.
    #[must_use]
    pub fn bog(&self) -> &Map<String, Value> {
        &self.bog
    }

    /// The merged values child chains returned (enqueued by this chain's steps).
    #[must_use]
    pub fn children(&self) -> &Map<String, Value> {
        &self.children
    }

    /// The key-values `how` selects: children first (when merged), then inputs (when
    /// included), then the returned values, later ones winning.
    #[must_use]
    pub fn extract(&self, how: Extract) -> Map<String, Value> {
        let mut out = if how.children {
            self.children.clone()
        } else {
            Map::new()
        };
        for (k, v) in &self.bog {
            if how.inputs || self.returned.contains(k) {
                out.insert(k.clone(), v.clone());
            }
        }
        out
    }

    /// The values of `keys` in that order, from what `how` selects (`Null` for a key it
    /// does not hold).
    #[must_use]
    pub fn extract_keys(&self, how: Extract, keys: &[&str]) -> Vec<Value> {
        let m = self.extract(how);
        keys.iter()
            .map(|k| m.get(*k).cloned().unwrap_or(Value::Null))
            .collect()
    }

    /// The values of `keys` in that order from the whole bog (inputs included, children
    /// not); `Null` for a key nothing set.
    #[must_use]
    pub fn values(&self, keys: &[&str]) -> Vec<Value> {
        self.extract_keys(Extract::new().with_inputs(), keys)
    }
}

/// Stops waiting for a reply when the last clone of a handle goes (its wait is dropped).
pub(crate) struct ForgetOnDrop {
    pub(crate) client: Client,
    pub(crate) id: Uuid,
}

impl Drop for ForgetOnDrop {
    fn drop(&mut self) {
        self.client.forget_reply(&self.id);
    }
}

/// Polls the status store for chain `id` until it has ended.
pub(crate) async fn poll_store(client: Client, id: Uuid) -> Ended {
    let mut pauses =
        warren_core::amqp::backoff(Duration::from_millis(20), Duration::from_millis(500));
    loop {
        match client.status(id).await {
            Ok(Some(s)) if s.state == TaskState::Succeeded => {
                let v = s.result.unwrap_or(Value::Null);
                return match serde_json::from_value::<ChainOutcome>(v) {
                    Ok(o) => Ended::Ok(o),
                    Err(e) => Ended::Lost(format!("chain {id}: bad result in the store: {e}")),
                };
            }
            Ok(Some(s)) if s.state == TaskState::Failed => {
                return match s.error {
                    Some(f) => Ended::Failed(f),
                    None => Ended::Lost(format!("chain {id} failed; the store has no error")),
                };
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(chain = %id, error = %e, "status store read failed; retrying")
            }
        }
        tokio::time::sleep(pauses.next().unwrap_or(Duration::from_millis(500))).await;
    }
}

pub(crate) fn shared(
    fut: impl Future<Output = Ended> + Send + 'static,
) -> Shared<BoxFuture<'static, Ended>> {
    fut.boxed().shared()
}
