//! `limit-count`: at most `count` requests per `time_window` seconds per
//! key, in fixed windows.
//!
//! Mirrors APISIX 3.18's plugin of the same name (priority 1002, access
//! phase; the quota headers are added in header_filter):
//!
//! ```json
//! {"count": 100, "time_window": 60, "key_type": "var", "key": "remote_addr",
//!  "rejected_code": 429, "rejected_msg": "slow down"}
//! ```
//!
//! - The key: `key_type` `var` (default; `key` is a variable name, default
//!   `remote_addr`), `var_combination` (`key` is a `$var` template) or
//!   `constant`. A variable the request does not have (or a combination
//!   with none) falls back to `remote_addr`, as in APISIX.
//! - A window starts with the first request of a key and lasts
//!   `time_window` seconds. Past `count`, requests get `rejected_code`
//!   (default 503) with `{"error_msg": rejected_msg}` when set, else an
//!   empty body.
//! - `show_limit_quota_header` (default true): `X-RateLimit-Limit`,
//!   `X-RateLimit-Remaining` (0 when rejected) and `X-RateLimit-Reset`
//!   (`time_window` on the first request of a window, then the seconds
//!   left, to 1/100 s). `plugin_metadata/limit-count` can rename them
//!   (`limit_header`, `remaining_header`, `reset_header`).
//! - `count` / `time_window` may be strings holding `$var`s, resolved per
//!   request; `rules` (`[{count, time_window, key, header_prefix}]`)
//!   applies several limits, each keyed by its `key` template (a rule
//!   whose key resolves nothing does not apply) and reporting under
//!   `X-{header_prefix}-RateLimit-*` (default prefix: the rule's index).
//! - `group`: every route with the same group shares one set of counters.
//! - `allow_degradation`: a limit that cannot be evaluated lets the
//!   request through instead of answering 500.
//! - `policy` `local` (default): counters in this process, in the plugin
//!   state ([`CompileCx::state`]): they survive unrelated configuration
//!   changes and start over when this plugin's configuration changes
//!   (APISIX keys them by the plugin's conf version). Expired windows are
//!   swept as the map grows, so it stays bounded by the keys seen within a
//!   window.
//! - `policy` `redis` / `redis-cluster` ([`crate::redis_policy`]): one
//!   counter per key in Redis, shared by every node, under APISIX's key
//!   `plugin-limit-count:v1:{/apisix/routes/1}:{conf_version}:{key}` (or
//!   `plugin-limit-count:v1:{group}:{key}`), counted and given its expiry
//!   in one script run. Rejected requests count too, as APISIX's script
//!   does. Redis failing or slower than `redis_timeout`: 500
//!   `{"error_msg": "failed to limit count"}`, or the rule is skipped with
//!   `allow_degradation`.
//! - `redis-sentinel` passes APISIX's schema but is refused by the check
//!   (so the Admin API answers 400 instead of storing what would never
//!   apply); so is `window_type: sliding`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, LazyLock, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use http::header::HeaderName;
use http::{request, response, HeaderValue, StatusCode};
use serde_json::{json, Value};

use crate::ctx::Ctx;
use crate::expr::Vars;
use crate::limit_key::{entry_bytes, make_room, LOCAL_STATE_BYTES};
use crate::plugin::{CompileCx, Flow, Phases, Plugin, PluginSpec, SchemaType};
use crate::redis_policy::{self, Redis, RedisConf};
use crate::registry::cached;
use crate::rejection::Rejection;
use crate::schema::Schema;
use crate::template::{Escape, Template};

pub const NAME: &str = "limit-count";
pub const PRIORITY: i32 = 1002;
pub const DEFAULT_LIMIT_HEADER: &str = "X-RateLimit-Limit";
pub const DEFAULT_REMAINING_HEADER: &str = "X-RateLimit-Remaining";
pub const DEFAULT_RESET_HEADER: &str = "X-RateLimit-Reset";
/// `rejected_code` unless configured.
pub const DEFAULT_REJECTED_CODE: u16 = 503;
/// `sync_interval`'s "no delayed sync".
const NO_DELAYED_SYNC: f64 = -1.0;
/// Largest integer a Lua number holds exactly (2^53 - 1).
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

