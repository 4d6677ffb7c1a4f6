//! `limit-conn`: at most `conn` requests in flight per key, `burst` more
//! that wait, the rest rejected.
//!
//! Mirrors APISIX 3.18's plugin of the same name (priority 1003, access
//! and log phases) and `resty.limit.conn` under it:
//!
//! ```json
//! {"conn": 10, "burst": 5, "default_conn_delay": 0.1, "key_type": "var",
//!  "key": "remote_addr", "rejected_code": 429, "rejected_msg": "busy"}
//! ```
//!
//! - A request raises its key's count `n`. Past `conn + burst` it is
//!   rejected (`rejected_code`, default 503, with `{"error_msg":
//!   rejected_msg}` when set) and the count goes back down. Past `conn` it
//!   waits `unit_delay * floor((n - 1) / conn)` seconds first.
//! - `unit_delay` starts at `default_conn_delay` and, unless
//!   `only_use_default_delay`, follows the requests' latency (the mean of
//!   the last value and each finished request's time), as APISIX does.
//! - The slot is released when the response is done (log phase) or, if the
//!   request ends any other way (the client goes away while it waits), when
//!   it is dropped: a count never leaks.
//! - `policy` `redis` / `redis-cluster` ([`crate::redis_policy`]): the
//!   requests in flight are members of a sorted set in Redis, shared by
//!   every node, under `limit_conn:{/apisix/routes/1}:{conf_version}:{key}`;
//!   a member expires `key_ttl` seconds (default 3600) after it entered, so
//!   a node that dies holding slots frees them in time. The wait past
//!   `conn` is `default_conn_delay` per step, as APISIX's Redis policies.
//!   Redis failing or slower than `redis_timeout`: 500, or no limit with
//!   `allow_degradation`.
//!
//! Counts live in the plugin state: they survive unrelated configuration
//! changes, so requests in flight across a change still release theirs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};

use http::request;
use serde_json::{json, Value};

use crate::ctx::Ctx;
use crate::limit_key::{remote_key_prefix, LimitKey};
use crate::limit_req::{delayed, DEFAULT_REJECTED_CODE};
use crate::plugin::{CompileCx, Flow, Phases, Plugin, PluginSpec, SchemaType};
use crate::redis_policy::{self, Redis, RedisConf};
use crate::registry::cached;
use crate::rejection::Rejection;
use crate::schema::Schema;

pub const NAME: &str = "limit-conn";
pub const PRIORITY: i32 = 1003;

fn build_schema() -> Schema {
    let rule = Schema::object()
        .prop("conn", Schema::integer().greater_than(0.0).int())
        .prop("burst", Schema::integer().min(0.0).int())
        .prop(
            "default_conn_delay",
            Schema::integer().greater_than(0.0).number(),
        )
        .prop("only_use_default_delay", Schema::Boolean)
        .prop("key", Schema::string().done())
        .prop(
            "key_type",
            Schema::string()
                .enumerated(&["var", "var_combination"])
                .done(),
        )
        .prop(
            "rejected_code",
            Schema::Custom(
                |v| Schema::integer().min(200.0).max(599.0).int().validate(v),
                || json!({"type": "integer", "minimum": 200, "maximum": 599, "default": 503}),
            ),
        )
        .prop("rejected_msg", Schema::string().min(1).done())
        .prop("allow_degradation", Schema::Boolean)
        .prop(
            "policy",
            Schema::string()
                .enumerated(&["redis", "redis-cluster", "local"])
                .done(),
        )
        .prop("key_ttl", Schema::integer().int())
        .required(&["conn", "burst", "default_conn_delay", "key"]);
    redis_policy::with_policies(rule, true)
}

/// The configuration schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

pub fn check(conf: &Value) -> Result<(), String> {
    schema().validate(conf)
}

/// The counts of one configuration, and its current unit delay.
pub struct Conns {
    counts: Mutex<HashMap<String, u64>>,
    /// Seconds, as f64 bits.
    unit_delay: AtomicU64,
    /// `default_conn_delay`: the redis policies always wait by it.
    default_delay: f64,
}

impl Conns {
    fn new(default_delay: f64) -> Self {
        Conns {
            counts: Mutex::new(HashMap::new()),
            unit_delay: AtomicU64::new(default_delay.to_bits()),
            default_delay,
        }
    }

    fn unit_delay(&self) -> f64 {
        f64::from_bits(self.unit_delay.load(Ordering::Relaxed))
    }

    /// Takes a slot for `key`: the count now, or `None` when over
    /// `limit` (the count is then left as it was).
    fn enter(&self, key: &str, limit: u64) -> Option<u64> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.get(key).copied().unwrap_or(0) + 1;
        if n > limit {
            return None;
        }
        counts.insert(key.to_string(), n);
        Some(n)
    }

    fn leave(&self, key: &str) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(key);
            }
        }
    }

    /// The count of `key`, for tests and diagnostics.
    pub fn count(&self, key: &str) -> u64 {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.get(key).copied().unwrap_or(0)
    }
}

