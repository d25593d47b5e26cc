//! An `arbitrary` envelope-shaped JSON value for the `structured` target: every field of the
//! envelope (and of its nested objects) is absent, `null`, of the right type or of a wrong
//! one, and strings and numbers come from the values the rules care about (names at the
//! length limits, reserved prefixes, 0, 1, 65,535, 2^32 ...). Short inputs give a valid
//! envelope (the first variant of each enum is the good one), so the fuzzer starts inside
//! validation instead of at JSON syntax.

use arbitrary::Arbitrary;
use serde_json::{Map, Value};

/// A required field: of its own type first (so that short inputs give a valid envelope), or
/// missing, `null` or of another type.
#[derive(Arbitrary, Debug)]
pub enum Field<T> {
    /// The field's own type.
    Good(T),
    /// Left out.
    Absent,
    /// `null`.
    Null,
    /// Some other JSON value.
    Wrong(Leaf),
}

/// An optional field: absent first, then of its own type, `null` or of another type.
#[derive(Arbitrary, Debug)]
pub enum Opt<T> {
    /// Left out.
    Absent,
    /// The field's own type.
    Good(T),
    /// `null`.
    Null,
    /// Some other JSON value.
    Wrong(Leaf),
}

fn put_value<T: ToJson>(
    obj: &mut Map<String, Value>,
    key: &str,
    v: Option<Option<&T>>,
    wrong: Option<&Leaf>,
) {
    let v = match (v, wrong) {
        (_, Some(l)) => l.to_json(),
        (Some(Some(t)), None) => t.to_json(),
        (Some(None), None) => Value::Null,
        (None, None) => return,
    };
    obj.insert(key.to_owned(), v);
}

impl<T: ToJson> Field<T> {
    fn put(&self, obj: &mut Map<String, Value>, key: &str) {
        match self {
            Field::Good(t) => put_value(obj, key, Some(Some(t)), None),
            Field::Absent => {}
            Field::Null => put_value::<T>(obj, key, Some(None), None),
            Field::Wrong(l) => put_value::<T>(obj, key, None, Some(l)),
        }
    }
}

impl<T: ToJson> Opt<T> {
    fn put(&self, obj: &mut Map<String, Value>, key: &str) {
        match self {
            Opt::Good(t) => put_value(obj, key, Some(Some(t)), None),
            Opt::Absent => {}
            Opt::Null => put_value::<T>(obj, key, Some(None), None),
            Opt::Wrong(l) => put_value::<T>(obj, key, None, Some(l)),
        }
    }
}

/// Turns a generated piece into JSON.
pub trait ToJson {
    /// The JSON value.
    fn to_json(&self) -> Value;
}

impl ToJson for bool {
    fn to_json(&self) -> Value {
        Value::Bool(*self)
    }
}

impl<T: ToJson> ToJson for Vec<T> {
    fn to_json(&self) -> Value {
        Value::Array(self.iter().map(ToJson::to_json).collect())
    }
}

/// A scalar or an empty container, for wrong-typed fields and payloads.
#[derive(Arbitrary, Debug)]
pub enum Leaf {
    /// A number.
    Num(Num),
    /// A string.
    Str(Str),
    /// A boolean.
    Bool(bool),
    /// `{}`.
    Obj,
    /// `[]`.
    Arr,
    /// An object of leaves.
    Map(Vec<(Str, Num)>),
}

impl ToJson for Leaf {
    fn to_json(&self) -> Value {
        match self {
            Leaf::Num(n) => n.to_json(),
            Leaf::Str(s) => s.to_json(),
            Leaf::Bool(b) => Value::Bool(*b),
            Leaf::Obj => Value::Object(Map::new()),
            Leaf::Arr => Value::Array(Vec::new()),
            Leaf::Map(kv) => {
                Value::Object(kv.iter().map(|(k, v)| (k.string(), v.to_json())).collect())
            }
        }
    }
}

/// The numbers at the edges of the rules.
const EDGES: [u64; 13] = [
    0,
    1,
    2,
    1_000,
    65_534,
    65_535,
    65_536,
    300_000,
    u32::MAX as u64 - 1,
    u32::MAX as u64,
    u32::MAX as u64 + 1,
    i64::MAX as u64,
    u64::MAX,
];

