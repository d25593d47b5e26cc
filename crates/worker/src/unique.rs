//! Unique tasks in a worker: when a task sent with `Task::unique` ends (succeeded, failed
//! for good, cancelled: anything but waiting for a retry), its store entry is removed, if it
//! still names this task (compare-and-delete), so the next enqueue with the key queues a new
//! task. A worker that never gets there (the task is lost, the store is down) leaves the
//! entry to its ttl. See docs/cancellation.md.

use warren_core::cancel::unique_name;
use warren_core::Envelope;

use crate::process::Shared;

/// Releases `env`'s unique key (best effort: a store failure is logged and the ttl ends it).
pub(crate) async fn release(shared: &Shared, env: &Envelope, key: &str) {
    let Some(r) = shared.recorder.as_ref() else {
        tracing::debug!("unique task on a worker without a store; its key expires by its ttl");
        return;
    };
    let name = unique_name(&env.svc, &env.method, key);
    match r.store().unique_release(&name, env.id).await {
        Ok(true) => tracing::debug!(key = %name, "unique key released"),
        Ok(false) => tracing::debug!(key = %name, "unique key held by another task (or expired)"),
        Err(e) => {
            tracing::warn!(key = %name, error = %e, "could not release the unique key; it expires by its ttl");
        }
    }
}
