//! Chains of services sharing a key-value state (the bog): [`Chain`], and the client calls
//! that send them.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;
use warren_core::chain::{ChainOutcome, ChainState};
use warren_core::envelope::ReplyOutcome;
use warren_core::{Envelope, HookTarget, IntoTarget, Target, Via};

use crate::args::Invalid;
use crate::chain_handle::{poll_store, run_capped, shared, Ended, ForgetOnDrop};
use crate::{ChainHandle, ChainResult, Client, Error};

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
///     .step("images.fetch")
///     .step("images.resize")
///     .input("url", &"https://example.com/cat.png")
///     .input("width", &64);
/// let result = client.run_chain(chain).await?;
/// let thumb = result.values(&["thumbnail_url"]);
/// # let _ = thumb; Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct Chain {
    invalid: Invalid,
    steps: Vec<HookTarget>,
    bog: Map<String, Value>,
    cid: Option<String>,
    timeout: Option<Duration>,
    parent: Option<Uuid>,
    delay: Option<Duration>,
}

impl Chain {
    /// An empty chain (add steps with [`Chain::step`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a step (`"svc.method"` or a [`warren_core::Target`]). An invalid name is
    /// returned by the call that sends the chain.
    pub fn step(mut self, target: impl IntoTarget) -> Self {
        if let Some(h) = self.invalid.hook(target) {
            self.steps.push(h);
        }
        self
    }

    /// Sets an input value in the bog. A value that does not serialize is returned by the
    /// call that sends the chain.
    pub fn input(mut self, key: &str, value: &impl Serialize) -> Self {
        let v = self.invalid.json(value);
        self.bog.insert(key.to_owned(), v);
        self
    }

    /// Uses the caller's correlation id for every step (default: a fresh one).
    pub fn with_cid(mut self, cid: impl Into<String>) -> Self {
        self.cid = Some(cid.into());
        self
    }

    /// How long waiting for the chain lasts ([`Client::run_chain`], [`ChainHandle::wait`],
    /// `.await` on the handle) before [`Error::Timeout`]; default: no limit.
    /// [`ChainHandle::wait_for`] sets its own bound.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Starts the first step `delay` after the chain is sent (rounded up to
    /// 100 ms), through the same delay levels as [`crate::Task::delay`]; later steps follow
    /// as soon as each one ends. A chain timeout counts from the send, so it must cover the
    /// delay. A delay over [`warren_core::delay::MAX_DELAY`] is returned as
    /// [`Error::DelayTooLong`] when sent, and nothing is sent.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = self.invalid.delay(delay).or(self.delay);
        self
    }

    /// Uses `cid` unless the chain already has one: a chain started on behalf of another
    /// request keeps that request's cid (handler contexts pass their own).
    pub fn inherit_cid(mut self, cid: &str) -> Self {
        self.cid.get_or_insert_with(|| cid.to_owned());
        self
    }

    /// Records the task that started the chain (each step's `parent`, and what
    /// `ctx.parent()` returns in the first step; handler contexts pass their own task id).
    pub fn with_parent(mut self, parent: Uuid) -> Self {
        self.parent = Some(parent);
        self
    }
}