fn positive_or_string() -> Schema {
    Schema::OneOf(vec![
        Schema::integer().greater_than(0.0).int(),
        Schema::string().done(),
    ])
}

fn build_base() -> Schema {
    let rule = Schema::object()
        .required(&["count", "time_window", "key"])
        .prop("count", positive_or_string())
        .prop("time_window", positive_or_string())
        .prop("key", Schema::string().done())
        .prop("header_prefix", Schema::string().done())
        .done();
    Schema::object()
        .prop("count", positive_or_string())
        .prop("time_window", positive_or_string())
        .prop(
            "window_type",
            Schema::string().enumerated(&["fixed", "sliding"]).done(),
        )
        .prop("rules", Schema::array(rule).done())
        .prop("group", Schema::string().done())
        .prop("key", Schema::string().done())
        .prop(
            "key_type",
            Schema::string()
                .enumerated(&["var", "var_combination", "constant"])
                .done(),
        )
        .prop(
            "rejected_code",
            Schema::integer().min(200.0).max(599.0).int(),
        )
        .prop("rejected_msg", Schema::string().min(1).done())
        .prop(
            "policy",
            Schema::string()
                .enumerated(&["local", "redis", "redis-cluster", "redis-sentinel"])
                .done(),
        )
        .prop("allow_degradation", Schema::Boolean)
        .prop("show_limit_quota_header", Schema::Boolean)
        .prop("sync_interval", Schema::integer().number())
        .one_of_required(&[&["count", "time_window"], &["rules"]])
        .done()
}

fn build_redis_sentinel() -> Schema {
    let sentinel = Schema::object()
        .required(&["host", "port"])
        .no_additional()
        .prop("host", Schema::string().min(2).done())
        .prop("port", Schema::integer().min(1.0).max(65535.0).int())
        .done();
    Schema::object()
        .required(&["redis_sentinels", "redis_master_name"])
        .prop("redis_sentinels", Schema::array(sentinel).min(1).done())
        .prop("redis_master_name", Schema::string().min(1).done())
        .prop(
            "redis_role",
            Schema::string().enumerated(&["master", "slave"]).done(),
        )
        .prop("redis_connect_timeout", Schema::integer().min(1.0).int())
        .prop("redis_read_timeout", Schema::integer().min(1.0).int())
        .prop("redis_keepalive_timeout", Schema::integer().min(1.0).int())
        .prop("redis_database", Schema::integer().min(0.0).int())
        .prop("redis_username", Schema::string().min(1).done())
        .prop("redis_password", Schema::string().min(0).done())
        .prop("sentinel_username", Schema::string().min(1).done())
        .prop("sentinel_password", Schema::string().min(0).done())
        .done()
}

fn base() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_base)
}

/// The schemas `policy` brings in: `redis`, `redis-cluster`,
/// `redis-sentinel`.
fn policy_schemas() -> &'static [Schema; 3] {
    static CELL: OnceLock<[Schema; 3]> = OnceLock::new();
    CELL.get_or_init(|| {
        [
            redis_policy::single_schema(false),
            redis_policy::cluster_schema(false),
            build_redis_sentinel(),
        ]
    })
}

/// The base schema, then its `if policy == redis then ... else if ...`
/// chain, reported as jsonschema does.
fn validate_top(conf: &Value) -> Result<(), String> {
    base().validate(conf)?;
    let [redis, cluster, sentinel] = policy_schemas();
    match conf.get("policy").and_then(Value::as_str) {
        Some("redis") => redis
            .validate(conf)
            .map_err(|_| "then clause did not match".to_string()),
        Some("redis-cluster") => cluster
            .validate(conf)
            .map_err(|_| "else clause did not match".to_string()),
        Some("redis-sentinel") => sentinel
            .validate(conf)
            .map_err(|_| "else clause did not match".to_string()),
        _ => Ok(()),
    }
}

fn doc_top() -> Value {
    let [redis, cluster, sentinel] = policy_schemas();
    let when = |p: &str| json!({"properties": {"policy": {"enum": [p]}}});
    let mut doc = base().to_json();
    if let Some(map) = doc.as_object_mut() {
        map.insert("if".into(), when("redis"));
        map.insert("then".into(), redis.to_json());
        map.insert(
            "else".into(),
            json!({
                "if": when("redis-cluster"),
                "then": cluster.to_json(),
                "else": {"if": when("redis-sentinel"), "then": sentinel.to_json()},
            }),
        );
        map.insert(
            "encrypt_fields".into(),
            json!(["redis_password", "sentinel_password"]),
        );
    }
    doc
}

