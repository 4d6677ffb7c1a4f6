//! `request-id`: give every request an id, passed to the upstream and sent
//! back to the client.
//!
//! Mirrors APISIX 3.18's plugin of the same name (priority 12015, rewrite
//! and header_filter phases):
//!
//! ```json
//! {"header_name": "X-Request-Id", "include_in_response": true, "algorithm": "uuid"}
//! ```
//!
//! - A request that already carries a non-empty `header_name` keeps its
//!   value; otherwise one is generated and set on the request.
//! - `algorithm`: `uuid` (random v4, lower case, the default), `uuidv7`
//!   (time-ordered), `nanoid` (21 URL-safe characters), `ksuid` (27 base62
//!   characters, time-ordered), `range_id` (`range_id.length` characters,
//!   default 16, drawn from `range_id.char_set`, default APISIX's 62).
//! - With `include_in_response` (default true) the response gets the id
//!   too, unless it already has a non-empty value for that header (an
//!   upstream's own id wins), including answers the gateway gave itself.
//!
//! Ids come from the operating system's random source through `rand`'s
//! thread-local generator: nothing is shared between requests but the
//! uuidv7 counter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use http::header::HeaderName;
use http::{request, response, HeaderValue};
use rand::{Rng, RngCore};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::ctx::Ctx;
use crate::plugin::{CompileCx, Flow, Phases, Plugin, PluginSpec, SchemaType};
use crate::registry::cached;
use crate::schema::Schema;

pub const NAME: &str = "request-id";
pub const PRIORITY: i32 = 12015;
pub const DEFAULT_HEADER: &str = "X-Request-Id";
/// APISIX's default `range_id.char_set`, typo included (no `J`, `G` twice):
/// ids must look the same on both gateways.
pub const DEFAULT_CHAR_SET: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIGKLMNOPQRSTUVWXYZ0123456789";
/// Longest `range_id.length` accepted: nginx's default limit for one
/// request header line (`large_client_header_buffers`, 8 KiB).
const MAX_RANGE_ID_LENGTH: u64 = 8192;
const ALGORITHMS: &[&str] = &["uuid", "nanoid", "range_id", "ksuid", "uuidv7"];
const NANOID_ALPHABET: &[u8; 64] =
    b"-_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// KSUID's epoch (2014-05-13T16:53:20Z).
const KSUID_EPOCH: u64 = 1_400_000_000;

/// How ids are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    #[default]
    Uuid,
    Uuidv7,
    Nanoid,
    Ksuid,
    RangeId,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RangeIdConf {
    #[serde(default = "default_length")]
    pub length: usize,
    #[serde(default = "default_char_set")]
    pub char_set: String,
}

impl Default for RangeIdConf {
    fn default() -> Self {
        RangeIdConf {
            length: default_length(),
            char_set: default_char_set(),
        }
    }
}

fn default_length() -> usize {
    16
}

fn default_char_set() -> String {
    DEFAULT_CHAR_SET.to_string()
}

fn default_header() -> String {
    DEFAULT_HEADER.to_string()
}

fn yes() -> bool {
    true
}

/// The plugin configuration, with APISIX's names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct RequestIdConf {
    #[serde(default = "default_header")]
    pub header_name: String,
    #[serde(default = "yes")]
    pub include_in_response: bool,
    #[serde(default)]
    pub algorithm: Algorithm,
    #[serde(default)]
    pub range_id: RangeIdConf,
}

fn check_algorithm(v: &Value) -> Result<(), String> {
    Schema::string().enumerated(ALGORITHMS).done().validate(v)
}

