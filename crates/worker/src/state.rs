//! Typed shared state: values a worker hands to every handler ([`crate::WorkerBuilder::state`],
//! read with [`crate::Context::state`]).
//!
//! **Why a type map, and not axum's `State<S>`.** axum checks state at compile time because a
//! router has one state type `S` and every handler's extractor must be derivable from it.
//! warren's handlers are registered one by one on services that a worker combines, each
//! handler type-erased behind the same `Fn(Context, In)` shape; one `S` for the whole worker
//! would force every service (often from different crates) to agree on it. So warren does what
//! apalis's `Data<T>` does, a map from type to one shared value, and removes its two
//! surprises:
//!
//! - a type registered twice is an error at `build()`, not a silent overwrite;
//! - a handler asking for a type nobody registered gets a [`TaskError::reject`] naming the
//!   type (with `?`, the task is dead-lettered with that reason), never a panic, and the
//!   worker logs the registered types at start.
//!
//! Values are stored once, behind an `Arc`: handlers get `&T` (clone an inner `Arc` or a
//! pool handle if a future needs to own it).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;

use crate::TaskError;

/// A shared value and its type's name.
type Entry = (&'static str, Arc<dyn Any + Send + Sync>);

/// The worker's shared values, one per type.
#[derive(Clone, Default)]
pub(crate) struct State {
    values: Arc<HashMap<TypeId, Entry>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.values.values().map(|(name, _)| name))
            .finish()
    }
}

/// Values added to a builder, checked for duplicates at `build()`.
#[derive(Default)]
pub(crate) struct StateBuilder {
    values: Vec<(TypeId, &'static str, Arc<dyn Any + Send + Sync>)>,
}

impl StateBuilder {
    pub(crate) fn add<T: Send + Sync + 'static>(&mut self, value: T) {
        self.values.push((
            TypeId::of::<T>(),
            std::any::type_name::<T>(),
            Arc::new(value),
        ));
    }

    /// The state, or the name of a type registered twice.
    pub(crate) fn build(self) -> Result<State, &'static str> {
        let mut values = HashMap::new();
        for (id, name, v) in self.values {
            if values.insert(id, (name, v)).is_some() {
                return Err(name);
            }
        }
        Ok(State {
            values: Arc::new(values),
        })
    }
}

impl State {
    pub(crate) fn get<T: Send + Sync + 'static>(&self) -> Result<&T, TaskError> {
        self.values
            .get(&TypeId::of::<T>())
            .and_then(|(_, v)| v.downcast_ref::<T>())
            .ok_or_else(|| {
                TaskError::reject(format!(
                    "no shared state of type {} (register it with WorkerBuilder::state)",
                    std::any::type_name::<T>()
                ))
            })
    }

    pub(crate) fn type_names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.values.values().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Db(u32);

    #[test]
    fn one_value_per_type() {
        let mut b = StateBuilder::default();
        b.add(Db(7));
        b.add(String::from("x"));
        let s = b.build().unwrap();
        assert_eq!(s.get::<Db>().unwrap().0, 7);
        assert_eq!(s.get::<String>().unwrap(), "x");
        let missing = s.get::<u64>().err().unwrap();
        assert!(missing.message().contains("u64"), "{}", missing.message());
        let mut twice = StateBuilder::default();
        twice.add(Db(1));
        twice.add(Db(2));
        assert!(twice.build().unwrap_err().contains("Db"));
    }
}
