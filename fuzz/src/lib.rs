//! What the fuzz targets check about `Envelope::from_bytes`, written from `docs/wire-format.md`
//! ("The envelope", "What a worker refuses") and not from `crates/core/src/validate.rs`, so
//! that a rule the code forgets shows up as a failed assertion.
//!
//! [`check_decode`] takes any body. It must never panic inside warren; when the body is
//! accepted, every documented rule must hold, the envelope must re-encode and decode to an
//! equal one, and `validate::identity` must read the same id and cid.
//!
//! Each rule has a short id (`svc-name`, `hook-svc-queue-len`, ...). A violated rule panics
//! with `doc rule <id> broken: ...`. `FUZZ_ALLOW=<id>,<id>` (read once; `*<suffix>` matches
//! every id ending in it) lets the named rules pass, so a long run can go past a known,
//! reported finding.

pub mod gen;

use std::sync::OnceLock;

use warren_core::{validate, Envelope};

/// `warren.svc.`: the service queue of a service is `warren.svc.<service>` (wire-format.md,
/// "Publishing a task"), and a hook is published with that queue as routing key (Split jobs).
const SERVICE_QUEUE_PREFIX: &str = "warren.svc.";
/// `warren.topic.`: a topic's recent-messages queue is `warren.topic.<topic>` (pubsub.md).
const TOPIC_QUEUE_PREFIX: &str = "warren.topic.";
/// The AMQP short-string limit every derived name must fit in.
const AMQP_MAX: usize = 255;
/// Most parts of a split job (wire-format.md: `total_parts` from 1 to 65,535).
const MAX_PARTS: u32 = 65_535;

fn allowed() -> &'static [String] {
    static ALLOW: OnceLock<Vec<String>> = OnceLock::new();
    ALLOW.get_or_init(|| {
        std::env::var("FUZZ_ALLOW")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    })
}

/// Fails the run for rule `id` unless `FUZZ_ALLOW` names it.
fn broken(id: &str, detail: &str) {
    let allows = |a: &String| match a.strip_prefix('*') {
        Some(suffix) => id.ends_with(suffix),
        None => a == id,
    };
    if allowed().iter().any(allows) {
        return;
    }
    panic!("doc rule {id} broken: {detail}");
}

fn rule(ok: bool, id: &str, detail: impl FnOnce() -> String) {
    if !ok {
        broken(id, &detail());
    }
}

