//! Messages in warren's terms, converted to and from lapin's at the edge.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

use crate::names::{check_amqp_len, NameError};
use crate::topology::H_RESENT;
use crate::trace::H_TRACEPARENT;

/// A header value. AMQP tables hold more types; the ones warren writes are these, and any
/// other value read from a message is shown as [`HeaderValue::Other`] (its debug text).
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderValue {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// An array of strings (sent as an AMQP array of long strings; e.g. RabbitMQ's `BCC`
    /// header for sender-selected distribution).
    StrList(Vec<String>),
    /// Anything else (tables, arrays, floats, ...), as text.
    Other(String),
}

impl HeaderValue {
    /// The value as a string, if it is one.
    #[must_use]
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an integer, if it is one.
    #[must_use]
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Self::Int(i) => Some(*i),
            _ => None,
        }
    }
}

impl From<&AMQPValue> for HeaderValue {
    fn from(v: &AMQPValue) -> Self {
        match v {
            AMQPValue::LongString(s) => Self::Str(String::from_utf8_lossy(s.as_bytes()).into()),
            AMQPValue::ShortString(s) => Self::Str(s.as_str().to_owned()),
            AMQPValue::Boolean(b) => Self::Bool(*b),
            AMQPValue::ShortShortInt(i) => Self::Int(i64::from(*i)),
            AMQPValue::ShortShortUInt(i) => Self::Int(i64::from(*i)),
            AMQPValue::ShortInt(i) => Self::Int(i64::from(*i)),
            AMQPValue::ShortUInt(i) => Self::Int(i64::from(*i)),
            AMQPValue::LongInt(i) => Self::Int(i64::from(*i)),
            AMQPValue::LongUInt(i) => Self::Int(i64::from(*i)),
            AMQPValue::LongLongInt(i) => Self::Int(*i),
            AMQPValue::Timestamp(t) => Self::Int(i64::try_from(*t).unwrap_or(i64::MAX)),
            other => Self::Other(format!("{other:?}")),
        }
    }
}

impl From<&HeaderValue> for AMQPValue {
    fn from(v: &HeaderValue) -> Self {
        match v {
            HeaderValue::Str(s) | HeaderValue::Other(s) => {
                AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
            }
            HeaderValue::Int(i) => AMQPValue::LongLongInt(*i),
            HeaderValue::Bool(b) => AMQPValue::Boolean(*b),
            HeaderValue::StrList(list) => AMQPValue::FieldArray(
                list.iter()
                    .map(|s| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())))
                    .collect::<Vec<_>>()
                    .into(),
            ),
        }
    }
}

/// A message to publish. Every warren publish is mandatory and confirmed; `persistent`
/// chooses delivery mode 2 (kept across broker restarts on durable queues).
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Exchange (`""` for the default exchange).
    pub exchange: String,
    /// Routing key (a queue name on the default exchange).
    pub routing_key: String,
    /// Body bytes (JSON for warren's own messages).
    pub body: Vec<u8>,
    /// `message_id` property (warren: the task id).
    pub message_id: Option<String>,
    /// `correlation_id` property (warren: the cid).
    pub correlation_id: Option<String>,
    /// `reply_to` property.
    pub reply_to: Option<String>,
    /// Headers.
    pub headers: Vec<(String, HeaderValue)>,
    /// Delivery mode 2 when `true`.
    pub persistent: bool,
    /// Per-message TTL in ms (`expiration`).
    pub expiration_ms: Option<u64>,
    /// AMQP `priority` property (a task's `Task::priority`; only a queue declared with
    /// `x-max-priority` orders by it).
    pub priority: Option<u8>,
}

impl Outgoing {
    /// A persistent JSON message to `exchange` / `routing_key`.
    #[must_use]
    pub fn new(exchange: impl Into<String>, routing_key: impl Into<String>, body: Vec<u8>) -> Self {
        Self {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            body,
            message_id: None,
            correlation_id: None,
            reply_to: None,
            headers: Vec::new(),
            persistent: true,
            expiration_ms: None,
            priority: None,
        }
    }