/// One request's slot; given back once, in log or when dropped.
struct Slot {
    /// The plugin's counts (also what tells its slots from others').
    conns: Arc<Conns>,
    key: String,
    /// Set when the slot is in Redis rather than in `conns`.
    remote: Option<RemoteSlot>,
    released: AtomicBool,
}

/// A slot in a Redis sorted set: `member` under `key`.
struct RemoteSlot {
    redis: Arc<Redis>,
    member: String,
    /// Cleared when Redis refused or failed: nothing to give back.
    held: AtomicBool,
}

impl Slot {
    fn release(&self) -> bool {
        if self.released.swap(true, Ordering::AcqRel) {
            return false;
        }
        match &self.remote {
            None => self.conns.leave(&self.key),
            Some(r) => {
                if r.held.load(Ordering::Acquire) {
                    redis_policy::spawn_eval(
                        r.redis.clone(),
                        &LEAVE_SCRIPT,
                        self.key.clone(),
                        vec![r.member.clone()],
                        "failed to record the connection leaving request",
                    );
                }
            }
        }
        true
    }
}

/// Takes a place in the sorted set `KEYS[1]` for `ARGV[4]` when fewer than
/// `ARGV[1]` live there (members expire `ARGV[2]` seconds after `ARGV[3]`,
/// the time now); answers whether it did and the count.
static ENTER_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local now = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, now)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[1]) then
  return {0, held}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {1, held + 1}
",
    )
});

/// Gives `ARGV[1]`'s place in `KEYS[1]` back.
static LEAVE_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new("return redis.call('ZREM', KEYS[1], ARGV[1])"));

/// Where the counts are.
enum Backend {
    Local,
    /// In Redis, under `prefix` + the request's key, members expiring after
    /// `key_ttl` seconds.
    Redis {
        redis: Arc<Redis>,
        prefix: String,
        key_ttl: u64,
    },
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.release();
    }
}

/// The slots a request holds (a global rule and a route may each limit).
#[derive(Clone, Default)]
struct Slots(Vec<Arc<Slot>>);

/// The compiled plugin.
pub struct LimitConn {
    conn: u64,
    burst: u64,
    key: LimitKey,
    only_default_delay: bool,
    rejection: Rejection,
    allow_degradation: bool,
    conns: Arc<Conns>,
    backend: Backend,
}

pub fn compile(conf: &Value, cx: &CompileCx<'_>) -> Result<LimitConn, String> {
    check(conf)?;
    let int = |k: &str| conf.get(k).and_then(Value::as_u64).unwrap_or(0);
    let default_delay = conf
        .get("default_conn_delay")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    Ok(LimitConn {
        conn: int("conn").max(1),
        burst: int("burst"),
        key: LimitKey::compile(conf),
        only_default_delay: conf
            .get("only_use_default_delay")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        rejection: Rejection::from_conf(conf, DEFAULT_REJECTED_CODE)?,
        allow_degradation: conf
            .get("allow_degradation")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        conns: cx.state(|| Conns::new(default_delay)),
        backend: match RedisConf::from_conf(conf)? {
            None => Backend::Local,
            Some(redis) => Backend::Redis {
                redis: Redis::shared(redis),
                prefix: format!("limit_conn:{}", remote_key_prefix(cx.owner, conf)),
                key_ttl: conf
                    .get("key_ttl")
                    .and_then(Value::as_u64)
                    .filter(|t| *t > 0)
                    .unwrap_or(redis_policy::DEFAULT_KEY_TTL),
            },
        },
    })
}

impl LimitConn {
    /// Requests a key may have in flight: `conn + burst` (neither has a
    /// maximum in the schema, so the sum saturates instead of wrapping to
    /// a limit that refuses everything).
    fn limit(&self) -> u64 {
        self.conn.saturating_add(self.burst)
    }

    /// Past `conn`, the `n`th request waits its turn.
    fn wait_for(&self, n: u64, unit_delay: f64) -> Flow {
        if n > self.conn {
            delayed(unit_delay * ((n - 1) / self.conn) as f64)
        } else {
            Flow::Continue
        }
    }