/// A position (`part_id`, `index`): 0 first, else any [`Num`].
#[derive(Arbitrary, Debug)]
pub enum Idx {
    /// 0, 1, 2 or 3.
    Small(u8),
    /// Any number.
    Num(Num),
}

impl ToJson for Idx {
    fn to_json(&self) -> Value {
        match self {
            Idx::Small(n) => Value::from(n % 4),
            Idx::Num(n) => n.to_json(),
        }
    }
}

/// A number.
#[derive(Arbitrary, Debug)]
pub enum Num {
    /// 1, 0, 2 or 3.
    Small(u8),
    /// One of [`EDGES`].
    Edge(u8),
    /// Any `u64`.
    Any(u64),
    /// Any `i64`.
    Neg(i64),
    /// Any `f64` (non-finite ones become `null`).
    Float(f64),
}

impl ToJson for Num {
    fn to_json(&self) -> Value {
        match *self {
            Num::Small(n) => Value::from([1u64, 0, 2, 3][usize::from(n % 4)]),
            Num::Edge(i) => Value::from(EDGES[usize::from(i) % EDGES.len()]),
            Num::Any(n) => Value::from(n),
            Num::Neg(n) => Value::from(n),
            Num::Float(f) => Value::from(f),
        }
    }
}

const NAME_CHARS: &[u8] = b"abcz09_.-";

/// Lengths: short ones, and the ones around each limit (`warren.svc.` + 244 = 255,
/// `warren.topic.` + 242 = 255, 255 itself).
const LENGTHS: [usize; 12] = [0, 1, 241, 242, 243, 244, 245, 246, 254, 255, 256, 300];

/// A character no name may hold.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Bad {
    /// `A`.
    Upper,
    /// A space.
    Space,
    /// `é` (two bytes).
    NonAscii,
    /// NUL.
    Nul,
    /// `/`.
    Slash,
}

impl Bad {
    fn as_str(self) -> &'static str {
        match self {
            Bad::Upper => "A",
            Bad::Space => " ",
            Bad::NonAscii => "é",
            Bad::Nul => "\0",
            Bad::Slash => "/",
        }
    }
}

/// A name: one allowed character repeated, of a short or a limit length, maybe with one bad
/// character in it.
#[derive(Arbitrary, Debug)]
pub struct NameSpec {
    ch: u8,
    at_limit: bool,
    len: u8,
    bad: Option<(u8, Bad)>,
}

impl NameSpec {
    fn string(&self) -> String {
        let len = if self.at_limit {
            LENGTHS[usize::from(self.len) % LENGTHS.len()]
        } else {
            1 + usize::from(self.len % 12)
        };
        let c = NAME_CHARS[usize::from(self.ch) % NAME_CHARS.len()] as char;
        let mut s: String = std::iter::repeat(c).take(len).collect();
        if let Some((at, bad)) = self.bad {
            if len > 0 {
                let at = usize::from(at) % len;
                s.replace_range(at..=at, bad.as_str());
            }
        }
        s
    }
}

/// A prefix with a meaning to warren or RabbitMQ.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Prefix {
    /// `part.`
    Part,
    /// `amq.`
    Amq,
    /// `warren.`
    Warren,
    /// `warren.svc.`
    WarrenSvc,
    /// `amq` (no dot)
    AmqNoDot,
    /// `Warren.`
    WarrenUpper,
}

impl Prefix {
    fn as_str(self) -> &'static str {
        match self {
            Prefix::Part => "part.",
            Prefix::Amq => "amq.",
            Prefix::Warren => "warren.",
            Prefix::WarrenSvc => "warren.svc.",
            Prefix::AmqNoDot => "amq",
            Prefix::WarrenUpper => "Warren.",
        }
    }
}

/// A string.
#[derive(Arbitrary, Debug)]
pub enum Str {
    /// A name (see [`NameSpec`]).
    Name(NameSpec),
    /// A prefix then a name.
    Prefixed(Prefix, NameSpec),
    /// A UUID, in one of its spellings.
    Uuid(Uid),
    /// Any string.
    Raw(String),
}

impl Str {
    fn string(&self) -> String {
        match self {
            Str::Name(n) => n.string(),
            Str::Prefixed(p, n) => format!("{}{}", p.as_str(), n.string()),
            Str::Uuid(u) => u.string(),
            Str::Raw(s) => s.clone(),
        }
    }
}