/// A service or method name: `[a-z0-9_.-]`, 1 to 255 bytes.
fn is_name(s: &str) -> bool {
    (1..=AMQP_MAX).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

fn preview(s: &str) -> String {
    if s.len() <= 60 {
        format!("{s:?} ({} bytes)", s.len())
    } else {
        let cut = (0..=60).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        format!("{:?}... ({} bytes)", &s[..cut], s.len())
    }
}

/// A `{"svc", "method"}` target (a hook, a chain step, a fan-out callback): both names valid,
/// and the service queue it is published to fits in 255 bytes.
fn check_target(what: &str, svc: &str, method: &str) {
    rule(is_name(svc), &format!("{what}-svc-name"), || {
        format!(
            "{what}.svc {} is not [a-z0-9_.-] of 1-255 bytes",
            preview(svc)
        )
    });
    rule(is_name(method), &format!("{what}-method-name"), || {
        format!(
            "{what}.method {} is not [a-z0-9_.-] of 1-255 bytes",
            preview(method)
        )
    });
    rule(
        SERVICE_QUEUE_PREFIX.len() + svc.len() <= AMQP_MAX,
        &format!("{what}-svc-queue-len"),
        || {
            format!(
                "{what}.svc {} is a valid name, but its service queue `warren.svc.<svc>` is {} bytes, over 255 \
                 (wire-format.md: every AMQP name derived from a name must fit in 255 bytes)",
                preview(svc),
                SERVICE_QUEUE_PREFIX.len() + svc.len()
            )
        },
    );
}

fn check_topic(what: &str, topic: &str) {
    rule(is_name(topic), &format!("{what}-name"), || {
        format!(
            "{what} {} is not [a-z0-9_.-] of 1-255 bytes",
            preview(topic)
        )
    });
    rule(
        TOPIC_QUEUE_PREFIX.len() + topic.len() <= AMQP_MAX,
        &format!("{what}-queue-len"),
        || {
            format!(
                "{what} {}: `warren.topic.<topic>` is over 255 bytes",
                preview(topic)
            )
        },
    );
}

/// Every documented rule, checked on an envelope `from_bytes` accepted.
pub fn check_rules(env: &Envelope) {
    rule(env.v == 1, "v", || format!("v is {}, not 1", env.v));
    rule((1..=AMQP_MAX).contains(&env.cid.len()), "cid-len", || {
        format!("cid {} is not 1-255 bytes", preview(&env.cid))
    });
    check_target("task", &env.svc, &env.method);
    rule(env.attempt >= 1, "attempt", || {
        format!("attempt {} is below 1", env.attempt)
    });
    for (what, t) in [
        ("hooks.oncomplete", &env.hooks.oncomplete),
        ("hooks.onerror", &env.hooks.onerror),
    ] {
        if let Some(t) = t {
            check_target(what, &t.svc, &t.method);
        }
    }
    if let Some(t) = &env.notify {
        check_topic("notify", t);
    }
    if let Some(t) = &env.topic {
        check_topic("topic", t);
    }
    if let Some(p) = &env.part {
        rule(
            (1..=MAX_PARTS).contains(&p.total_parts),
            "part-total",
            || format!("part.total_parts {} is not 1-65535", p.total_parts),
        );
        rule(p.part_id < p.total_parts, "part-id", || {
            format!(
                "part.part_id {} is not below total_parts {}",
                p.part_id, p.total_parts
            )
        });
        let q = &p.part_queue;
        rule((1..=AMQP_MAX).contains(&q.len()), "part-queue-len", || {
            format!("part.part_queue {} is not 1-255 bytes", preview(q))
        });
        rule(
            !q.starts_with("amq.") && !q.starts_with("warren."),
            "part-queue-prefix",
            || format!("part.part_queue {} starts with amq. or warren.", preview(q)),
        );
    }
    if let Some(f) = &env.fanout {
        rule(f.total >= 1 && f.index < f.total, "fanout-index", || {
            format!("fanout.index {} / total {}", f.index, f.total)
        });
        for t in &f.on_target {
            check_target("fanout.on_target", &t.svc, &t.method);
        }
        for t in &f.on_final {
            check_target("fanout.on_final", &t.svc, &t.method);
        }
        if let Some(r) = &f.retry_call {
            rule(r.repeats >= 1, "fanout-repeats", || {
                format!("fanout.retry_call.repeats {}", r.repeats)
            });
            rule(
                r.seconds.is_finite() && r.seconds >= 0.0,
                "fanout-seconds",
                || format!("fanout.retry_call.seconds {}", r.seconds),
            );
        }
    }
    if let Some(c) = &env.chain {
        rule(
            !c.steps.is_empty() && (c.index as usize) < c.steps.len(),
            "chain-index",
            || format!("chain.index {} with {} steps", c.index, c.steps.len()),
        );
        for t in &c.steps {
            check_target("chain.steps", &t.svc, &t.method);
        }
    }
    if let Some(r) = &env.retry {
        rule(r.max_attempts >= 1, "retry-max-attempts", || {
            format!("retry.max_attempts {}", r.max_attempts)
        });
        rule(r.base_delay <= r.max_delay, "retry-base-max", || {
            format!("retry base {:?} > max {:?}", r.base_delay, r.max_delay)
        });
    }
}

/// Feeds `body` to the decoder and checks everything the fuzz targets promise (module docs).
pub fn check_decode(body: &[u8]) {
    // identity() reads the id and cid of any body, good or bad, and never panics.
    let (id, cid) = validate::identity(body);
    if let Some(c) = &cid {
        assert!(
            (1..=AMQP_MAX).contains(&c.len()),
            "identity() returned a cid of {} bytes",
            c.len()
        );
    }
    let env = match Envelope::from_bytes(body) {
        Ok(env) => env,
        Err(e) => {
            // Every refusal has a printable reason (it goes into x-warren-error).
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    if let Err(e) = env.validate() {
        broken(
            "validate",
            &format!("from_bytes accepted an envelope validate() refuses: {e}"),
        );
    }
    check_rules(&env);
    // wire-format.md: the body is JSON (UTF-8). serde_json's generic parser must read it too;
    // other consumers of the same body (identity() for a refusal, tools that show dead
    // letters, producers in other languages) parse it that way.
    let as_json = serde_json::from_slice::<serde_json::Value>(body);
    rule(as_json.is_ok(), "body-is-json", || {
        format!(
            "from_bytes accepted a body serde_json::Value refuses ({}): {}",
            as_json
                .as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default(),
            String::from_utf8_lossy(&body[..body.len().min(300)])
        )
    });
    if as_json.is_ok() {
        // A refused body is answered and dead-lettered under identity(); an accepted one
        // must read the same way, or the two paths would name one task differently.
        rule(id == Some(env.id), "identity-id", || {
            format!(
                "identity() id {id:?} differs from the decoded id {}",
                env.id
            )
        });
        rule(
            cid.as_deref() == Some(env.cid.as_str()),
            "identity-cid",
            || {
                format!(
                    "identity() cid {cid:?} differs from the decoded cid {:?}",
                    env.cid
                )
            },
        );
    }
    // Re-encoding (a retry, a re-sent part) must give back the same envelope.
    let bytes = match env.to_bytes() {
        Ok(b) => b,
        Err(e) => {
            return broken(
                "to-bytes",
                &format!("to_bytes failed on an accepted envelope: {e}"),
            )
        }
    };
    match Envelope::from_bytes(&bytes) {
        Ok(back) => rule(back == env, round_trip_rule(&env, &back), || {
            format!(
                "round trip changed the envelope:\n before {env:?}\n after  {back:?}\n bytes {}",
                String::from_utf8_lossy(&bytes)
            )
        }),
        Err(e) => broken(
            "round-trip",
            &format!(
                "re-encoded envelope refused: {e}\n bytes {}",
                String::from_utf8_lossy(&bytes)
            ),
        ),
    }
}

/// `round-trip-float` when two envelopes differ only in floats a few ULPs apart (serde_json
/// parses floats to within an ULP unless its `float_roundtrip` feature is on), else
/// `round-trip`.
fn round_trip_rule(a: &Envelope, b: &Envelope) -> &'static str {
    fn close(a: &serde_json::Value, b: &serde_json::Value) -> bool {
        use serde_json::Value as V;
        match (a, b) {
            (V::Number(x), V::Number(y)) => match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) if x.is_finite() && y.is_finite() => {
                    x.to_bits().abs_diff(y.to_bits()) <= 4
                }
                _ => x == y,
            },
            (V::Array(x), V::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(x, y)| close(x, y))
            }
            (V::Object(x), V::Object(y)) => {
                x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| close(v, w)))
            }
            _ => a == b,
        }
    }
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(x), Ok(y)) if close(&x, &y) => "round-trip-float",
        _ => "round-trip",
    }
}
