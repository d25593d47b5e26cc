//! Chains of services sharing a key-value state (the bog): [`Chain`], [`ChainHandle`].

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::oneshot;
use uuid::Uuid;
use warren_core::chain::{ChainOutcome, ChainState};
use warren_core::envelope::ReplyOutcome;
use warren_core::{Envelope, Failure, HookTarget, Reply, Target, Via};

use crate::{Client, Error};

/// An ordered list of service calls sharing a bog: every step's handler receives the bog (a
/// JSON object; its input type picks the keys it needs) and returns key-values, which are
/// merged into the bog. The chain's result is the bog after the last step. A step that
/// fails for good (after its retries) aborts the chain: later steps never run and only the
/// error is available.
///
/// Progress travels in the messages (each step's task carries the chain and the bog), so a
/// worker killed mid-chain loses nothing: the step is redelivered and the chain goes on.
///
/// ```no_run
/// # async fn demo(client: warren_client::Client) -> Result<(), warren_client::Error> {
/// use warren_client::Chain;
/// let chain = Chain::new()
///     .step("images.fetch")?
///     .step("images.resize")?
///     .input("url", &"https://example.com/cat.png")?
///     .input("width", &64)?;
/// let result = client.run_chain(chain).await?;
/// let thumb = result.values(&["thumbnail_url"]);
/// # let _ = thumb; Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct Chain {
    steps: Vec<HookTarget>,
    bog: Map<String, Value>,
    cid: Option<String>,
    timeout: Option<Duration>,
    parent: Option<Uuid>,
}

impl Chain {
    /// An empty chain (add steps with [`Chain::step`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a step (`"svc.method"`).
    pub fn step(mut self, target: &str) -> Result<Self, Error> {
        self.steps
            .push(HookTarget::from(&target.parse::<Target>()?));
        Ok(self)
    }

    /// Sets an input value in the bog.
    pub fn input(mut self, key: &str, value: &impl Serialize) -> Result<Self, Error> {
        let v = serde_json::to_value(value).map_err(Error::Encode)?;
        self.bog.insert(key.to_owned(), v);
        Ok(self)
    }

    /// Uses the caller's correlation id for every step (default: a fresh one).
    pub fn with_cid(mut self, cid: impl Into<String>) -> Self {
        self.cid = Some(cid.into());
        self
    }

    /// How long [`Client::run_chain`] waits (default: none; [`ChainHandle::wait_for`]
    /// bounds one wait).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Records the task that started the chain; set by handler contexts.
    #[doc(hidden)]
    pub fn with_parent(mut self, parent: Uuid) -> Self {
        self.parent = Some(parent);
        self
    }
}

/// The result of a chain: its bog after the last step.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainResult {
    bog: Map<String, Value>,
    returned: BTreeSet<String>,
}

impl ChainResult {
    /// The values steps returned (default extraction: input values excluded).
    #[must_use]
    pub fn returned(&self) -> Map<String, Value> {
        self.bog
            .iter()
            .filter(|(k, _)| self.returned.contains(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The whole bog, input values included.
    #[must_use]
    pub fn bog(&self) -> &Map<String, Value> {
        &self.bog
    }

    /// The values of `keys`, in that order (`Null` for a key no step or input set).
    #[must_use]
    pub fn values(&self, keys: &[&str]) -> Vec<Value> {
        keys.iter()
            .map(|k| self.bog.get(*k).cloned().unwrap_or(Value::Null))
            .collect()
    }
}

/// A chain that was sent: await [`ChainHandle::wait`] for its result. Dropping the handle
/// does not stop the chain.
#[derive(Debug)]
pub struct ChainHandle {
    /// The chain's id (its status in a store is recorded under it).
    pub id: Uuid,
    /// The chain's correlation id.
    pub cid: String,
    client: Client,
    rx: oneshot::Receiver<Reply>,
}

impl ChainHandle {
    /// Waits for the chain to end: its result, or [`Error::Failed`] with the failing step's
    /// error.
    pub async fn wait(mut self) -> Result<ChainResult, Error> {
        let reply = (&mut self.rx)
            .await
            .map_err(|_| Error::ReplyListener(String::from("the client stopped listening")))?;
        self.outcome(reply)
    }

    /// Like [`ChainHandle::wait`], giving up after `timeout` with [`Error::Timeout`].
    pub async fn wait_for(self, timeout: Duration) -> Result<ChainResult, Error> {
        let (id, cid) = (self.id, self.cid.clone());
        match tokio::time::timeout(timeout, self.wait()).await {
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

    fn outcome(&self, reply: Reply) -> Result<ChainResult, Error> {
        match reply.outcome {
            ReplyOutcome::Ok(v) => {
                let o: ChainOutcome =
                    serde_json::from_value(v).map_err(|source| Error::Decode {
                        id: self.id,
                        source,
                    })?;
                Ok(ChainResult {
                    bog: o.bog,
                    returned: o.returned,
                })
            }
            ReplyOutcome::Error(failure) => Err(Error::Failed {
                id: self.id,
                cid: self.cid.clone(),
                failure,
            }),
        }
    }
}

impl Drop for ChainHandle {
    fn drop(&mut self) {
        self.client.forget_reply(&self.id);
    }
}

impl Client {
    /// Sends `chain`'s first step and returns a handle to await its result.
    ///
    /// Errors: a chain without steps ([`Error::NoTargets`]); name, cid and broker errors.
    pub async fn enqueue_chain(&self, chain: Chain) -> Result<ChainHandle, Error> {
        let Some(first) = chain.steps.first() else {
            return Err(Error::NoTargets);
        };
        if let Some(c) = &chain.cid {
            crate::task::check_cid(c)?;
        }
        let id = Uuid::now_v7();
        let state = ChainState {
            id,
            steps: chain.steps.clone(),
            index: 0,
            bog: chain.bog,
            returned: BTreeSet::new(),
        };
        let mut env = Envelope::new(
            &Target::new(&first.svc, &first.method)?,
            Value::Null,
            Some(chain.cid.unwrap_or_else(|| id.to_string())),
        );
        env.id = state.step_id(0);
        env.channel = Via::Chain;
        env.parent = chain.parent;
        env.chain = Some(state);
        let replies = self.replies().await?;
        let rx = replies
            .register(id)
            .ok_or_else(|| Error::ReplyListener(replies.stop_reason()))?;
        let handle = ChainHandle {
            id,
            cid: env.cid.clone(),
            client: self.clone(),
            rx,
        };
        self.send_envelope(&env, Some(&replies.queue)).await?;
        Ok(handle)
    }

    /// Sends `chain` and waits for its result (up to the chain's timeout, if it has one).
    pub async fn run_chain(&self, chain: Chain) -> Result<ChainResult, Error> {
        let timeout = chain.timeout;
        let handle = self.enqueue_chain(chain).await?;
        match timeout {
            Some(t) => handle.wait_for(t).await,
            None => handle.wait().await,
        }
    }
}