impl ToJson for Str {
    fn to_json(&self) -> Value {
        Value::String(self.string())
    }
}

/// A UUID string in the spellings `uuid` parses, or something close.
#[derive(Arbitrary, Debug)]
pub enum Uid {
    /// `01934f7e-6c1e-...`
    Hyphenated([u8; 16]),
    /// 32 hex digits.
    Simple([u8; 16]),
    /// `{...}`
    Braced([u8; 16]),
    /// `urn:uuid:...`
    Urn([u8; 16]),
    /// Upper-case hex.
    Upper([u8; 16]),
    /// Hyphenated, last digit cut.
    Short([u8; 16]),
}

impl Uid {
    fn string(&self) -> String {
        match self {
            Uid::Hyphenated(b) => uuid::Uuid::from_bytes(*b).hyphenated().to_string(),
            Uid::Simple(b) => uuid::Uuid::from_bytes(*b).simple().to_string(),
            Uid::Braced(b) => uuid::Uuid::from_bytes(*b).braced().to_string(),
            Uid::Urn(b) => uuid::Uuid::from_bytes(*b).urn().to_string(),
            Uid::Upper(b) => uuid::Uuid::from_bytes(*b)
                .hyphenated()
                .to_string()
                .to_uppercase(),
            Uid::Short(b) => {
                let mut s = uuid::Uuid::from_bytes(*b).hyphenated().to_string();
                s.pop();
                s
            }
        }
    }
}

impl ToJson for Uid {
    fn to_json(&self) -> Value {
        Value::String(self.string())
    }
}

/// `{"svc", "method"}`.
#[derive(Arbitrary, Debug)]
pub struct Target {
    svc: Field<Str>,
    method: Field<Str>,
}

impl ToJson for Target {
    fn to_json(&self) -> Value {
        let mut o = Map::new();
        self.svc.put(&mut o, "svc");
        self.method.put(&mut o, "method");
        Value::Object(o)
    }
}

/// `hooks`.
#[derive(Arbitrary, Debug)]
pub struct Hooks {
    oncomplete: Opt<Target>,
    onerror: Opt<Target>,
}

impl ToJson for Hooks {
    fn to_json(&self) -> Value {
        let mut o = Map::new();
        self.oncomplete.put(&mut o, "oncomplete");
        self.onerror.put(&mut o, "onerror");
        Value::Object(o)
    }
}

/// `part`.
#[derive(Arbitrary, Debug)]
pub struct Part {
    part_id: Field<Idx>,
    total_parts: Field<Num>,
    part_queue: Field<Str>,
}

impl ToJson for Part {
    fn to_json(&self) -> Value {
        let mut o = Map::new();
        self.part_id.put(&mut o, "part_id");
        self.total_parts.put(&mut o, "total_parts");
        self.part_queue.put(&mut o, "part_queue");
        Value::Object(o)
    }
}

/// `retry`.
#[derive(Arbitrary, Debug)]
pub struct Retry {
    max_attempts: Field<Num>,
    base_ms: Opt<Num>,
    max_ms: Opt<Num>,
    jitter: Opt<bool>,
    exponential: Opt<bool>,
}

impl ToJson for Retry {
    fn to_json(&self) -> Value {
        let mut o = Map::new();
        self.max_attempts.put(&mut o, "max_attempts");
        self.base_ms.put(&mut o, "base_ms");
        self.max_ms.put(&mut o, "max_ms");
        self.jitter.put(&mut o, "jitter");
        self.exponential.put(&mut o, "exponential");
        Value::Object(o)
    }
}

/// `fanout.retry_call`.
#[derive(Arbitrary, Debug)]
pub struct RetryCall {
    repeats: Field<Num>,
    seconds: Field<Num>,
    orig_cid: Opt<Str>,
    context: Opt<Leaf>,
}

impl ToJson for RetryCall {
    fn to_json(&self) -> Value {
        let mut o = Map::new();
        self.repeats.put(&mut o, "repeats");
        self.seconds.put(&mut o, "seconds");
        self.orig_cid.put(&mut o, "orig_cid");
        self.context.put(&mut o, "context");
        Value::Object(o)
    }
}