fn build_schema() -> Schema {
    Schema::object()
        .prop(
            "header_name",
            Schema::Custom(
                |v| Schema::string().done().validate(v),
                || json!({"type": "string", "default": DEFAULT_HEADER}),
            ),
        )
        .prop(
            "include_in_response",
            Schema::Custom(
                |v| Schema::Boolean.validate(v),
                || json!({"type": "boolean", "default": true}),
            ),
        )
        .prop(
            "algorithm",
            Schema::Custom(
                check_algorithm,
                || json!({"type": "string", "enum": ALGORITHMS, "default": "uuid"}),
            ),
        )
        .prop(
            "range_id",
            Schema::object()
                .prop(
                    "length",
                    Schema::Custom(
                        // APISIX sets no maximum; a length no header could
                        // carry would only exhaust memory on each request.
                        |v| {
                            Schema::integer()
                                .min(6.0)
                                .max(MAX_RANGE_ID_LENGTH as f64)
                                .int()
                                .validate(v)
                        },
                        || json!({"type": "integer", "minimum": 6, "maximum": MAX_RANGE_ID_LENGTH, "default": 16}),
                    ),
                )
                .prop(
                    "char_set",
                    Schema::Custom(
                        |v| Schema::string().min(6).done().validate(v),
                        || json!({"type": "string", "minLength": 6, "default": DEFAULT_CHAR_SET}),
                    ),
                )
                .done(),
        )
        .done()
}

/// The configuration schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

/// The compiled plugin.
pub struct RequestId {
    header: HeaderName,
    include_in_response: bool,
    algorithm: Algorithm,
    length: usize,
    char_set: Vec<char>,
}

/// The ids this request was given, one per header name (a global rule and
/// a route may each set their own).
#[derive(Clone, Default)]
struct Given(Vec<(HeaderName, HeaderValue)>);

pub fn compile(conf: &Value) -> Result<RequestId, String> {
    let conf = RequestIdConf::deserialize(conf).map_err(|e| e.to_string())?;
    let header = HeaderName::from_bytes(conf.header_name.as_bytes())
        .map_err(|_| format!("invalid header_name: {}", conf.header_name))?;
    let char_set: Vec<char> = conf.range_id.char_set.chars().collect();
    if char_set.is_empty() {
        return Err("range_id.char_set is empty".into());
    }
    Ok(RequestId {
        header,
        include_in_response: conf.include_in_response,
        algorithm: conf.algorithm,
        length: conf.range_id.length,
        char_set,
    })
}

impl RequestId {
    /// A fresh id.
    pub fn generate(&self) -> String {
        let mut rng = rand::rng();
        match self.algorithm {
            Algorithm::Uuid => {
                let mut b = [0u8; 16];
                rng.fill_bytes(&mut b);
                b[6] = (b[6] & 0x0f) | 0x40;
                b[8] = (b[8] & 0x3f) | 0x80;
                uuid_text(&b)
            }
            Algorithm::Uuidv7 => uuidv7(&mut rng),
            Algorithm::Nanoid => (0..21)
                .map(|_| NANOID_ALPHABET[(rng.next_u32() & 63) as usize] as char)
                .collect(),
            Algorithm::Ksuid => ksuid(&mut rng),
            Algorithm::RangeId => (0..self.length)
                .map(|_| self.char_set[rng.random_range(0..self.char_set.len())])
                .collect(),
        }
    }
}