/// The configuration schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, || Schema::Custom(validate_top, doc_top))
}

fn build_metadata_schema() -> Schema {
    Schema::object()
        .prop("limit_header", Schema::string().done())
        .prop("remaining_header", Schema::string().done())
        .prop("reset_header", Schema::string().done())
        .done()
}

/// The `plugin_metadata/limit-count` schema.
pub fn metadata_schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_metadata_schema)
}

/// What APISIX's schema allows but this gateway cannot run yet: refused by
/// the Admin API rather than accepted and never applied.
fn refuse_unsupported(conf: &Value) -> Result<(), String> {
    let text = |k: &str| conf.get(k).and_then(Value::as_str);
    if text("policy") == Some("redis-sentinel") {
        return Err(
            "policy redis-sentinel is not supported yet: use policy local, redis or redis-cluster"
                .into(),
        );
    }
    if text("window_type") == Some("sliding") {
        return Err(
            "window_type sliding is not supported yet: only window_type fixed is available".into(),
        );
    }
    Ok(())
}

/// Schema check, then the semantic checks APISIX runs after it.
pub fn check(conf: &Value) -> Result<(), String> {
    let has = |k: &str| conf.get(k).is_some();
    const BOTH: &str = "count/time_window and rules cannot be specified at the same time";
    if let Err(e) = schema().validate(conf) {
        if e.contains("value should match only one schema")
            && (has("count") || has("time_window"))
            && has("rules")
        {
            return Err(BOTH.into());
        }
        return Err(e);
    }
    if has("rules") && (has("count") || has("time_window")) {
        return Err(BOTH.into());
    }
    if has("group") && has("rules") {
        return Err("group and rules cannot be specified at the same time".into());
    }
    let policy = conf
        .get("policy")
        .and_then(Value::as_str)
        .unwrap_or("local");
    if policy != "local" {
        let interval = conf
            .get("sync_interval")
            .and_then(Value::as_f64)
            .unwrap_or(NO_DELAYED_SYNC);
        if interval != NO_DELAYED_SYNC {
            if interval < 0.1 {
                return Err("sync_interval should not be smaller than 0.1".into());
            }
            if conf
                .get("time_window")
                .and_then(Value::as_f64)
                .is_some_and(|w| interval >= w)
            {
                return Err("sync_interval should be smaller than time_window".into());
            }
        }
    }
    refuse_unsupported(conf)?;
    let mut keys = std::collections::HashSet::new();
    for rule in conf
        .get("rules")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = rule.get("key").and_then(Value::as_str).unwrap_or_default();
        if !keys.insert(key) {
            return Err(format!("duplicate key '{key}' in rules"));
        }
    }
    Ok(())
}

/// A `count` or `time_window`: fixed, or a template resolved per request.
#[derive(Debug)]
enum Num {
    Fixed(u64),
    Dyn(Template),
}

/// A Lua number as `tostring` prints it.
fn lua_f64(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// APISIX's check of a resolved `count` / `time_window`.
fn parse_resolved(text: &str) -> Result<u64, String> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| "resolved value is not a number".to_string())?;
    if !v.is_finite() {
        return Err("resolved value is not a number".into());
    }
    if v <= 0.0 {
        return Err(format!(
            "resolved value must be a positive number, got: {}",
            lua_f64(v)
        ));
    }
    if v.fract() != 0.0 {
        return Err(format!(
            "resolved value must be an integer, got: {}",
            lua_f64(v)
        ));
    }
    if v > MAX_SAFE_INTEGER {
        return Err(format!(
            "resolved value exceeds safe integer range (2^53-1), got: {}",
            lua_f64(v)
        ));
    }
    Ok(v as u64)
}

