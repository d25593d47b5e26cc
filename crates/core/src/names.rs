//! Names: services, methods and the AMQP names derived from them.
//!
//! Service and method names are `[a-z0-9_.-]+`. Every AMQP name (queue, routing key, header
//! key) is at most 255 bytes: lapin panics on longer short strings, so every name is checked
//! here, at the API boundary, and an over-long name is a typed error, never a truncated name.

use std::fmt;
use std::str::FromStr;

/// The AMQP 0-9-1 limit on short strings (queue names, routing keys, header keys).
pub const MAX_AMQP_NAME: usize = 255;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("{kind} name is empty")]
    Empty {
        /// What the name names (`service`, `method`, `queue`, ...).
        kind: &'static str,
    },
    /// The name has a character outside `[a-z0-9_.-]`.
    #[error("{kind} name {name:?} has {bad:?} at byte {at}; allowed are a-z, 0-9, '_', '.', '-'")]
    BadChar {
        /// What the name names.
        kind: &'static str,
        /// The name as given.
        name: String,
        /// The first offending character.
        bad: char,
        /// Its byte offset.
        at: usize,
    },
    /// The name, or an AMQP name derived from it, is longer than 255 bytes.
    #[error("{kind} name is {len} bytes, over the AMQP limit of 255: {preview}...")]
    TooLong {
        /// What the name names.
        kind: &'static str,
        /// Its length in bytes.
        len: usize,
        /// Its first 40 characters.
        preview: String,
    },
    /// A `svc.method` target string has no `.` separating service and method.
    #[error("target {0:?} must be written `service.method`")]
    NoMethod(String),
    /// The name starts with `amq.`, which RabbitMQ reserves.
    #[error("{kind} name {name:?} starts with the reserved prefix `amq.`")]
    Reserved {
        /// What the name names.
        kind: &'static str,
        /// The name as given.
        name: String,
    },
}

/// Checks a service or method name: non-empty, `[a-z0-9_.-]`, at most 255 bytes.
pub fn validate_name(kind: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if let Some((at, bad)) = name
        .char_indices()
        .find(|(_, c)| !matches!(c, 'a'..='z' | '0'..='9' | '_' | '.' | '-'))
    {
        return Err(NameError::BadChar {
            kind,
            name: name.to_owned(),
            bad,
            at,
        });
    }
    check_amqp_len(kind, name)
}

/// Checks any AMQP short string (queue name, routing key, header key) against 255 bytes.
pub fn check_amqp_len(kind: &'static str, name: &str) -> Result<(), NameError> {
    if name.len() > MAX_AMQP_NAME {
        return Err(NameError::TooLong {
            kind,
            len: name.len(),
            preview: name.chars().take(40).collect(),
        });
    }
    Ok(())
}

/// Checks a queue name given by a user: non-empty, at most 255 bytes, not `amq.`-reserved.
pub fn validate_queue_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind: "queue" });
    }
    if name.starts_with("amq.") {
        return Err(NameError::Reserved {
            kind: "queue",
            name: name.to_owned(),
        });
    }
    check_amqp_len("queue", name)
}

/// A validated `service.method` pair: what a task asks to run.
///
/// ```
/// use warren_core::Target;
/// let t: Target = "images.resize".parse().unwrap();
/// assert_eq!((t.service(), t.method()), ("images", "resize"));
/// // Service names may hold dots; the method is after the last one.
/// let t: Target = "media.images.resize".parse().unwrap();
/// assert_eq!(t.service(), "media.images");
/// assert!("Images.resize".parse::<Target>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    svc: String,
    method: String,
}

impl Target {
    /// Builds a target from its two names, validating both and the queue name they imply.
    pub fn new(svc: impl Into<String>, method: impl Into<String>) -> Result<Self, NameError> {
        let (svc, method) = (svc.into(), method.into());
        validate_name("service", &svc)?;
        validate_name("method", &method)?;
        // The service queue name must fit too.
        crate::topology::check_service_queue(&svc)?;
        Ok(Self { svc, method })
    }

    /// The service name.
    #[must_use]
    pub fn service(&self) -> &str {
        &self.svc
    }

    /// The method name.
    #[must_use]
    pub fn method(&self) -> &str {
        &self.method
    }
}

/// Anything that names a target: `"svc.method"` (a `&str` or `String`, split at the last
/// dot) or a [`Target`] already built. Every warren call that takes a task target, a hook or
/// a callback takes `impl IntoTarget`, so the argument has one shape everywhere; an invalid
/// name is reported when the task (or chain, or parallel invoke) is sent, before anything
/// is published.
///
/// ```
/// use warren_core::{IntoTarget, Target};
/// let t = Target::new("images", "resize").unwrap();
/// assert_eq!("images.resize".into_target().unwrap(), t);
/// assert_eq!((&t).into_target().unwrap(), t);
/// assert!("images".into_target().is_err()); // no method
/// ```
pub trait IntoTarget {
    /// The validated target, or why the name is refused.
    fn into_target(self) -> Result<Target, NameError>;
}

impl IntoTarget for &str {
    fn into_target(self) -> Result<Target, NameError> {
        self.parse()
    }
}

impl IntoTarget for String {
    fn into_target(self) -> Result<Target, NameError> {
        self.parse()
    }
}

impl IntoTarget for &String {
    fn into_target(self) -> Result<Target, NameError> {
        self.parse()
    }
}

impl IntoTarget for Target {
    fn into_target(self) -> Result<Target, NameError> {
        Ok(self)
    }
}

impl IntoTarget for &Target {
    fn into_target(self) -> Result<Target, NameError> {
        Ok(self.clone())
    }
}

impl FromStr for Target {
    type Err = NameError;

    /// Parses `service.method`, splitting at the **last** dot.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (svc, method) = s
            .rsplit_once('.')
            .ok_or_else(|| NameError::NoMethod(s.to_owned()))?;
        Target::new(svc, method)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.svc, self.method)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("service", "a-b_c.9").is_ok());
        assert_eq!(
            validate_name("service", ""),
            Err(NameError::Empty { kind: "service" })
        );
        assert!(matches!(
            validate_name("method", "Resize"),
            Err(NameError::BadChar {
                bad: 'R',
                at: 0,
                ..
            })
        ));
        assert!(matches!(
            validate_name("method", "ré"),
            Err(NameError::BadChar { bad: 'é', .. })
        ));
        let long = "a".repeat(256);
        assert!(matches!(
            validate_name("service", &long),
            Err(NameError::TooLong { len: 256, .. })
        ));
        assert!(validate_name("service", &"a".repeat(255)).is_ok());
    }

    #[test]
    fn target_parse_and_limits() {
        assert!(matches!(
            "nodot".parse::<Target>(),
            Err(NameError::NoMethod(_))
        ));
        assert!(".m".parse::<Target>().is_err());
        assert!("s.".parse::<Target>().is_err());
        // a 255-byte service name is valid alone but its queue name would not fit
        let svc = "s".repeat(255);
        assert!(matches!(
            Target::new(svc, "m"),
            Err(NameError::TooLong {
                kind: "service queue",
                ..
            })
        ));
        assert!(validate_queue_name("amq.x").is_err());
    }
}
