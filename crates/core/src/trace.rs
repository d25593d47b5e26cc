//! W3C trace context (`traceparent`, `tracestate`) carried in AMQP headers, so a trace
//! continues across processes: a worker's task continues the trace of whatever sent it, and
//! everything the task publishes (hooks, parts, retries, callbacks, chain steps, replies,
//! dead letters, topic messages) continues it again.
//!
//! Every message warren publishes carries `traceparent` (and `tracestate` when there is
//! one), injected in the one publish path (`Outgoing`'s properties) from
//! [`TraceContext::current`]:
//!
//! 1. with the `otel` feature, the current `tracing` span's OpenTelemetry context when it has
//!    one (a `tracing-opentelemetry` layer is installed and the span is sampled or not);
//! 2. else the context of the task being handled (the worker sets it for each delivery with
//!    [`TraceContext::scope`]), or one the application set with [`TraceContext::scope`];
//! 3. else a new trace ([`TraceContext::new_root`]).
//!
//! A message that already has a `traceparent` header keeps it. The context is a tokio
//! task-local: work a handler moves to another task with `tokio::spawn` starts a new trace
//! unless it is wrapped in `TraceContext::current()`'s [`TraceContext::scope`].

use std::future::Future;
use std::sync::Arc;

use crate::amqp::HeaderValue;

/// The AMQP header holding the W3C `traceparent`.
pub const H_TRACEPARENT: &str = "traceparent";
/// The AMQP header holding the W3C `tracestate`.
pub const H_TRACESTATE: &str = "tracestate";

/// Longest `tracestate` carried (the W3C limit for its list is 32 entries of at most 256
/// bytes each; warren passes on at most this much, else drops it).
pub const MAX_TRACESTATE: usize = 512;

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// One W3C trace context: a trace id, the id of the span that is the parent of what comes
/// next, the trace flags and an optional vendor `tracestate`.
///
/// ```
/// use warren_core::trace::TraceContext;
/// let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// let cx = TraceContext::parse(tp, Some("congo=t61rcWkgMzE")).expect("valid");
/// assert_eq!(cx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert_eq!(cx.traceparent(), tp);
/// let child = cx.child();
/// assert_eq!(child.trace_id(), cx.trace_id());
/// assert_ne!(child.span_id(), cx.span_id());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
    state: Option<Arc<str>>,
}

impl std::fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.traceparent())
    }
}

impl TraceContext {
    /// A new trace (random trace and span ids, sampled flag set).
    #[must_use]
    pub fn new_root() -> Self {
        let mut trace_id = [0u8; 16];
        while trace_id == [0u8; 16] {
            trace_id = rand::random();
        }
        Self {
            trace_id,
            span_id: new_span_id(),
            flags: 0x01,
            state: None,
        }
    }

    /// The same trace with a new span id: the context of a span whose parent is `self`.
    #[must_use]
    pub fn child(&self) -> Self {
        Self {
            span_id: new_span_id(),
            ..self.clone()
        }
    }

    /// Parses a `traceparent` header (and the `tracestate` that came with it); `None` when
    /// it is not a valid W3C trace context (wrong length or version, upper-case or non-hex
    /// digits, an all-zero id). A version above `00` is read as `00` when its first four
    /// fields are well formed, as the W3C recommends.
    #[must_use]
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let tp = traceparent.trim().as_bytes();
        if tp.len() < 55 || (tp.len() > 55 && tp[55] != b'-') {
            return None;
        }
        let version = hex::<1>(&tp[0..2])?[0];
        if version == 0xff || (version == 0 && tp.len() != 55) {
            return None;
        }
        if tp[2] != b'-' || tp[35] != b'-' || tp[52] != b'-' {
            return None;
        }
        let trace_id = hex::<16>(&tp[3..35])?;
        let span_id = hex::<8>(&tp[36..52])?;
        let flags = hex::<1>(&tp[53..55])?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        let state = tracestate
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE)
            .filter(|s| s.bytes().all(|b| (0x20..0x7f).contains(&b)))
            .map(Arc::from);
        Some(Self {
            trace_id,
            span_id,
            flags,
            state,
        })
    }

    /// The context carried by a message's `traceparent` / `tracestate` header values.
    #[must_use]
    pub fn from_headers(
        traceparent: Option<&HeaderValue>,
        tracestate: Option<&HeaderValue>,
    ) -> Option<Self> {
        Self::parse(
            traceparent?.as_str()?,
            tracestate.and_then(HeaderValue::as_str),
        )
    }

    /// The trace id, 32 lower-case hex digits.
    #[must_use]
    pub fn trace_id(&self) -> String {
        to_hex(&self.trace_id)
    }

    /// The span id, 16 lower-case hex digits.
    #[must_use]
    pub fn span_id(&self) -> String {
        to_hex(&self.span_id)
    }

    /// The trace flags (bit 0: sampled).
    #[must_use]
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// The `tracestate`, if any.
    #[must_use]
    pub fn tracestate(&self) -> Option<&str> {
        self.state.as_deref()
    }

    /// The `traceparent` header value: `00-<trace id>-<span id>-<flags>`.
    #[must_use]
    pub fn traceparent(&self) -> String {
        // Written directly (every publish carries one): `format!` with two hex strings
        // cost three allocations and the formatting machinery.
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        push_hex(&mut s, &self.trace_id);
        s.push('-');
        push_hex(&mut s, &self.span_id);
        s.push('-');
        push_hex(&mut s, &[self.flags]);
        s
    }

    /// The context what is published now continues: the current span's OpenTelemetry
    /// context (feature `otel`), else the one set by [`TraceContext::scope`] (in a worker:
    /// the task's), else `None`.
    #[must_use]
    pub fn current() -> Option<Self> {
        #[cfg(feature = "otel")]
        if let Some(cx) = otel::current() {
            return Some(cx);
        }
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Runs `fut` with `self` as the current context: whatever it publishes continues this
    /// trace (unless an OpenTelemetry span is current, see [`TraceContext::current`]).
    ///
    /// ```no_run
    /// # async fn demo(client: warren_core::TaskSender, env: warren_core::Envelope) -> warren_core::Result<()> {
    /// use warren_core::trace::TraceContext;
    /// let cx = TraceContext::new_root();
    /// println!("trace {}", cx.trace_id());
    /// cx.scope(client.send(&env, None, client.deadline())).await?;
    /// # Ok(()) }
    /// ```
    pub async fn scope<F: Future>(self, fut: F) -> F::Output {
        CURRENT.scope(self, fut).await
    }

    /// With the `otel` feature, makes `span` a child of this (remote) context, so the
    /// OpenTelemetry span of a task has the sender's span as its parent; without it, does
    /// nothing.
    pub fn set_parent_of(&self, span: &tracing::Span) {
        #[cfg(feature = "otel")]
        otel::set_parent(span, self);
        #[cfg(not(feature = "otel"))]
        let _ = span;
    }

    /// The headers to add to an outgoing message: `traceparent`, and `tracestate` when
    /// there is one.
    pub(crate) fn headers(&self) -> impl Iterator<Item = (&'static str, String)> + '_ {
        std::iter::once((H_TRACEPARENT, self.traceparent()))
            .chain(self.state.as_deref().map(|s| (H_TRACESTATE, s.to_owned())))
    }
}

/// What an outgoing message without a `traceparent` header gets: the current context, else
/// a new trace.
pub(crate) fn for_outgoing() -> TraceContext {
    TraceContext::current().unwrap_or_else(TraceContext::new_root)
}

fn new_span_id() -> [u8; 8] {
    loop {
        let id: [u8; 8] = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}

fn hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    fn digit(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            _ => None,
        }
    }
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    push_hex(&mut s, bytes);
    s
}