impl Num {
    fn compile(v: Option<&Value>) -> Result<Num, String> {
        match v {
            Some(Value::String(s)) => {
                let t = Template::new(s);
                match t.literal().map(parse_resolved) {
                    Some(Ok(n)) => Ok(Num::Fixed(n)),
                    _ => Ok(Num::Dyn(t)),
                }
            }
            Some(v) => v
                .as_f64()
                .filter(|n| *n > 0.0 && n.fract() == 0.0)
                .map(|n| Num::Fixed(n as u64))
                .ok_or_else(|| format!("invalid count or time_window {v}")),
            None => Err("count and time_window are required".into()),
        }
    }

    fn resolve(&self, vars: &dyn Vars) -> Result<u64, String> {
        match self {
            Num::Fixed(n) => Ok(*n),
            Num::Dyn(t) => parse_resolved(&t.render(vars, &[], Escape::None).text),
        }
    }
}

/// How a rule finds its key.
#[derive(Debug)]
enum Key {
    Var(String),
    Combination(Template),
    Constant(String),
    /// A `rules` entry: a template; the rule does not apply when it
    /// resolves no variable.
    Rule(Template),
}

/// The response header names of one rule.
#[derive(Debug, Clone)]
struct Names {
    limit: HeaderName,
    remaining: HeaderName,
    reset: HeaderName,
}

/// The names as configured (metadata or defaults), before prefixing.
struct NameTexts([String; 3]);

impl NameTexts {
    fn from_metadata(metadata: Option<&Value>) -> NameTexts {
        let pick = |field: &str, default: &str| -> String {
            match metadata.and_then(|m| m.get(field)).and_then(Value::as_str) {
                Some(n) if HeaderName::from_bytes(n.as_bytes()).is_ok() => n.to_string(),
                Some(n) => {
                    tracing::warn!(
                        plugin = NAME,
                        "plugin_metadata {field} {n:?} is not a header name, using {default}"
                    );
                    default.to_string()
                }
                None => default.to_string(),
            }
        };
        NameTexts([
            pick("limit_header", DEFAULT_LIMIT_HEADER),
            pick("remaining_header", DEFAULT_REMAINING_HEADER),
            pick("reset_header", DEFAULT_RESET_HEADER),
        ])
    }

    /// With `prefix`, `X-RateLimit-Limit` becomes `X-{prefix}-RateLimit-Limit`
    /// (the first `RateLimit-`, case-sensitively, as APISIX's gsub).
    fn names(&self, prefix: Option<&str>) -> Result<Names, String> {
        let one = |text: &String| {
            let text = match prefix {
                Some(p) => Cow::Owned(text.replacen("RateLimit-", &format!("{p}-RateLimit-"), 1)),
                None => Cow::Borrowed(text.as_str()),
            };
            HeaderName::from_bytes(text.as_bytes())
                .map_err(|_| format!("invalid rate limit header name {text:?}"))
        };
        let [limit, remaining, reset] = &self.0;
        Ok(Names {
            limit: one(limit)?,
            remaining: one(remaining)?,
            reset: one(reset)?,
        })
    }
}

#[derive(Debug)]
struct Rule {
    count: Num,
    window: Num,
    key: Key,
    names: Names,
    /// The `X-RateLimit-Limit` value of a fixed `count`, made once.
    limit_value: Option<HeaderValue>,
}

impl Rule {
    fn new(count: Num, window: Num, key: Key, names: Names) -> Rule {
        let limit_value = match count {
            Num::Fixed(n) => Some(HeaderValue::from(n)),
            Num::Dyn(_) => None,
        };
        Rule {
            count,
            window,
            key,
            names,
            limit_value,
        }
    }

    fn limit_value(&self, count: u64) -> HeaderValue {
        self.limit_value
            .clone()
            .unwrap_or_else(|| HeaderValue::from(count))
    }
}

/// The request clock; tests put a fake one in.
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// The compiled plugin.
pub struct LimitCount {
    rules: Vec<Rule>,
    /// Some `count` / `time_window` is resolved per request.
    dynamic: bool,
    rejection: Rejection,
    show_headers: bool,
    allow_degradation: bool,
    backend: Backend,
    clock: Clock,
}

/// Where the counters are.
enum Backend {
    Local(Arc<Counters>),
    /// In Redis, under `prefix` + the request's key.
    Redis {
        redis: Arc<Redis>,
        prefix: Arc<str>,
    },
}

