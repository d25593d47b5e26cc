//! Unique tasks: [`Task::unique`]. While a task with a key is pending or running, another
//! enqueue with the same key (for the same `svc.method`) returns the first task's
//! [`Receipt`] instead of queueing a second. See docs/cancellation.md.

use std::time::Duration;

use warren_core::cancel::{parse_unique_holder, unique_holder, unique_name, UniqueKeyError};
use warren_core::Envelope;

use crate::{Client, Error, Receipt, Task};

/// Why a unique task was refused; nothing was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UniqueError {
    /// The key is empty or longer than 255 bytes.
    #[error(transparent)]
    Key(#[from] UniqueKeyError),
    /// The ttl is zero.
    #[error("a unique task's ttl must be more than zero")]
    ZeroTtl,
    /// The client has no status store: unique keys live in the store.
    #[error("unique tasks need a status store (ClientBuilder::status_store)")]
    NoStore,
    /// `invoke` was given a unique task: a duplicate's answer would go to the first
    /// caller. Enqueue it and read its status instead.
    #[error("a unique task cannot be invoked; enqueue it")]
    Invoke,
}

/// A task's unique key and how long it may hold.
#[derive(Debug, Clone)]
pub(crate) struct Unique {
    pub(crate) key: String,
    pub(crate) ttl: Duration,
}

impl Task {
    /// Makes this task unique by `key` among the pending and running tasks of its
    /// `svc.method`: while one with the key is pending or running, enqueueing another
    /// returns the first one's [`Receipt`] (same id and cid) and sends nothing. The key is
    /// held in the status store (`warren:unique:<svc>.<method>:<key>`, holding the first
    /// task's id) and removed by the worker when the task ends (succeeded, failed for good,
    /// cancelled); `ttl` bounds it if that never happens (a lost task, a store outage), so
    /// pick it longer than the task may wait and run.
    ///
    /// Refused when sent, with nothing published ([`Error::Unique`]): an empty key or one
    /// over 255 bytes, a zero ttl, a client without a status store, or `invoke`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use warren_client::Task;
    /// let t = Task::new("reports.build", &"acme").unique("acme-daily", Duration::from_secs(3600));
    /// assert!(t.check().is_ok());
    /// assert!(Task::new("reports.build", &()).unique("", Duration::from_secs(1)).check().is_err());
    /// ```
    pub fn unique(mut self, key: impl Into<String>, ttl: Duration) -> Self {
        let key = key.into();
        if let Err(e) = warren_core::cancel::check_unique_key(&key) {
            self.invalid.unique(UniqueError::Key(e));
        } else if ttl.is_zero() {
            self.invalid.unique(UniqueError::ZeroTtl);
        }
        self.unique = Some(Unique { key, ttl });
        self
    }
}

impl Client {
    /// Claims `env`'s unique key: `Ok(None)` when claimed (send it), `Ok(Some(receipt))`
    /// of the task that holds it (send nothing).
    pub(crate) async fn claim_unique(
        &self,
        env: &Envelope,
        ttl: Duration,
    ) -> Result<Option<Receipt>, Error> {
        let Some(key) = &env.unique else {
            return Ok(None);
        };
        let store = self
            .recorder()
            .map(|r| r.store().clone())
            .ok_or(UniqueError::NoStore)?;
        let name = unique_name(&env.svc, &env.method, key);
        let held = store
            .unique_claim(&name, &unique_holder(env.id, &env.cid), ttl)
            .await?;
        match held {
            None => Ok(None),
            Some(h) => match parse_unique_holder(&h) {
                Some((id, cid)) => Ok(Some(Receipt { id, cid })),
                None => Err(warren_core::status::StoreError::Corrupt(format!(
                    "unique key {name} holds {h:?}, not <task id>:<cid>"
                ))
                .into()),
            },
        }
    }

    /// Gives back a key claimed for a task that was not sent after all.
    pub(crate) async fn unclaim_unique(&self, env: &Envelope) {
        if let (Some(key), Some(r)) = (&env.unique, self.recorder()) {
            let name = unique_name(&env.svc, &env.method, key);
            if let Err(e) = r.store().unique_release(&name, env.id).await {
                tracing::warn!(key = %name, error = %e, "could not release the unique key of an unsent task; it expires by its ttl");
            }
        }
    }
}
