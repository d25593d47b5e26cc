//! Cancelling tasks: [`Client::cancel`] (one task id) and [`Client::cancel_cid`] (every
//! task of a cid). See docs/cancellation.md.

use uuid::Uuid;
use warren_core::cancel::{CancelRequest, CancelScope, CANCEL_EXCHANGE};
use warren_core::status::{TaskState, TaskStatus};
use warren_core::Outgoing;

use crate::{Client, Error};

/// What a cancellation found of one task, from the status store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Found {
    /// The store knows no such task: never sent with a store, expired, a typo, or (without
    /// a store) anything at all. Not an error: the cancellation is recorded anyway.
    Unknown,
    /// Sent and not started yet, or waiting for a retry: it will not run.
    Pending,
    /// A worker runs it: the handler sees `ctx.cancelled()` and is dropped after the
    /// worker's grace period.
    Running,
    /// It had already ended in this state (the cancellation changes nothing for it; tasks
    /// it causes later, such as retries or the next chain step, are still stopped).
    Finished(TaskState),
}

impl Found {
    fn of(status: &TaskStatus) -> Self {
        match status.state {
            TaskState::Pending => Self::Pending,
            TaskState::Running => Self::Running,
            s @ (TaskState::Succeeded | TaskState::Failed) => Self::Finished(s),
        }
    }
}

/// What [`Client::cancel`] and [`Client::cancel_cid`] did and found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CancelOutcome {
    /// What was cancelled.
    pub scope: CancelScope,
    /// Every task the store knew under the scope, with its state when it was cancelled.
    /// For a task id, exactly one entry ([`Found::Unknown`] when the store does not know
    /// it, or without a store); for a cid, one entry per known task (none without a store).
    pub tasks: Vec<(Uuid, Found)>,
    /// `true` when the cancellation was recorded in the status store (it then holds for
    /// tasks that arrive later at any worker, across restarts, for the store's retention).
    pub recorded: bool,
    /// `true` when at least one worker's cancel queue took the broadcast (running handlers
    /// are reached only so); `false` when no worker was listening.
    pub broadcast: bool,
}

impl CancelOutcome {
    /// The most telling state among [`CancelOutcome::tasks`]: `Running` if any runs, else
    /// `Pending` if any waits, else `Finished` (`Failed` if any failed, else `Succeeded`),
    /// else `Unknown`.
    #[must_use]
    pub fn found(&self) -> Found {
        let states = || self.tasks.iter().map(|(_, f)| *f);
        if states().any(|f| f == Found::Running) {
            Found::Running
        } else if states().any(|f| f == Found::Pending) {
            Found::Pending
        } else if states().any(|f| f == Found::Finished(TaskState::Failed)) {
            Found::Finished(TaskState::Failed)
        } else if states().any(|f| f == Found::Finished(TaskState::Succeeded)) {
            Found::Finished(TaskState::Succeeded)
        } else {
            Found::Unknown
        }
    }
}

impl Client {
    /// Cancels task `id`: it never runs if it has not started; a running handler sees
    /// `ctx.cancelled()` and is dropped after its worker's grace period; its retries,
    /// delayed sends, split parts, chain steps and child tasks (which name it as their id,
    /// parent or chain) stop when they reach a worker. The task fails with kind
    /// `cancelled`: in its status, to a waiting `invoke`, and to its `onerror` hook.
    ///
    /// With a status store the cancellation is recorded (`warren:cancel:id:<id>`, for the
    /// store's retention) and holds across worker restarts; it is also broadcast to every
    /// running worker. Without a store only the broadcast holds (docs/cancellation.md).
    /// Cancelling an unknown or finished task is not an error: see
    /// [`CancelOutcome::found`].
    ///
    /// ```no_run
    /// # async fn demo(client: warren_client::Client, id: uuid::Uuid) -> Result<(), warren_client::Error> {
    /// use warren_client::Found;
    /// let outcome = client.cancel(id).await?;
    /// if outcome.found() == Found::Unknown {
    ///     println!("no such task known (cancelled anyway)");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn cancel(&self, id: Uuid) -> Result<CancelOutcome, Error> {
        self.cancel_scope(CancelScope::Id(id)).await
    }

    /// Cancels every task of correlation id `cid` (a split job's parts, a chain's steps, a
    /// parallel invoke's targets, the tasks their handlers enqueue), as [`Client::cancel`]
    /// does for one id. Hooks and callbacks (which report outcomes, such as this
    /// cancellation to an `onerror` hook) are not stopped by a cid. An empty or over-long
    /// cid (over 255 bytes) is refused before anything is done.
    pub async fn cancel_cid(&self, cid: &str) -> Result<CancelOutcome, Error> {
        crate::task::check_cid(cid)?;
        self.cancel_scope(CancelScope::Cid(cid.to_owned())).await
    }

    async fn cancel_scope(&self, scope: CancelScope) -> Result<CancelOutcome, Error> {
        // Recorded first: once recorded, a task that arrives anywhere is stopped.
        let (recorded, tasks) = match self.recorder().map(|r| r.store().clone()) {
            Some(store) => {
                store.cancel(&scope).await?;
                let tasks = match &scope {
                    CancelScope::Id(id) => {
                        let found = store
                            .get(*id)
                            .await?
                            .map_or(Found::Unknown, |s| Found::of(&s));
                        vec![(*id, found)]
                    }
                    CancelScope::Cid(cid) => store
                        .by_cid(cid)
                        .await?
                        .iter()
                        .map(|s| (s.id, Found::of(s)))
                        .collect(),
                };
                (true, tasks)
            }
            None => {
                let tasks = match &scope {
                    CancelScope::Id(id) => vec![(*id, Found::Unknown)],
                    CancelScope::Cid(_) => Vec::new(),
                };
                (false, tasks)
            }
        };
        let broadcast = self.broadcast_cancel(&scope).await?;
        tracing::info!(%scope, recorded, broadcast, "cancelled");
        Ok(CancelOutcome {
            scope,
            tasks,
            recorded,
            broadcast,
        })
    }

    /// Publishes the cancellation to `warren.cancel`; `false` when no worker queue is bound
    /// (the mandatory publish came back unroutable).
    async fn broadcast_cancel(&self, scope: &CancelScope) -> Result<bool, Error> {
        self.broker().declare_exchanges().await?;
        let body = serde_json::to_vec(&CancelRequest::new(scope))
            .map_err(|e| Error::Encode(std::sync::Arc::new(e)))?;
        let mut msg = Outgoing::new(CANCEL_EXCHANGE, "", body);
        msg.persistent = false;
        match self.sender().publisher().publish(&msg).await {
            Ok(()) => Ok(true),
            Err(warren_core::Error::Unroutable { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn found_summarises_the_liveliest_state() {
        let o = |tasks: Vec<Found>| CancelOutcome {
            scope: CancelScope::Cid("c".into()),
            tasks: tasks.into_iter().map(|f| (Uuid::now_v7(), f)).collect(),
            recorded: true,
            broadcast: true,
        };
        assert_eq!(o(vec![]).found(), Found::Unknown);
        let done = Found::Finished(TaskState::Succeeded);
        let failed = Found::Finished(TaskState::Failed);
        assert_eq!(o(vec![done, Found::Pending]).found(), Found::Pending);
        assert_eq!(
            o(vec![Found::Pending, Found::Running]).found(),
            Found::Running
        );
        assert_eq!(o(vec![done, failed]).found(), failed);
        assert_eq!(o(vec![done]).found(), done);
    }
}