/// Counts `ARGV[3]` for `KEYS[1]` in a window of `ARGV[2]` seconds that
/// starts with the key's first request; answers the count so far and the
/// milliseconds left.
static REDIS_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local left = redis.call('PTTL', KEYS[1])
if left < 0 then
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[2])
  return {tonumber(ARGV[3]), tonumber(ARGV[2]) * 1000}
end
return {redis.call('INCRBY', KEYS[1], ARGV[3]), left}
",
    )
});

/// The key space of this plugin in Redis (APISIX's, storage format v1).
const REDIS_KEY_SPACE: &str = "plugin-limit-count:v1:";

/// Compiles a checked configuration, with counters from `cx`.
pub fn compile(conf: &Value, cx: &CompileCx<'_>) -> Result<LimitCount, String> {
    compile_with_clock(conf, cx, Arc::new(Instant::now))
}

/// [`compile`] with a given clock.
pub fn compile_with_clock(
    conf: &Value,
    cx: &CompileCx<'_>,
    clock: Clock,
) -> Result<LimitCount, String> {
    refuse_unsupported(conf)?;
    let text = |k: &str| conf.get(k).and_then(Value::as_str);
    let texts = NameTexts::from_metadata(cx.metadata);
    let rules = match conf.get("rules").and_then(Value::as_array) {
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let prefix = match r.get("header_prefix").and_then(Value::as_str) {
                    Some(p) => p.to_string(),
                    None => (i + 1).to_string(),
                };
                Ok(Rule::new(
                    Num::compile(r.get("count"))?,
                    Num::compile(r.get("time_window"))?,
                    Key::Rule(Template::new(
                        r.get("key").and_then(Value::as_str).unwrap_or_default(),
                    )),
                    texts.names(Some(&prefix))?,
                ))
            })
            .collect::<Result<Vec<_>, String>>()?,
        None => {
            let key = text("key").unwrap_or("remote_addr");
            let key = match text("key_type").unwrap_or("var") {
                "var_combination" => Key::Combination(Template::new(key)),
                "constant" => Key::Constant(key.to_string()),
                _ => Key::Var(key.to_string()),
            };
            vec![Rule::new(
                Num::compile(conf.get("count"))?,
                Num::compile(conf.get("time_window"))?,
                key,
                texts.names(None)?,
            )]
        }
    };
    let dynamic = rules
        .iter()
        .any(|r| matches!(r.count, Num::Dyn(_)) || matches!(r.window, Num::Dyn(_)));
    let rejection = Rejection::from_conf(conf, DEFAULT_REJECTED_CODE)?;
    let backend = match RedisConf::from_conf(conf)? {
        None => Backend::Local(match text("group") {
            Some(group) => cx.shared_state(group, Counters::default),
            None => cx.state(Counters::default),
        }),
        Some(redis) => Backend::Redis {
            redis: Redis::shared(redis),
            prefix: match text("group") {
                Some(group) => format!("{REDIS_KEY_SPACE}{group}:"),
                None => format!(
                    "{REDIS_KEY_SPACE}{}",
                    crate::limit_key::remote_key_prefix(cx.owner, conf)
                ),
            }
            .into(),
        },
    };
    Ok(LimitCount {
        rules,
        dynamic,
        rejection,
        show_headers: conf
            .get("show_limit_quota_header")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        allow_degradation: conf
            .get("allow_degradation")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        backend,
        clock,
    })
}

const SHARDS: usize = 16;
/// A shard sweeps expired windows once it holds this many keys (and then
/// at twice what survived).
const MIN_SWEEP: usize = 256;

/// Fixed-window counters by key, sharded to keep lock hold times short.
pub struct Counters {
    shards: Vec<Mutex<Shard>>,
    /// Shard choice; the shards' maps hash with their own copy of it.
    hasher: foldhash::fast::RandomState,
}

#[derive(Default)]
struct Shard {
    map: HashMap<Box<str>, Window, foldhash::fast::RandomState>,
    sweep_at: usize,
    /// What the map's entries take, by [`entry_bytes`].
    bytes: usize,
}

/// What each shard may hold of [`LOCAL_STATE_BYTES`].
const MAX_SHARD_BYTES: usize = LOCAL_STATE_BYTES / SHARDS;

#[derive(Debug, Clone, Copy)]
struct Window {
    used: u64,
    ends: Instant,
}