fn uuid_text(b: &[u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// RFC 9562 version 7: 48 bits of Unix milliseconds, then a 12-bit counter
/// that keeps ids of the same millisecond in order, then random bits.
fn uuidv7(rng: &mut impl RngCore) -> String {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    // (milliseconds << 12) | counter, never going backwards.
    let mut prev = LAST.load(Ordering::Relaxed);
    let stamp = loop {
        let next = (now << 12).max(prev + 1);
        match LAST.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => break next,
            Err(seen) => prev = seen,
        }
    };
    let millis = stamp >> 12;
    let counter = (stamp & 0xfff) as u16;
    let mut b = [0u8; 16];
    rng.fill_bytes(&mut b);
    b[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
    b[6] = 0x70 | ((counter >> 8) as u8 & 0x0f);
    b[7] = counter as u8;
    b[8] = (b[8] & 0x3f) | 0x80;
    uuid_text(&b)
}

/// A KSUID: 4 bytes of seconds since its epoch and 16 random bytes, as 27
/// base62 digits.
fn ksuid(rng: &mut impl RngCore) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .saturating_sub(KSUID_EPOCH) as u32;
    let mut bytes = [0u8; 20];
    bytes[..4].copy_from_slice(&secs.to_be_bytes());
    rng.fill_bytes(&mut bytes[4..]);
    base62_27(bytes)
}

/// A 160-bit number as 27 base62 digits, most significant first.
fn base62_27(mut n: [u8; 20]) -> String {
    let mut digits = [0u8; 27];
    for slot in digits.iter_mut().rev() {
        let mut rem = 0u32;
        for byte in n.iter_mut() {
            let acc = (rem << 8) | u32::from(*byte);
            *byte = (acc / 62) as u8;
            rem = acc % 62;
        }
        *slot = BASE62[rem as usize];
    }
    digits.iter().map(|&d| d as char).collect()
}

impl Plugin for RequestId {
    fn phases(&self) -> Phases {
        if self.include_in_response {
            Phases::REWRITE | Phases::HEADER_FILTER
        } else {
            Phases::REWRITE
        }
    }

    fn rewrite(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        let id = match req.headers.get(&self.header).filter(|v| !v.is_empty()) {
            Some(v) => v.clone(),
            None => {
                let Ok(v) = HeaderValue::from_str(&self.generate()) else {
                    return Flow::Continue;
                };
                req.headers.insert(self.header.clone(), v.clone());
                v
            }
        };
        if self.include_in_response {
            let given = ctx.data.get_or_insert_default::<Given>();
            given.0.retain(|(name, _)| name != self.header);
            given.0.push((self.header.clone(), id));
        }
        Flow::Continue
    }

    fn header_filter(&self, ctx: &mut Ctx, resp: &mut response::Parts) {
        if resp
            .headers
            .get(&self.header)
            .is_some_and(|v| !v.is_empty())
        {
            return;
        }
        let id = ctx
            .data
            .get::<Given>()
            .and_then(|g| g.0.iter().find(|(name, _)| *name == self.header))
            .map(|(_, v)| v.clone());
        if let Some(id) = id {
            resp.headers.insert(self.header.clone(), id);
        }
    }
}

pub struct RequestIdSpec;

impl PluginSpec for RequestIdSpec {
    fn name(&self) -> &'static str {
        NAME
    }

    fn priority(&self) -> i32 {
        PRIORITY
    }

    fn schema(&self) -> &'static Schema {
        schema()
    }

    fn check(&self, conf: &Value, _target: SchemaType) -> Result<(), String> {
        schema().validate(conf)
    }

    fn compile(&self, conf: &Value, _cx: &CompileCx<'_>) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(compile(conf)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::ConsumerIndex;
    use crate::registry;
    use crate::testing;

    fn reason(conf: Value) -> String {
        testing::refusal(NAME, &conf)
    }

    fn is_uuid(s: &str, version: char) -> bool {
        let b = s.as_bytes();
        s.len() == 36
            && [8, 13, 18, 23].iter().all(|&i| b[i] == b'-')
            && b[14] as char == version
            && matches!(b[19], b'8' | b'9' | b'a' | b'b')
            && s.chars()
                .all(|c| c == '-' || c.is_ascii_digit() || ('a'..='f').contains(&c))
    }

    fn ids(conf: Value) -> Vec<String> {
        let p = compile(&conf).unwrap();
        (0..200).map(|_| p.generate()).collect()
    }

    #[test]
    fn schema_defaults_and_errors() {
        let spec = registry::find(NAME).unwrap();
        assert_eq!(spec.priority(), 12015);
        let conf = RequestIdConf::deserialize(&json!({})).unwrap();
        assert_eq!(conf.header_name, "X-Request-Id");
        assert!(conf.include_in_response);
        assert_eq!(conf.algorithm, Algorithm::Uuid);
        assert_eq!(conf.range_id.length, 16);
        let partial = RequestIdConf::deserialize(&json!({"range_id": {"length": 8}})).unwrap();
        assert_eq!(partial.range_id.char_set, DEFAULT_CHAR_SET);
        assert_eq!(
            reason(json!({"algorithm": "snowflake"})),
            "property \"algorithm\" validation failed: matches none of the enum values"
        );
        assert_eq!(
            reason(json!({"include_in_response": "yes"})),
            "property \"include_in_response\" validation failed: wrong type: expected boolean, got string"
        );
        assert!(reason(json!({"range_id": {"length": 5}})).contains("length"));
        assert!(
            reason(json!({"range_id": {"length": 1_000_000_000_000u64}})).contains("length"),
            "a length no header could carry is refused"
        );
        assert!(compile(&json!({"range_id": {"length": 8192}})).is_ok());
        assert_eq!(
            schema().to_json()["properties"]["algorithm"]["default"],
            "uuid"
        );
    }

    #[test]
    fn every_algorithm_has_its_shape() {
        let uuids = ids(json!({}));
        assert!(uuids.iter().all(|u| is_uuid(u, '4')), "{:?}", &uuids[..2]);
        assert_ne!(uuids[0], uuids[1]);
        let v7 = ids(json!({"algorithm": "uuidv7"}));
        assert!(v7.iter().all(|u| is_uuid(u, '7')), "{:?}", &v7[..2]);
        assert!(v7.windows(2).all(|w| w[0] < w[1]), "uuidv7 ids are ordered");
        let nano = ids(json!({"algorithm": "nanoid"}));
        assert!(nano
            .iter()
            .all(|n| n.len() == 21 && n.bytes().all(|c| NANOID_ALPHABET.contains(&c))));
        let ks = ids(json!({"algorithm": "ksuid"}));
        assert!(ks
            .iter()
            .all(|k| k.len() == 27 && k.bytes().all(|c| c.is_ascii_alphanumeric())));
        let range =
            ids(json!({"algorithm": "range_id", "range_id": {"length": 6, "char_set": "abcdef"}}));
        assert!(range
            .iter()
            .all(|r| r.len() == 6 && r.chars().all(|c| ('a'..='f').contains(&c))));
        assert_eq!(ids(json!({"algorithm": "range_id"}))[0].len(), 16);
    }

    #[tokio::test]
    async fn sets_keeps_and_answers() {
        let set = testing::compile(&json!({NAME: {}})).unwrap();
        let chain = testing::chain(Vec::new(), set, ConsumerIndex::default());
        let a = testing::send(chain.clone(), testing::request("127.0.0.1", "/", &[])).await;
        let sent = a.json()["headers"]["x-request-id"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(is_uuid(&sent, '4'));
        assert_eq!(a.headers["x-request-id"], sent.as_str());
        // A client's own id is kept, upstream and back.
        let b = testing::send(
            chain,
            testing::request("127.0.0.1", "/", &[("x-request-id", "abc-123")]),
        )
        .await;
        assert_eq!(b.json()["headers"]["x-request-id"], "abc-123");
        assert_eq!(b.headers["x-request-id"], "abc-123");

        let quiet = testing::compile(
            &json!({NAME: {"header_name": "X-Trace-Id", "include_in_response": false}}),
        )
        .unwrap();
        let chain = testing::chain(Vec::new(), quiet, ConsumerIndex::default());
        let c = testing::send(chain, testing::request("127.0.0.1", "/", &[])).await;
        assert!(is_uuid(
            c.json()["headers"]["x-trace-id"].as_str().unwrap(),
            '4'
        ));
        assert!(c.headers.get("x-trace-id").is_none());
        assert!(c.json()["headers"].get("x-request-id").is_none());
    }

    #[test]
    fn ksuid_encodes_160_bits_in_27_digits() {
        // The smallest and largest KSUIDs of the specification.
        assert_eq!(base62_27([0; 20]), "000000000000000000000000000");
        assert_eq!(base62_27([0xff; 20]), "aWgEPTl1tmebfsQzFP4bxwgy80V");
    }
}
