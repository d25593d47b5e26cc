//! Everything an [`Envelope`] carries, checked once, when it is decoded.
//!
//! A worker decodes a delivery with [`Envelope::from_bytes`], which runs [`Envelope::validate`]:
//! a task that names something warren could never publish to (a hook target, a `notify`
//! topic, a fan-out callback, a chain step, a part queue) or whose numbers are out of range
//! (attempt, part decorator, fan-out position, retry policy) is refused before any handler
//! runs, with its reason, instead of failing later at a publish that no retry can fix.
//! `docs/wire-format.md` lists the same rules for producers in other languages.

use crate::envelope::{Envelope, HookTarget};
use crate::names::{check_amqp_len, validate_name, validate_queue_name, NameError};
use crate::topology::{check_dead_queue, check_service_queue, recent_queue, PREFIX};

/// Most parts one split job (or fan-in) may have: a joiner reads every result of a job at
/// once, through one consumer whose prefetch is at most 65,535.
pub const MAX_PARTS: u32 = 65_535;

/// Checks a topic name: the rules of a method name (`[a-z0-9_.-]`, 1 to 255 bytes), and its
/// recent-messages queue name must fit in 255 bytes too.
///
/// ```
/// use warren_core::validate::validate_topic;
/// assert!(validate_topic("orders.created").is_ok());
/// assert!(validate_topic("Orders").is_err());
/// assert!(validate_topic("").is_err());
/// ```
pub fn validate_topic(topic: &str) -> Result<(), NameError> {
    validate_name("topic", topic)?;
    check_amqp_len("topic queue", &recent_queue(topic))
}