    /// The slot is registered with the request before the round trip, so it
    /// is given back however the request ends.
    fn access_redis(
        &self,
        redis: &Arc<Redis>,
        prefix: &str,
        key_ttl: u64,
        ctx: &mut Ctx,
        req: &request::Parts,
    ) -> Flow {
        let key = format!("{prefix}{}", self.key.resolve(ctx, req));
        let member = format!("{:032x}", rand::random::<u128>());
        let slot = Arc::new(Slot {
            conns: self.conns.clone(),
            key: key.clone(),
            remote: Some(RemoteSlot {
                redis: redis.clone(),
                member: member.clone(),
                held: AtomicBool::new(true),
            }),
            released: AtomicBool::new(false),
        });
        ctx.data
            .get_or_insert_default::<Slots>()
            .0
            .push(slot.clone());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let args = [
            self.limit().to_string(),
            key_ttl.to_string(),
            now.to_string(),
            member,
        ];
        let redis = redis.clone();
        let rejection = self.rejection.clone();
        let allow_degradation = self.allow_degradation;
        let delay = self.conns.default_delay;
        let conn = self.conn;
        Flow::Wait(Box::pin(async move {
            let not_held = || {
                if let Some(r) = &slot.remote {
                    r.held.store(false, Ordering::Release);
                }
            };
            match redis.eval::<(i64, u64)>(&ENTER_SCRIPT, &key, &args).await {
                Ok((1, n)) if n > conn => delayed(delay * ((n - 1) / conn) as f64),
                Ok((1, _)) => Flow::Continue,
                Ok(_) => {
                    not_held();
                    Flow::Respond(rejection.response())
                }
                Err(e) => {
                    not_held();
                    redis_policy::failed(NAME, "failed to limit conn", &key, &e, allow_degradation)
                }
            }
        }))
    }
}

impl Plugin for LimitConn {
    fn phases(&self) -> Phases {
        Phases::ACCESS | Phases::LOG
    }

    fn access(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        if let Backend::Redis {
            redis,
            prefix,
            key_ttl,
        } = &self.backend
        {
            return self.access_redis(redis, prefix, *key_ttl, ctx, req);
        }
        let key = self.key.resolve(ctx, req).into_owned();
        let Some(n) = self.conns.enter(&key, self.limit()) else {
            return Flow::Respond(self.rejection.response());
        };
        let slot = Arc::new(Slot {
            conns: self.conns.clone(),
            key,
            remote: None,
            released: AtomicBool::new(false),
        });
        ctx.data.get_or_insert_default::<Slots>().0.push(slot);
        self.wait_for(n, self.conns.unit_delay())
    }

    fn log(&self, ctx: &Ctx) {
        let Some(slots) = ctx.data.get::<Slots>() else {
            return;
        };
        for slot in slots
            .0
            .iter()
            .filter(|s| Arc::ptr_eq(&s.conns, &self.conns))
        {
            if slot.release() && !self.only_default_delay {
                let latency = ctx.started.elapsed().as_secs_f64();
                let old = self.conns.unit_delay();
                self.conns
                    .unit_delay
                    .store(((latency + old) / 2.0).to_bits(), Ordering::Relaxed);
            }
        }
    }
}

pub struct LimitConnSpec;

impl PluginSpec for LimitConnSpec {
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
        check(conf)
    }

    fn compile(&self, conf: &Value, cx: &CompileCx<'_>) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(compile(conf, cx)?))
    }

    fn encrypt_fields(&self) -> &'static [&'static str] {
        &["redis_password"]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry;
    use crate::testing;

    fn reason(conf: Value) -> String {
        testing::refusal(NAME, &conf)
    }

    #[test]
    fn schema_errors() {
        assert_eq!(registry::find(NAME).unwrap().priority(), 1003);
        assert_eq!(
            reason(json!({"conn": 1, "burst": 0, "key": "remote_addr"})),
            "property \"default_conn_delay\" is required"
        );
        assert!(
            reason(json!({"conn": 0, "burst": 0, "default_conn_delay": 0.1, "key": "k"}))
                .contains("conn")
        );
        assert!(
            reason(json!({"conn": 1, "burst": 0, "default_conn_delay": 0, "key": "k"}))
                .contains("default_conn_delay")
        );
        assert_eq!(
            reason(
                json!({"conn": 1, "burst": 0, "default_conn_delay": 0.1, "key": "k", "policy": "redis-cluster"})
            ),
            "else clause did not match"
        );
    }

    #[tokio::test]
    async fn limits_at_the_top_of_the_range_let_requests_through() {
        let conf = json!({NAME: {"conn": u64::MAX, "burst": 1, "default_conn_delay": 0.1, "key": "remote_addr"}});
        let set = testing::compile(&conf).unwrap();
        let chain = testing::chain(Vec::new(), set, Default::default());
        let answer = testing::send(chain, testing::request("10.0.0.1", "/", &[])).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }

    #[test]
    fn slots_are_counted_and_given_back_once() {
        let conns = Arc::new(Conns::new(0.1));
        assert_eq!(conns.enter("k", 2), Some(1));
        assert_eq!(conns.enter("k", 2), Some(2));
        assert_eq!(conns.enter("k", 2), None);
        assert_eq!(conns.count("k"), 2);
        let slot = Slot {
            conns: conns.clone(),
            key: "k".into(),
            remote: None,
            released: AtomicBool::new(false),
        };
        assert!(slot.release());
        assert!(!slot.release());
        drop(slot);
        assert_eq!(
            conns.count("k"),
            1,
            "a released slot is not given back twice"
        );
        conns.leave("k");
        assert_eq!(conns.count("k"), 0);
        assert!(
            conns.counts.lock().unwrap().is_empty(),
            "empty keys are forgotten"
        );
    }
}