impl Client {
    /// Sends `chain`'s first step and returns a handle to await its result.
    ///
    /// Errors: a chain without steps ([`Error::NoTargets`]); name, cid and broker errors.
    pub async fn enqueue_chain(&self, chain: Chain) -> Result<ChainHandle, Error> {
        chain.invalid.check()?;
        let Some(first) = chain.steps.first() else {
            return Err(Error::NoTargets);
        };
        if let Some(c) = &chain.cid {
            crate::task::check_cid(c)?;
        }
        let started = tokio::time::Instant::now();
        let id = Uuid::now_v7();
        let state = ChainState {
            id,
            steps: chain.steps.clone(),
            index: 0,
            bog: chain.bog,
            returned: BTreeSet::new(),
            children: Map::new(),
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
        let guard = ForgetOnDrop {
            client: self.clone(),
            id,
        };
        let ended = shared(async move {
            let _forget_if_dropped = guard;
            match rx.await {
                Ok(reply) => match reply.outcome {
                    ReplyOutcome::Ok(v) => match serde_json::from_value::<ChainOutcome>(v) {
                        Ok(o) => Ended::Ok(o),
                        Err(e) => Ended::Lost(format!("chain {id}: bad result: {e}")),
                    },
                    ReplyOutcome::Error(f) => Ended::Failed(f),
                },
                Err(_) => Ended::Lost(String::from("the client stopped listening")),
            }
        });
        let handle = ChainHandle {
            id,
            cid: env.cid.clone(),
            timeout: chain.timeout,
            started,
            ended,
        };
        // Listed as in flight (waiting for its first step) from now on, for the web admin.
        if let (Some(r), Some(p)) = (
            self.recorder(),
            warren_core::status::ChainProgress::of(&env, warren_core::status::TaskState::Pending),
        ) {
            r.chain_progress(&p).await;
        }
        // A chain timeout bounds the whole call from its start, the publish included.
        let publish_by = match chain.timeout {
            Some(t) => (started + t).min(self.publish_deadline()),
            None => self.publish_deadline(),
        };
        let sent = match chain.delay {
            Some(d) => {
                self.send_later(&env, d, Some(&replies.queue), publish_by)
                    .await
            }
            None => {
                self.send_envelope_by(&env, Some(&replies.queue), publish_by)
                    .await
            }
        };
        if let Err(e) = sent {
            // Not listed as in flight (a copy the broker stored anyway is listed again when
            // a worker starts it).
            if let Some(r) = self.recorder() {
                r.chain_ended(id).await;
            }
            return Err(e);
        }
        Ok(handle)
    }

    /// Re-creates the handle of chain `id`, in any process, from the status store: it
    /// resolves once a worker has recorded the chain's end (polled, from 20 ms up to every
    /// 500 ms). Bound the wait with [`ChainHandle::wait_for`]: an unknown or expired id
    /// never ends.
    ///
    /// Errors: [`Error::NoStatusStore`] when this client has no store.
    pub fn chain_handle(&self, id: Uuid) -> Result<ChainHandle, Error> {
        if self.recorder().is_none() {
            return Err(Error::NoStatusStore);
        }
        Ok(ChainHandle {
            id,
            cid: String::new(),
            timeout: None,
            started: tokio::time::Instant::now(),
            ended: shared(poll_store(self.clone(), id)),
        })
    }

    /// Sends `chains` with at most `max_parallel` running at once (a chain runs from its
    /// send to its end) and returns their results in input order, each its own `Result`.
    ///
    /// Errors: [`Error::ZeroParallel`] when `max_parallel` is 0 (nothing is sent).
    ///
    /// ```no_run
    /// # async fn demo(client: warren_client::Client) -> Result<(), warren_client::Error> {
    /// use warren_client::Chain;
    /// let chains = (0..50)
    ///     .map(|i| Chain::new().step("images.resize").input("i", &i))
    ///     .collect::<Vec<_>>();
    /// let results = client.enqueue_in_parallel(chains, 4).await?;
    /// assert_eq!(results.len(), 50); // results[i] is chains[i]'s
    /// # Ok(()) }
    /// ```
    pub async fn enqueue_in_parallel(
        &self,
        chains: impl IntoIterator<Item = Chain>,
        max_parallel: usize,
    ) -> Result<Vec<Result<ChainResult, Error>>, Error> {
        run_capped(chains, max_parallel, |c| self.run_chain(c)).await
    }

    /// Sends `chain` and waits for its result (up to the chain's timeout, if it has one).
    pub async fn run_chain(&self, chain: Chain) -> Result<ChainResult, Error> {
        self.enqueue_chain(chain).await?.wait().await
    }
}
