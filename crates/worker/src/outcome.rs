//! [`TaskError`]: how a handler says a task did not succeed, and what should happen next.

use std::fmt;
use std::time::Duration;

/// What to do with a task whose handler did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Retry per the retry policy; after the last attempt, dead-letter.
    Fail,
    /// Retry after this delay (counts as an attempt).
    RetryAfter(Duration),
    /// Never retry: dead-letter now.
    Reject,
}

/// The error a handler returns. It is an explicit outcome, not a type to downcast:
///
/// - [`TaskError::fail`] (and `?` on any `std::error::Error`): retried per the
///   [`crate::RetryPolicy`], then dead-lettered and reported to the caller;
/// - [`TaskError::retry_after`]: retried after the given delay (an attempt like any other);
/// - [`TaskError::reject`]: failed for good at once, no retry (bad input, business refusal).
///
/// ```
/// use std::time::Duration;
/// use warren_worker::TaskError;
/// fn parse(s: &str) -> Result<u32, TaskError> {
///     let n: u32 = s.parse()?; // a ParseIntError becomes TaskError::fail
///     if n == 0 { return Err(TaskError::reject("zero is not allowed")); }
///     if n > 100 { return Err(TaskError::retry_after(Duration::from_secs(5), "busy")); }
///     Ok(n)
/// }
/// assert!(parse("x").is_err());
/// ```
pub struct TaskError {
    pub(crate) action: Action,
    pub(crate) message: String,
}

impl TaskError {
    /// A failure that the retry policy may retry.
    pub fn fail(message: impl fmt::Display) -> Self {
        Self {
            action: Action::Fail,
            message: message.to_string(),
        }
    }

    /// Asks for another attempt after `delay` (waiting in a durable delay queue).
    pub fn retry_after(delay: Duration, message: impl fmt::Display) -> Self {
        Self {
            action: Action::RetryAfter(delay),
            message: message.to_string(),
        }
    }

    /// A failure that no retry can fix: dead-lettered at once.
    pub fn reject(message: impl fmt::Display) -> Self {
        Self {
            action: Action::Reject,
            message: message.to_string(),
        }
    }

    /// The message.
    #[must_use]
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Debug for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskError({:?}: {})", self.action, self.message)
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Any error becomes a retryable failure whose message is the whole cause chain.
impl<E: std::error::Error + Send + Sync + 'static> From<E> for TaskError {
    fn from(e: E) -> Self {
        let mut message = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            message.push_str(": ");
            message.push_str(&s.to_string());
            src = s.source();
        }
        Self::fail(message)
    }
}
