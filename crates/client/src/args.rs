//! Builder arguments checked when sent.
//!
//! [`crate::Task`], [`crate::Chain`], [`crate::Parallel`] and [`crate::InvokeRetry`] take
//! names (`impl IntoTarget`) and payloads (`&impl Serialize`) without a `Result` at each
//! step: each builder keeps the **first** invalid argument, and the call that sends it
//! returns that error before anything is published. One shape for every target argument,
//! and one place where a bad one surfaces.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use warren_core::{HookTarget, IntoTarget, NameError, Target};

use crate::Error;

/// The first invalid argument a builder was given, if any.
#[derive(Debug, Clone, Default)]
pub(crate) struct Invalid(Option<Bad>);

#[derive(Debug, Clone)]
enum Bad {
    Name(NameError),
    Encode(Arc<serde_json::Error>),
    Delay(warren_core::delay::DelayTooLong),
    ZeroTimeLimit,
    Key(warren_core::flow::KeyError),
    Unique(crate::UniqueError),
}

impl Invalid {
    /// The target, or `None` (and the error kept) when the name is refused.
    pub(crate) fn target(&mut self, t: impl IntoTarget) -> Option<Target> {
        match t.into_target() {
            Ok(t) => Some(t),
            Err(e) => {
                self.keep(Bad::Name(e));
                None
            }
        }
    }

    /// A hook or callback target, as it travels in the envelope.
    pub(crate) fn hook(&mut self, t: impl IntoTarget) -> Option<HookTarget> {
        self.target(t).map(|t| HookTarget::from(&t))
    }

    /// `v` as JSON, or `null` (and the error kept) when it does not serialize.
    pub(crate) fn json(&mut self, v: &impl Serialize) -> Value {
        match serde_json::to_value(v) {
            Ok(v) => v,
            Err(e) => {
                self.keep(Bad::Encode(Arc::new(e)));
                Value::Null
            }
        }
    }

    /// `delay` when it is within the longest supported delay, else `None` (and the error
    /// kept).
    pub(crate) fn delay(&mut self, delay: Duration) -> Option<Duration> {
        match warren_core::delay::check(delay) {
            Ok(()) => Some(delay),
            Err(e) => {
                self.keep(Bad::Delay(e));
                None
            }
        }
    }

    /// `limit` when it is not zero, else `None` (and the error kept).
    pub(crate) fn time_limit(&mut self, limit: Duration) -> Option<Duration> {
        if limit.is_zero() {
            self.keep(Bad::ZeroTimeLimit);
            return None;
        }
        Some(limit)
    }

    /// `key` when it is a valid concurrency key, else `None` (and the error kept).
    pub(crate) fn key(&mut self, key: String) -> Option<String> {
        match warren_core::flow::validate_key(&key) {
            Ok(()) => Some(key),
            Err(e) => {
                self.keep(Bad::Key(e));
                None
            }
        }
    }

    /// Keeps a refused unique key or ttl.
    pub(crate) fn unique(&mut self, e: crate::UniqueError) {
        self.keep(Bad::Unique(e));
    }

    fn keep(&mut self, bad: Bad) {
        self.0.get_or_insert(bad);
    }

    /// `Err` with the first invalid argument; called before anything is sent.
    pub(crate) fn check(&self) -> Result<(), Error> {
        match &self.0 {
            None => Ok(()),
            Some(Bad::Name(e)) => Err(Error::Name(e.clone())),
            Some(Bad::Encode(e)) => Err(Error::Encode(e.clone())),
            Some(Bad::Delay(e)) => Err(Error::DelayTooLong(*e)),
            Some(Bad::ZeroTimeLimit) => Err(Error::ZeroTimeLimit),
            Some(Bad::Key(e)) => Err(Error::Key(e.clone())),
            Some(Bad::Unique(e)) => Err(Error::Unique(e.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_error_and_reports_it() {
        let mut inv = Invalid::default();
        assert!(inv.check().is_ok());
        assert!(inv.target("no_method").is_none());
        assert!(inv.target("Bad.name").is_none());
        match inv.check() {
            Err(Error::Name(NameError::NoMethod(n))) => assert_eq!(n, "no_method"),
            other => panic!("expected the first error, got {other:?}"),
        }
    }

    #[test]
    fn valid_arguments_pass_through() {
        let mut inv = Invalid::default();
        let t = inv.target("images.resize").map(|t| t.to_string());
        assert_eq!(t.as_deref(), Some("images.resize"));
        assert_eq!(inv.json(&7), Value::from(7));
        assert!(inv.check().is_ok());
    }
}