/// Appends `bytes` as lower-case hex digits.
fn push_hex(s: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::TraceContext;

    /// The current span's OpenTelemetry context, when it has a valid one.
    pub(super) fn current() -> Option<TraceContext> {
        let cx = tracing::Span::current().context();
        let span = cx.span();
        let sc = span.span_context();
        if !sc.is_valid() {
            return None;
        }
        let state = sc.trace_state().header();
        Some(TraceContext {
            trace_id: sc.trace_id().to_bytes(),
            span_id: sc.span_id().to_bytes(),
            flags: sc.trace_flags().to_u8(),
            state: (!state.is_empty() && state.len() <= super::MAX_TRACESTATE)
                .then(|| state.into()),
        })
    }

    pub(super) fn set_parent(span: &tracing::Span, remote: &TraceContext) {
        let state = remote
            .tracestate()
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let sc = SpanContext::new(
            TraceId::from_bytes(remote.trace_id),
            SpanId::from_bytes(remote.span_id),
            TraceFlags::new(remote.flags),
            true,
            state,
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(sc);
        if let Err(e) = span.set_parent(cx) {
            tracing::debug!(error = ?e, "cannot set the task span's remote parent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_writes_back() {
        let cx = TraceContext::parse(TP, None).unwrap();
        assert_eq!(cx.traceparent(), TP);
        assert_eq!(cx.span_id(), "00f067aa0ba902b7");
        assert_eq!(cx.flags(), 1);
        assert_eq!(cx.tracestate(), None);
        let with_state = TraceContext::parse(TP, Some("rojo=00f067aa0ba902b7")).unwrap();
        assert_eq!(with_state.tracestate(), Some("rojo=00f067aa0ba902b7"));
        assert_eq!(
            with_state.headers().collect::<Vec<_>>(),
            vec![
                (H_TRACEPARENT, TP.to_owned()),
                (H_TRACESTATE, "rojo=00f067aa0ba902b7".to_owned())
            ]
        );
    }

    #[test]
    fn refuses_what_is_not_a_trace_context() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad, None).is_none(), "{bad:?}");
        }
        // A later version with more fields is read as version 00.
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever";
        assert!(TraceContext::parse(future, None).is_some());
        // A tracestate that is too long or not printable is dropped, the context kept.
        let long = "a=".to_owned() + &"b".repeat(MAX_TRACESTATE);
        assert_eq!(
            TraceContext::parse(TP, Some(&long)).unwrap().tracestate(),
            None
        );
        assert_eq!(
            TraceContext::parse(TP, Some("a=\u{1}b"))
                .unwrap()
                .tracestate(),
            None
        );
    }

    #[test]
    fn roots_and_children() {
        let root = TraceContext::new_root();
        assert!(TraceContext::parse(&root.traceparent(), None).is_some());
        let child = root.child();
        assert_eq!(child.trace_id(), root.trace_id());
        assert_ne!(child.span_id(), root.span_id());
        assert_ne!(TraceContext::new_root().trace_id(), root.trace_id());
    }

    #[tokio::test]
    async fn scope_sets_the_current_context() {
        assert!(CURRENT.try_with(|_| ()).is_err());
        let root = TraceContext::new_root();
        let seen = root.clone().scope(async { TraceContext::current() }).await;
        assert_eq!(seen, Some(root.clone()));
        assert_eq!(
            root.clone()
                .scope(async { for_outgoing() })
                .await
                .trace_id(),
            root.trace_id()
        );
        assert_ne!(for_outgoing().trace_id(), root.trace_id());
    }
}