/// `fanout`.
#[derive(Arbitrary, Debug)]
pub struct FanOut {
    job: Field<Uid>,
    index: Field<Idx>,
    total: Field<Num>,
    source: Opt<Str>,
    on_target: Opt<Vec<Target>>,
    on_final: Opt<Vec<Target>>,
    retry_call: Opt<RetryCall>,
}

impl ToJson for FanOut {
    fn to_json(&self) -> Value {
        let mut o = Map::new();
        self.job.put(&mut o, "job");
        self.index.put(&mut o, "index");
        self.total.put(&mut o, "total");
        self.source.put(&mut o, "source");
        self.on_target.put(&mut o, "on_target");
        self.on_final.put(&mut o, "on_final");
        self.retry_call.put(&mut o, "retry_call");
        Value::Object(o)
    }
}

/// `chain`.
#[derive(Arbitrary, Debug)]
pub struct Chain {
    id: Field<Uid>,
    steps: Field<Vec<Target>>,
    index: Field<Idx>,
    bog: Field<Bog>,
    returned: Opt<Vec<Str>>,
}

/// A chain's bog: an object of numbers.
#[derive(Arbitrary, Debug)]
pub struct Bog(Vec<(Str, Num)>);

impl ToJson for Bog {
    fn to_json(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(k, v)| (k.string(), v.to_json()))
                .collect(),
        )
    }
}

impl ToJson for Chain {
    fn to_json(&self) -> Value {
        let mut o = Map::new();
        self.id.put(&mut o, "id");
        self.steps.put(&mut o, "steps");
        self.index.put(&mut o, "index");
        self.bog.put(&mut o, "bog");
        self.returned.put(&mut o, "returned");
        Value::Object(o)
    }
}

/// `channel`: a documented value or any string.
#[derive(Arbitrary, Debug)]
pub enum Channel {
    /// One of the documented values (and `other`).
    Known(u8),
    /// Anything.
    Any(Str),
}

const CHANNELS: [&str; 13] = [
    "enqueue",
    "invoke",
    "hook",
    "part",
    "parallel",
    "on_target",
    "on_final",
    "retry_callback",
    "retry",
    "join",
    "publish",
    "chain",
    "other",
];

impl ToJson for Channel {
    fn to_json(&self) -> Value {
        match self {
            Channel::Known(i) => Value::from(CHANNELS[usize::from(*i) % CHANNELS.len()]),
            Channel::Any(s) => s.to_json(),
        }
    }
}

/// A whole envelope.
#[derive(Arbitrary, Debug)]
pub struct Envelope {
    v: Field<Num>,
    id: Field<Uid>,
    cid: Field<Str>,
    svc: Field<Str>,
    method: Field<Str>,
    payload: Opt<Leaf>,
    hooks: Opt<Hooks>,
    channel: Opt<Channel>,
    attempt: Opt<Num>,
    parent: Opt<Uid>,
    chain: Opt<Chain>,
    part: Opt<Part>,
    created_ms: Opt<Num>,
    retry: Opt<Retry>,
    fanout: Opt<FanOut>,
    caller_retries: Opt<bool>,
    topic: Opt<Str>,
    notify: Opt<Str>,
    resent: Opt<bool>,
    /// Unknown fields (a generated key may also replace a known one).
    extra: Vec<(Str, Leaf)>,
}

impl Envelope {
    /// The JSON body.
    #[must_use]
    pub fn to_json(&self) -> Value {
        let mut o = Map::new();
        self.v.put(&mut o, "v");
        self.id.put(&mut o, "id");
        self.cid.put(&mut o, "cid");
        self.svc.put(&mut o, "svc");
        self.method.put(&mut o, "method");
        self.payload.put(&mut o, "payload");
        self.hooks.put(&mut o, "hooks");
        self.channel.put(&mut o, "channel");
        self.attempt.put(&mut o, "attempt");
        self.parent.put(&mut o, "parent");
        self.chain.put(&mut o, "chain");
        self.part.put(&mut o, "part");
        self.created_ms.put(&mut o, "created_ms");
        self.retry.put(&mut o, "retry");
        self.fanout.put(&mut o, "fanout");
        self.caller_retries.put(&mut o, "caller_retries");
        self.topic.put(&mut o, "topic");
        self.notify.put(&mut o, "notify");
        self.resent.put(&mut o, "resent");
        for (k, v) in &self.extra {
            o.insert(k.string(), v.to_json());
        }
        Value::Object(o)
    }
}
