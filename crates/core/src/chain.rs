//! The state a chain carries from step to step (the envelope's `chain` field).
//!
//! A chain runs services in order; each step's task carries the whole chain: its steps,
//! which one is running, and the bog, the key-value state every step reads its input from
//! and merges its returned key-values into. Progress therefore lives in the messages, not in
//! any process: a worker killed mid-step is redelivered that step, and the chain goes on.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::envelope::HookTarget;

/// A chain in flight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainState {
    /// The chain's id (its handle's id, and the id its result is reported under).
    pub id: Uuid,
    /// The services to run, in order.
    pub steps: Vec<HookTarget>,
    /// The step this task runs, `0..steps.len()`.
    pub index: u32,
    /// The key-value state: the inputs, then every step's returned values.
    pub bog: Map<String, Value>,
    /// Keys some step returned (the rest of the bog is input).
    #[serde(default)]
    pub returned: BTreeSet<String>,
    /// Key-values returned by child chains that steps enqueued and saw end (merged, later
    /// children over earlier); results merge them only when asked.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub children: Map<String, Value>,
}

/// What a finished chain reports: the bog after the last step, and which keys steps set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainOutcome {
    /// The bog after the last step.
    pub bog: Map<String, Value>,
    /// Keys returned by some step (a step that overwrote an input key counts).
    pub returned: BTreeSet<String>,
    /// Key-values returned by child chains the steps enqueued and saw end.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub children: Map<String, Value>,
}

impl ChainState {
    /// The step this task runs.
    #[must_use]
    pub fn step(&self) -> Option<&HookTarget> {
        self.steps.get(self.index as usize)
    }

    /// `true` when this task runs the last step.
    #[must_use]
    pub fn is_last(&self) -> bool {
        self.index as usize + 1 >= self.steps.len()
    }

    /// Merges a step's result into the bog: an object's key-values (null adds nothing).
    /// Anything else is refused: a step returns key-values.
    pub fn merge(&mut self, result: Value) -> Result<(), String> {
        match result {
            Value::Object(kv) => {
                for (k, v) in kv {
                    self.returned.insert(k.clone());
                    self.bog.insert(k, v);
                }
                Ok(())
            }
            Value::Null => Ok(()),
            other => Err(format!(
                "a chain step must return key-values (a JSON object), not {other}"
            )),
        }
    }

    /// The outcome after the last step.
    #[must_use]
    pub fn outcome(self) -> ChainOutcome {
        ChainOutcome {
            bog: self.bog,
            returned: self.returned,
            children: self.children,
        }
    }

    /// The state of the next step (same chain, index + 1).
    #[must_use]
    pub fn next(&self) -> Self {
        let mut n = self.clone();
        n.index += 1;
        n
    }

    /// The deterministic task id of step `index` (a re-sent step keeps its id).
    #[must_use]
    pub fn step_id(&self, index: u32) -> Uuid {
        Uuid::new_v5(&self.id, &index.to_be_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_and_advance() {
        let mut c = ChainState {
            id: Uuid::nil(),
            steps: vec![
                HookTarget {
                    svc: "a".into(),
                    method: "x".into(),
                },
                HookTarget {
                    svc: "b".into(),
                    method: "y".into(),
                },
            ],
            index: 0,
            bog: json!({"n": 1}).as_object().cloned().unwrap_or_default(),
            returned: BTreeSet::new(),
            children: Map::new(),
        };
        assert!(!c.is_last());
        c.merge(json!({"m": 2, "n": 3})).unwrap();
        assert_eq!(c.bog["n"], 3);
        assert!(c.returned.contains("n") && c.returned.contains("m"));
        assert!(c.merge(json!(5)).is_err());
        let n = c.next();
        assert!(n.is_last());
        assert_eq!(n.step().map(|s| s.svc.as_str()), Some("b"));
        assert_ne!(c.step_id(0), c.step_id(1));
    }
}