    /// Marks the message as one the broker may already hold a copy of (header
    /// `warren-resent: true`, set once), which the worker shows as `ctx.redelivered()`.
    pub fn mark_resent(&mut self) {
        self.headers.retain(|(k, _)| k != H_RESENT);
        self.headers
            .push((H_RESENT.to_owned(), HeaderValue::Bool(true)));
    }

    /// Checks every short string against the 255-byte AMQP limit (lapin would panic).
    pub(crate) fn validate(&self) -> Result<(), NameError> {
        check_amqp_len("exchange", &self.exchange)?;
        check_amqp_len("routing key", &self.routing_key)?;
        for (kind, v) in [
            ("message id", &self.message_id),
            ("correlation id", &self.correlation_id),
            ("reply-to", &self.reply_to),
        ] {
            if let Some(v) = v {
                check_amqp_len(kind, v)?;
            }
        }
        for (k, _) in &self.headers {
            check_amqp_len("header key", k)?;
        }
        Ok(())
    }

    /// lapin properties; call only after [`Outgoing::validate`].
    pub(crate) fn properties(&self) -> BasicProperties {
        self.properties_in(&crate::trace::for_outgoing())
    }

    /// [`Outgoing::properties`] continuing `trace` (when the message carries no trace of its
    /// own): a publish that is sent again keeps its first attempt's trace.
    pub(crate) fn properties_in(&self, trace: &crate::trace::TraceContext) -> BasicProperties {
        let mut p = BasicProperties::default()
            .with_content_type(short("application/json"))
            .with_delivery_mode(if self.persistent { 2 } else { 1 });
        if let Some(id) = &self.message_id {
            p = p.with_message_id(short(id));
        }
        if let Some(c) = &self.correlation_id {
            p = p.with_correlation_id(short(c));
        }
        if let Some(r) = &self.reply_to {
            p = p.with_reply_to(short(r));
        }
        if let Some(ms) = self.expiration_ms {
            p = p.with_expiration(short(&ms.to_string()));
        }
        if let Some(prio) = self.priority {
            p = p.with_priority(prio);
        }
        let mut t = FieldTable::default();
        for (k, v) in &self.headers {
            t.insert(short(k), v.into());
        }
        // Every message continues (or starts) a trace, unless it carries one already
        // (crate::trace).
        if !self.headers.iter().any(|(k, _)| k == H_TRACEPARENT) {
            for (k, v) in trace.headers() {
                t.insert(
                    short(k),
                    AMQPValue::LongString(LongString::from(v.into_bytes())),
                );
            }
        }
        p.with_headers(t)
    }
}

/// A short string from a value already checked to be at most 255 bytes.
pub(crate) fn short(s: &str) -> ShortString {
    ShortString::from(s)
}

/// Reads headers from lapin properties.
/// The property and header accessors of a received message type with a `props:
/// BasicProperties` field (deliveries and held messages share them).
macro_rules! property_accessors {
    () => {
        /// `message_id` property.
        #[must_use]
        pub fn message_id(&self) -> Option<&str> {
            self.props.message_id().as_ref().map(|s| s.as_str())
        }

        /// `correlation_id` property.
        #[must_use]
        pub fn correlation_id(&self) -> Option<&str> {
            self.props.correlation_id().as_ref().map(|s| s.as_str())
        }

        /// `reply_to` property.
        #[must_use]
        pub fn reply_to(&self) -> Option<&str> {
            self.props.reply_to().as_ref().map(|s| s.as_str())
        }

        /// AMQP `priority` property.
        #[must_use]
        pub fn priority(&self) -> Option<u8> {
            *self.props.priority()
        }

        /// All headers.
        #[must_use]
        pub fn headers(&self) -> Vec<(String, $crate::amqp::HeaderValue)> {
            $crate::amqp::message::read_headers(&self.props)
        }

        /// One header.
        #[must_use]
        pub fn header(&self, key: &str) -> Option<$crate::amqp::HeaderValue> {
            self.props
                .headers()
                .as_ref()
                .and_then(|t| t.inner().get(key).map($crate::amqp::HeaderValue::from))
        }
    };
}
pub(crate) use property_accessors;

pub(crate) fn read_headers(p: &BasicProperties) -> Vec<(String, HeaderValue)> {
    p.headers()
        .as_ref()
        .map(|t| {
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), HeaderValue::from(v)))
                .collect()
        })
        .unwrap_or_default()
}