/// What one request got.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    pub allowed: bool,
    /// Requests left in the window (0 when rejected).
    pub remaining: u64,
    /// Seconds until the window ends, to 1/100 s.
    pub reset: f64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

/// The largest window honoured (a century); longer ones are that long.
const MAX_WINDOW: u64 = 100 * 365 * 24 * 3600;

impl Counters {
    /// Counts `cost` for `key` against `limit` per `window` seconds.
    pub fn incoming(&self, key: &str, limit: u64, window: u64, cost: u64, now: Instant) -> Outcome {
        let index = (self.hasher.hash_one(key) % SHARDS as u64) as usize;
        let Some(shard) = self.shards.get(index) else {
            return Outcome {
                allowed: true,
                remaining: limit,
                reset: 0.0,
            };
        };
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = |w: &mut Window| {
            *w = Window {
                used: cost,
                ends: now
                    .checked_add(Duration::from_secs(window.min(MAX_WINDOW)))
                    .unwrap_or(now),
            };
            Outcome {
                allowed: cost <= limit,
                remaining: limit.saturating_sub(cost),
                reset: window as f64,
            }
        };
        if let Some(w) = shard.map.get_mut(key) {
            if now >= w.ends {
                return fresh(w);
            }
            let left = w.ends.saturating_duration_since(now).as_secs_f64();
            let reset = (left * 100.0).floor() / 100.0;
            let used = w.used.saturating_add(cost);
            if used > limit {
                return Outcome {
                    allowed: false,
                    remaining: 0,
                    reset,
                };
            }
            w.used = used;
            return Outcome {
                allowed: true,
                remaining: limit - used,
                reset,
            };
        }
        let need = entry_bytes(key);
        if shard.map.len() >= shard.sweep_at.max(MIN_SWEEP) {
            let mut bytes = 0;
            shard.map.retain(|k, w| {
                let live = w.ends > now;
                if live {
                    bytes += entry_bytes(k);
                }
                live
            });
            shard.bytes = bytes;
            shard.sweep_at = (shard.map.len() * 2).max(MIN_SWEEP);
        }
        // Full of live windows: make room (not a sweep per request, which
        // would cost a pass over the map each time).
        let Shard { map, bytes, .. } = &mut *shard;
        make_room(map, bytes, need, MAX_SHARD_BYTES);
        let mut w = Window { used: 0, ends: now };
        let outcome = fresh(&mut w);
        shard.map.insert(key.into(), w);
        shard.bytes += need;
        outcome
    }

