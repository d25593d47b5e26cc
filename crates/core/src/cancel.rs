//! Cancellation and unique tasks: the wire shapes every process shares
//! (docs/cancellation.md).
//!
//! A cancellation is broadcast to every running worker through the fanout exchange
//! [`CANCEL_EXCHANGE`] (each worker binds its own exclusive, auto-deleted queue to it) as one
//! JSON [`CancelRequest`], and, with a status store, recorded as a store key that expires
//! with the status retention, so workers that were not listening (or restart later) see it
//! when a task arrives.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The fanout exchange cancellations are broadcast on (durable; declared with warren's
/// other exchanges).
pub const CANCEL_EXCHANGE: &str = "warren.cancel";

/// Prefix of a worker's cancel queue: `warren.cancel.<worker id>` (exclusive: deleted with
/// the worker's connection).
pub const CANCEL_QUEUE_PREFIX: &str = "warren.cancel.";

/// The longest unique key, in bytes (`Task::unique`): keys end up in store key names and
/// follow the 255-byte rule of AMQP names.
pub const MAX_UNIQUE_KEY: usize = 255;

/// What a cancellation names: one task id, or every task of a cid.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelScope {
    /// One task (and every retry, delayed send, split part, chain step or child task that
    /// names it as its id, parent or chain).
    Id(Uuid),
    /// Every task of this correlation id.
    Cid(String),
}

impl std::fmt::Display for CancelScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Id(id) => write!(f, "task {id}"),
            Self::Cid(cid) => write!(f, "cid {cid}"),
        }
    }
}

/// The body of a cancellation broadcast on [`CANCEL_EXCHANGE`]:
/// `{"v":1,"id":"<uuid>"}` or `{"v":1,"cid":"<cid>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequest {
    /// Always 1.
    pub v: u64,
    /// The task id to cancel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    /// The cid to cancel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
}

impl CancelRequest {
    /// The request for `scope`.
    #[must_use]
    pub fn new(scope: &CancelScope) -> Self {
        match scope {
            CancelScope::Id(id) => Self {
                v: 1,
                id: Some(*id),
                cid: None,
            },
            CancelScope::Cid(cid) => Self {
                v: 1,
                id: None,
                cid: Some(cid.clone()),
            },
        }
    }

    /// What it cancels: `None` for a body that names neither (or an invalid cid).
    #[must_use]
    pub fn scope(&self) -> Option<CancelScope> {
        match (&self.id, &self.cid) {
            (Some(id), _) => Some(CancelScope::Id(*id)),
            (None, Some(cid)) if check_cid(cid) => Some(CancelScope::Cid(cid.clone())),
            _ => None,
        }
    }
}

fn check_cid(cid: &str) -> bool {
    !cid.is_empty() && cid.len() <= 255
}

/// Why a unique key is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UniqueKeyError {
    /// The key is empty.
    #[error("a unique key must not be empty")]
    Empty,
    /// The key is longer than [`MAX_UNIQUE_KEY`] bytes.
    #[error("a unique key is at most {MAX_UNIQUE_KEY} bytes, this one has {0}")]
    TooLong(usize),
}

/// Checks a unique key: 1 to [`MAX_UNIQUE_KEY`] bytes.
pub fn check_unique_key(key: &str) -> Result<(), UniqueKeyError> {
    match key.len() {
        0 => Err(UniqueKeyError::Empty),
        n if n > MAX_UNIQUE_KEY => Err(UniqueKeyError::TooLong(n)),
        _ => Ok(()),
    }
}

/// A unique key qualified with its target, as the store keeps it: `<svc>.<method>:<key>`
/// (Redis: `warren:unique:<svc>.<method>:<key>`).
#[must_use]
pub fn unique_name(svc: &str, method: &str, key: &str) -> String {
    format!("{svc}.{method}:{key}")
}

/// What a unique key's store entry holds: `<task id>:<cid>` (the id is the first 36
/// bytes, which the worker's compare-and-delete compares).
#[must_use]
pub fn unique_holder(id: Uuid, cid: &str) -> String {
    format!("{id}:{cid}")
}

/// Reads a holder written by [`unique_holder`]: the task id and cid.
#[must_use]
pub fn parse_unique_holder(holder: &str) -> Option<(Uuid, String)> {
    let (id, cid) = holder.split_at_checked(36)?;
    let cid = cid.strip_prefix(':')?;
    Some((Uuid::parse_str(id).ok()?, cid.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_shapes() {
        let id = Uuid::now_v7();
        let r = CancelRequest::new(&CancelScope::Id(id));
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j, serde_json::json!({"v": 1, "id": id}));
        assert_eq!(r.scope(), Some(CancelScope::Id(id)));
        let r: CancelRequest = serde_json::from_str(r#"{"v":1,"cid":"c-1"}"#).unwrap();
        assert_eq!(r.scope(), Some(CancelScope::Cid("c-1".into())));
        let r: CancelRequest = serde_json::from_str(r#"{"v":1,"cid":""}"#).unwrap();
        assert_eq!(r.scope(), None);
    }

    #[test]
    fn unique_keys() {
        assert_eq!(check_unique_key(""), Err(UniqueKeyError::Empty));
        assert_eq!(
            check_unique_key(&"k".repeat(256)),
            Err(UniqueKeyError::TooLong(256))
        );
        assert!(check_unique_key(&"k".repeat(255)).is_ok());
        let id = Uuid::now_v7();
        assert_eq!(
            parse_unique_holder(&unique_holder(id, "c:1")),
            Some((id, "c:1".to_owned()))
        );
        assert_eq!(parse_unique_holder("short"), None);
    }
}