/// Checks a part queue named in a part decorator: a valid queue name that is not one of
/// warren's own (`warren.`), since the joiner deletes the part queue at the join.
pub fn validate_part_queue_name(name: &str) -> Result<(), NameError> {
    validate_queue_name(name)?;
    if name.starts_with(PREFIX) {
        return Err(NameError::Reserved {
            kind: "part queue",
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// A service name whose queue names (`warren.svc.<svc>`, `warren.dead.<svc>`) fit in 255
/// bytes.
fn service(svc: &str) -> Result<(), NameError> {
    validate_name("service", svc)?;
    check_service_queue(svc)?;
    check_dead_queue(svc)
}

fn target(what: &str, t: &HookTarget) -> Result<(), String> {
    service(&t.svc)
        .and_then(|()| validate_name("method", &t.method))
        .map_err(|e| format!("{what}: {e}"))
}

impl Envelope {
    /// Checks every field against the rules of `docs/wire-format.md`; the error says which
    /// field breaks which rule. [`Envelope::from_bytes`] calls it, so a decoded envelope is
    /// always valid.
    pub fn validate(&self) -> Result<(), String> {
        service(&self.svc).map_err(|e| e.to_string())?;
        validate_name("method", &self.method).map_err(|e| e.to_string())?;
        if self.cid.is_empty() || self.cid.len() > 255 {
            return Err("cid must be 1 to 255 bytes".to_owned());
        }
        if self.attempt == 0 {
            return Err("attempt must be at least 1".to_owned());
        }
        if let Some(key) = &self.unique {
            crate::cancel::check_unique_key(key).map_err(|e| format!("unique: {e}"))?;
        }
        if self.time_limit_ms == Some(0) {
            return Err("time_limit_ms must be at least 1".to_owned());
        }
        if let Some(key) = &self.key {
            crate::flow::validate_key(key).map_err(|e| format!("key: {e}"))?;
        }
        if let Some(t) = &self.hooks.oncomplete {
            target("hooks.oncomplete", t)?;
        }
        if let Some(t) = &self.hooks.onerror {
            target("hooks.onerror", t)?;
        }
        if let Some(topic) = &self.notify {
            validate_topic(topic).map_err(|e| format!("notify: {e}"))?;
        }
        if let Some(topic) = &self.topic {
            validate_topic(topic).map_err(|e| format!("topic: {e}"))?;
        }
        if let Some(p) = &self.part {
            validate_part_queue_name(&p.part_queue).map_err(|e| format!("part.part_queue: {e}"))?;
            if p.total_parts == 0 || p.total_parts > MAX_PARTS {
                return Err(format!(
                    "part.total_parts must be 1 to {MAX_PARTS}, not {}",
                    p.total_parts
                ));
            }
            if p.part_id >= p.total_parts {
                return Err(format!(
                    "part.part_id {} is not below part.total_parts {}",
                    p.part_id, p.total_parts
                ));
            }
        }
        if let Some(f) = &self.fanout {
            if f.total == 0 || f.index >= f.total {
                return Err(format!(
                    "fanout.index {} must be below fanout.total {} (at least 1)",
                    f.index, f.total
                ));
            }
            for t in &f.on_target {
                target("fanout.on_target", t)?;
            }
            for t in &f.on_final {
                target("fanout.on_final", t)?;
            }
            if let Some(r) = &f.retry_call {
                if r.repeats == 0 || !r.seconds.is_finite() || r.seconds < 0.0 {
                    return Err("fanout.retry_call needs repeats >= 1 and seconds >= 0".to_owned());
                }
            }
        }
        if let Some(c) = &self.chain {
            if c.steps.is_empty() || c.index as usize >= c.steps.len() {
                return Err(format!(
                    "chain.index {} must be below the number of chain.steps ({})",
                    c.index,
                    c.steps.len()
                ));
            }
            for t in &c.steps {
                target("chain.steps", t)?;
            }
        }
        if let Some(r) = &self.retry {
            if r.max_attempts == 0 {
                return Err("retry.max_attempts must be at least 1".to_owned());
            }
            if r.base_delay > r.max_delay {
                return Err("retry.base_ms must not exceed retry.max_ms".to_owned());
            }
        }
        Ok(())
    }
}

/// The `id` and `cid` of a body that is not a valid envelope, as far as they can be read:
/// a refusal is answered and dead-lettered under the task's own id when the body has one.
#[must_use]
pub fn identity(body: &[u8]) -> (Option<uuid::Uuid>, Option<String>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (None, None);
    };
    let id = v
        .get("id")
        .and_then(serde_json::Value::as_str)
        .and_then(|s| uuid::Uuid::parse_str(s).ok());
    let cid = v
        .get("cid")
        .and_then(serde_json::Value::as_str)
        .filter(|c| !c.is_empty() && c.len() <= 255)
        .map(str::to_owned);
    (id, cid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        r#"{"v":1,"id":"0192e4a0-0000-7000-8000-000000000000","cid":"c","svc":"s","method":"m""#;

    fn with(extra: &str) -> Result<Envelope, String> {
        Envelope::from_bytes(format!("{MINIMAL}{extra}}}").as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn accepts_what_the_doc_allows() {
        for ok in [
            "",
            r#","hooks":null"#,
            r#","hooks":{"oncomplete":{"svc":"a","method":"b"}}"#,
            r#","retry":{"max_attempts":2}"#,
            r#","retry":null,"parent":null,"chain":null,"part":null,"fanout":null,"notify":null"#,
            r#","part":{"part_id":0,"total_parts":1,"part_queue":"part.s-m-1"}"#,
            r#","notify":"orders.done""#,
        ] {
            assert!(with(ok).is_ok(), "{ok}: {:?}", with(ok).err());
        }
        let env = with(r#","time_limit_ms":1500"#).unwrap();
        assert_eq!(env.time_limit_ms, Some(1500));
        let env = with(r#","retry":{"max_attempts":2}"#).unwrap();
        let r = env.retry.unwrap();
        assert_eq!(r.max_attempts, 2);
        assert_eq!(r.base_delay, std::time::Duration::from_secs(1));
    }

    #[test]
    fn a_service_name_is_checked_against_its_longest_queue_name() {
        // `warren.dead.<svc>` is the longer of the two: 12 + 243 = 255 bytes fits.
        assert!(service(&"a".repeat(243)).is_ok());
        assert!(matches!(
            service(&"a".repeat(244)),
            Err(NameError::TooLong {
                kind: "dead-letter queue",
                len: 256,
                ..
            })
        ));
    }

    #[test]
    fn refuses_each_bad_field_with_its_name() {
        for (bad, says) in [
            (r#","attempt":0"#, "attempt"),
            (r#","time_limit_ms":0"#, "time_limit_ms"),
            (
                &format!(
                    r#","hooks":{{"oncomplete":{{"svc":"{}","method":"b"}}}}"#,
                    "a".repeat(245)
                ),
                "hooks.oncomplete",
            ),
            (
                r#","hooks":{"oncomplete":{"svc":"BAD NAME","method":"b"}}"#,
                "hooks.oncomplete",
            ),
            (r#","notify":"Bad Topic""#, "notify"),
            (
                r#","part":{"part_id":0,"total_parts":1,"part_queue":"amq.x"}"#,
                "part_queue",
            ),
            (
                r#","part":{"part_id":0,"total_parts":1,"part_queue":"warren.svc.s"}"#,
                "part_queue",
            ),
            (
                r#","part":{"part_id":2,"total_parts":2,"part_queue":"part.x"}"#,
                "part_id",
            ),
            (
                r#","part":{"part_id":0,"total_parts":0,"part_queue":"part.x"}"#,
                "total_parts",
            ),
            (
                r#","part":{"part_id":0,"total_parts":70000,"part_queue":"part.x"}"#,
                "total_parts",
            ),
            (r#","retry":{"max_attempts":0}"#, "max_attempts"),
            (
                r#","retry":{"max_attempts":2,"base_ms":5000,"max_ms":10}"#,
                "base_ms",
            ),
            (
                r#","fanout":{"job":"0192e4a0-0000-7000-8000-000000000000","index":1,"total":1}"#,
                "fanout.index",
            ),
            (
                r#","fanout":{"job":"0192e4a0-0000-7000-8000-000000000000","index":0,"total":1,"on_final":[{"svc":"a","method":"B"}]}"#,
                "fanout.on_final",
            ),
            (
                r#","chain":{"id":"0192e4a0-0000-7000-8000-000000000000","steps":[],"index":0,"bog":{}}"#,
                "chain.index",
            ),
            (
                r#","chain":{"id":"0192e4a0-0000-7000-8000-000000000000","steps":[{"svc":"a b","method":"c"}],"index":0,"bog":{}}"#,
                "chain.steps",
            ),
        ] {
            let err = with(bad).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn identity_of_a_bad_body() {
        let (id, cid) = identity(
            br#"{"v":1,"id":"0192e4a0-0000-7000-8000-000000000000","cid":"c9","attempt":0}"#,
        );
        assert_eq!(
            id.map(|i| i.to_string()).as_deref(),
            Some("0192e4a0-0000-7000-8000-000000000000")
        );
        assert_eq!(cid.as_deref(), Some("c9"));
        assert_eq!(identity(b"{nope"), (None, None));
        assert_eq!(identity(br#"{"id":"x","cid":""}"#), (None, None));
    }
}