    /// Keys held (live or not yet swept), for tests and diagnostics.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).map.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Quota headers from `access`, added to the response in `header_filter`.
#[derive(Clone, Default)]
struct QuotaHeaders(Vec<(HeaderName, HeaderValue)>);

fn reset_value(reset: f64) -> HeaderValue {
    if reset.fract() == 0.0 && reset < 1e15 {
        HeaderValue::from(reset as u64)
    } else if (0.0..1e12).contains(&reset) {
        // Hundredths, as Lua prints them ("59.5", "0.07"), digit by digit:
        // the formatting machinery costs more than the whole count.
        let cents = (reset * 100.0).round() as u64;
        let mut text = [0u8; 24];
        let mut at = text.len();
        let mut push = |d: u64| {
            at -= 1;
            text[at] = b'0' + (d % 10) as u8;
        };
        let frac = cents % 100;
        if !frac.is_multiple_of(10) {
            push(frac);
        }
        push(frac / 10);
        let mut whole = cents / 100;
        at -= 1;
        text[at] = b'.';
        loop {
            at -= 1;
            text[at] = b'0' + (whole % 10) as u8;
            whole /= 10;
            if whole == 0 {
                break;
            }
        }
        HeaderValue::from_bytes(&text[at..]).unwrap_or(HeaderValue::from_static("0"))
    } else {
        HeaderValue::try_from(format!("{reset}")).unwrap_or(HeaderValue::from_static("0"))
    }
}

/// Quota headers a Redis round trip fills after `access` has returned.
#[derive(Clone, Default)]
struct PendingQuota(Arc<Mutex<Vec<(HeaderName, HeaderValue)>>>);

/// One rule's counting, resolved for a request.
struct RedisStep {
    key: String,
    count: u64,
    window: u64,
    names: Names,
}

/// Why a request could not be counted.
enum Failure {
    /// A `count` / `time_window` did not resolve.
    Resolve(String),
    /// No `rules` entry applies.
    NoRule,
}

impl LimitCount {
    /// The counter key of `rule` for this request; `None` when the rule
    /// does not apply.
    fn key<'a>(rule: &'a Rule, ctx: &'a Ctx, req: &'a request::Parts) -> Option<Cow<'a, str>> {
        let remote = || ctx.var(Some(req), "remote_addr");
        match &rule.key {
            Key::Var(name) => ctx.var(Some(req), name).or_else(remote),
            Key::Combination(t) => {
                let r = t.render(&ctx.vars(Some(req)), &[], Escape::None);
                if r.resolved == 0 {
                    remote()
                } else {
                    Some(r.text.into())
                }
            }
            Key::Constant(k) => Some(k.as_str().into()),
            Key::Rule(t) => {
                let r = t.render(&ctx.vars(Some(req)), &[], Escape::None);
                (r.resolved > 0).then(|| r.text.into())
            }
        }
    }

    /// APISIX resolves every rule before counting any: a bad dynamic
    /// value stops the request before a counter moves.
    fn precheck(&self, ctx: &Ctx, req: &request::Parts) -> Result<(), Failure> {
        let vars = ctx.vars(Some(req));
        let mut applies = false;
        for rule in &self.rules {
            if matches!(rule.key, Key::Rule(_)) && Self::key(rule, ctx, req).is_none() {
                continue;
            }
            applies = true;
            rule.count.resolve(&vars).map_err(Failure::Resolve)?;
            rule.window.resolve(&vars).map_err(Failure::Resolve)?;
        }
        if applies {
            Ok(())
        } else {
            Err(Failure::NoRule)
        }
    }

    fn fail(&self, why: Failure) -> Flow {
        match why {
            Failure::Resolve(e) => {
                tracing::error!(plugin = NAME, "failed to get rate limit rules: {e}")
            }
            Failure::NoRule => {
                tracing::error!(
                    plugin = NAME,
                    "failed to get rate limit rules: no rule applies"
                )
            }
        }
        if self.allow_degradation {
            Flow::Continue
        } else {
            Flow::status(StatusCode::INTERNAL_SERVER_ERROR)
        }
    }
}

impl LimitCount {
    fn access_local(&self, counters: &Counters, ctx: &mut Ctx, req: &request::Parts) -> Flow {
        let now = (self.clock)();
        let mut applied = false;
        let mut headers = Vec::new();
        let mut rejected = false;
        for rule in &self.rules {
            let outcome = {
                let Some(key) = Self::key(rule, ctx, req) else {
                    continue;
                };
                let vars = ctx.vars(Some(req));
                let (count, window) = match (rule.count.resolve(&vars), rule.window.resolve(&vars))
                {
                    (Ok(c), Ok(w)) => (c, w),
                    (Err(e), _) | (_, Err(e)) => return self.fail(Failure::Resolve(e)),
                };
                applied = true;
                let outcome = counters.incoming(&key, count, window, 1, now);
                (outcome, count)
            };
            let (outcome, count) = outcome;
            if self.show_headers {
                headers.push((rule.names.limit.clone(), rule.limit_value(count)));
                headers.push((
                    rule.names.remaining.clone(),
                    HeaderValue::from(outcome.remaining),
                ));
                headers.push((rule.names.reset.clone(), reset_value(outcome.reset)));
            }
            if !outcome.allowed {
                rejected = true;
                break;
            }
        }
        if !headers.is_empty() {
            match ctx.data.get_mut::<QuotaHeaders>() {
                Some(q) => q.0.extend(headers),
                None => {
                    ctx.data.insert(QuotaHeaders(headers));
                }
            }
        }
        if rejected {
            return Flow::Respond(self.rejection.response());
        }
        if !applied {
            return self.fail(Failure::NoRule);
        }
        Flow::Continue
    }

    /// Counts in Redis: the keys are resolved now, the round trips run in
    /// the returned wait, one rule after another (the first rejection
    /// stops).
    fn access_redis(
        &self,
        redis: &Arc<Redis>,
        prefix: &str,
        ctx: &mut Ctx,
        req: &request::Parts,
    ) -> Flow {
        let mut steps = Vec::with_capacity(self.rules.len());
        for rule in &self.rules {
            let Some(key) = Self::key(rule, ctx, req) else {
                continue;
            };
            let vars = ctx.vars(Some(req));
            match (rule.count.resolve(&vars), rule.window.resolve(&vars)) {
                (Ok(count), Ok(window)) => steps.push(RedisStep {
                    key: format!("{prefix}{key}"),
                    count,
                    window,
                    names: rule.names.clone(),
                }),
                (Err(e), _) | (_, Err(e)) => return self.fail(Failure::Resolve(e)),
            }
        }
        if steps.is_empty() {
            return self.fail(Failure::NoRule);
        }
        let quota = self
            .show_headers
            .then(|| ctx.data.get_or_insert_default::<PendingQuota>().0.clone());
        let redis = redis.clone();
        let rejection = self.rejection.clone();
        let allow_degradation = self.allow_degradation;
        Flow::Wait(Box::pin(async move {
            for step in steps {
                // ARGV as APISIX passes them: limit (unused), window, cost.
                let args = [step.count.to_string(), step.window.to_string(), "1".into()];
                let (used, left_ms) = match redis
                    .eval::<(i64, i64)>(&REDIS_SCRIPT, &step.key, &args)
                    .await
                {
                    Ok(reply) => reply,
                    Err(e) => {
                        tracing::error!(plugin = NAME, key = %step.key, "failed to limit count: {e}");
                        if allow_degradation {
                            continue;
                        }
                        return Flow::error_msg(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "failed to limit count",
                        );
                    }
                };
                let count = i64::try_from(step.count).unwrap_or(i64::MAX);
                let remaining = count.saturating_sub(used);
                if let Some(quota) = &quota {
                    let reset = ((left_ms.max(0) as f64 / 1000.0) * 100.0).floor() / 100.0;
                    let mut list = quota.lock().unwrap_or_else(PoisonError::into_inner);
                    list.push((step.names.limit, HeaderValue::from(step.count)));
                    list.push((step.names.remaining, HeaderValue::from(remaining.max(0))));
                    list.push((step.names.reset, reset_value(reset)));
                }
                if remaining < 0 {
                    return Flow::Respond(rejection.response());
                }
            }
            Flow::Continue
        }))
    }
}

impl Plugin for LimitCount {
    fn phases(&self) -> Phases {
        if self.show_headers {
            Phases::ACCESS | Phases::HEADER_FILTER
        } else {
            Phases::ACCESS
        }
    }

    fn access(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        if self.dynamic {
            if let Err(why) = self.precheck(ctx, req) {
                return self.fail(why);
            }
        }
        match &self.backend {
            Backend::Local(counters) => self.access_local(counters, ctx, req),
            Backend::Redis { redis, prefix } => self.access_redis(redis, prefix, ctx, req),
        }
    }

    fn header_filter(&self, ctx: &mut Ctx, resp: &mut response::Parts) {
        if let Some(QuotaHeaders(list)) = ctx.data.remove::<QuotaHeaders>() {
            for (name, value) in list {
                resp.headers.insert(name, value);
            }
        }
        if let Some(PendingQuota(list)) = ctx.data.remove::<PendingQuota>() {
            let list = std::mem::take(&mut *list.lock().unwrap_or_else(PoisonError::into_inner));
            for (name, value) in list {
                resp.headers.insert(name, value);
            }
        }
    }
}

/// The registry entry.
pub struct LimitCountSpec;

impl PluginSpec for LimitCountSpec {
    fn encrypt_fields(&self) -> &'static [&'static str] {
        &["redis_password", "sentinel_password"]
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn priority(&self) -> i32 {
        PRIORITY
    }

    fn schema(&self) -> &'static Schema {
        schema()
    }

    fn metadata_schema(&self) -> Option<&'static Schema> {
        Some(metadata_schema())
    }

    fn check(&self, conf: &Value, target: SchemaType) -> Result<(), String> {
        match target {
            SchemaType::Metadata => metadata_schema().validate(conf),
            _ => check(conf),
        }
    }

    fn compile(&self, conf: &Value, cx: &CompileCx<'_>) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(compile(conf, cx)?))
    }
}

#[cfg(test)]
mod tests;
