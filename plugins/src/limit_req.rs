//! `limit-req`: a leaky bucket of `rate` requests per second per key, with
//! `burst` requests of slack that are delayed (or, with `nodelay`, let
//! through at once).
//!
//! Mirrors APISIX 3.18's plugin of the same name (priority 1001, access
//! phase) and the leaky bucket of `resty.limit.req` it runs on:
//!
//! ```json
//! {"rate": 10, "burst": 5, "key_type": "var", "key": "remote_addr",
//!  "rejected_code": 429, "rejected_msg": "slow down", "nodelay": false}
//! ```
//!
//! Per key the bucket holds an excess `e` (requests above the rate). A
//! request finds `e' = max(e - rate * elapsed + 1, 0)`; above `burst` it is
//! rejected (`rejected_code`, default 503, with `{"error_msg":
//! rejected_msg}` when set) and the bucket is left as it was; otherwise
//! `e'` is kept and the request waits `e' / rate` seconds unless `nodelay`
//! (the first request of a key never waits).
//!
//! With `policy` `local` (default) the buckets live in the plugin state
//! (they survive unrelated configuration changes); drained buckets are swept
//! as the map grows. With `redis` / `redis-cluster`
//! ([`crate::redis_policy`]) a bucket is a hash in Redis shared by every
//! node, `limit_req:{/apisix/routes/1}:{conf_version}:{key}`, read, drained
//! and written back in one script run (so concurrent requests cannot all
//! pass on one stale read), expiring once it would have drained. Redis
//! failing or slower than `redis_timeout`: 500, or no limit with
//! `allow_degradation`.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::request;
use serde_json::{json, Value};

use crate::ctx::Ctx;
use crate::limit_key::{entry_bytes, make_room, remote_key_prefix, LimitKey, LOCAL_STATE_BYTES};
use crate::plugin::{CompileCx, Flow, Phases, Plugin, PluginSpec, SchemaType};
use crate::redis_policy::{self, Redis, RedisConf};
use crate::registry::cached;
use crate::rejection::Rejection;
use crate::schema::Schema;

pub const NAME: &str = "limit-req";
pub const PRIORITY: i32 = 1001;
pub const DEFAULT_REJECTED_CODE: u16 = 503;
/// The map is swept of drained buckets when it reaches this size (then
/// twice what survived).
const MIN_SWEEP: usize = 1024;

fn build_schema() -> Schema {
    let rule = Schema::object()
        .prop("rate", Schema::integer().greater_than(0.0).number())
        .prop("burst", Schema::integer().min(0.0).number())
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
        .prop("nodelay", Schema::Boolean)
        .prop("allow_degradation", Schema::Boolean)
        .prop(
            "policy",
            Schema::string()
                .enumerated(&["redis", "redis-cluster", "local"])
                .done(),
        )
        .required(&["rate", "burst", "key"]);
    redis_policy::with_policies(rule, false)
}

/// The configuration schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

pub fn check(conf: &Value) -> Result<(), String> {
    schema().validate(conf)
}

struct Bucket {
    excess: f64,
    last: Instant,
}

/// The buckets of one configuration.
#[derive(Default)]
pub struct Buckets {
    map: Mutex<Held>,
    sweep_at: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct Held {
    map: HashMap<String, Bucket>,
    /// What the entries take, by [`entry_bytes`].
    bytes: usize,
}

impl Buckets {
    /// The delay for one request of `key` at `now`, or `None` when it is
    /// over the burst.
    fn incoming(&self, key: &str, rate: f64, burst: f64, now: Instant) -> Option<f64> {
        let mut held = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let Held { map, bytes } = &mut *held;
        let excess = match map.get(key) {
            Some(b) => {
                let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
                let e = (b.excess - rate * elapsed + 1.0).max(0.0);
                if e > burst {
                    return None;
                }
                e
            }
            None => 0.0,
        };
        match map.get_mut(key) {
            Some(b) => {
                b.excess = excess;
                b.last = now;
            }
            None => {
                let threshold = self
                    .sweep_at
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .max(MIN_SWEEP);
                if map.len() >= threshold {
                    // A bucket that has drained holds nothing a new one
                    // would not.
                    let mut kept = 0;
                    map.retain(|k, b| {
                        let draining = b.excess
                            - rate * now.saturating_duration_since(b.last).as_secs_f64()
                            > 0.0;
                        if draining {
                            kept += entry_bytes(k);
                        }
                        draining
                    });
                    *bytes = kept;
                    self.sweep_at
                        .store(map.len() * 2, std::sync::atomic::Ordering::Relaxed);
                }
                let need = entry_bytes(key);
                make_room(map, bytes, need, LOCAL_STATE_BYTES);
                map.insert(key.to_string(), Bucket { excess, last: now });
                *bytes += need;
            }
        }
        Some(excess / rate)
    }
}

/// The compiled plugin.
pub struct LimitReq {
    rate: f64,
    burst: f64,
    key: LimitKey,
    nodelay: bool,
    rejection: Rejection,
    allow_degradation: bool,
    buckets: Arc<Buckets>,
    /// Set for the redis policies: the client and the key prefix.
    redis: Option<(Arc<Redis>, String)>,
}

/// The leaky bucket in the Redis hash `KEYS[1]` (`excess`, `last`), in
/// thousandths of a request: `ARGV[1]` rate, `ARGV[2]` burst, `ARGV[3]` now
/// in ms, `ARGV[4]` expiry in seconds. Answers `{1, excess}` when the
/// request is admitted (and stored), `{0, excess}` when it is not.
static REDIS_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local saved = redis.call('HMGET', KEYS[1], 'excess', 'last')
local excess = 0
if saved[1] and saved[2] then
  local drained = rate * math.abs(now - tonumber(saved[2])) / 1000
  excess = math.max(tonumber(saved[1]) - drained + 1000, 0)
  if excess > burst then
    return {0, tostring(excess)}
  end
end
redis.call('HSET', KEYS[1], 'excess', excess, 'last', now)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {1, tostring(excess)}
",
    )
});

pub fn compile(conf: &Value, cx: &CompileCx<'_>) -> Result<LimitReq, String> {
    check(conf)?;
    let num = |k: &str| conf.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    Ok(LimitReq {
        rate: num("rate"),
        burst: num("burst"),
        key: LimitKey::compile(conf),
        nodelay: conf
            .get("nodelay")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        rejection: Rejection::from_conf(conf, DEFAULT_REJECTED_CODE)?,
        allow_degradation: conf
            .get("allow_degradation")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        buckets: cx.state(Buckets::default),
        redis: RedisConf::from_conf(conf)?.map(|r| {
            (
                Redis::shared(r),
                format!("limit_req:{}", remote_key_prefix(cx.owner, conf)),
            )
        }),
    })
}

/// Waits `seconds` (at least 1 ms, as APISIX), then goes on.
pub(crate) fn delayed(seconds: f64) -> Flow {
    if seconds < 0.001 {
        return Flow::Continue;
    }
    let wait = Duration::try_from_secs_f64(seconds).unwrap_or(Duration::from_secs(3600));
    Flow::Wait(Box::pin(async move {
        tokio::time::sleep(wait).await;
        Flow::Continue
    }))
}

impl LimitReq {
    fn access_redis(
        &self,
        redis: &Arc<Redis>,
        prefix: &str,
        ctx: &Ctx,
        req: &request::Parts,
    ) -> Flow {
        let key = format!("{prefix}{}", self.key.resolve(ctx, req));
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        // Drained after burst / rate seconds; a second more for the clock.
        // Kept to what Redis's EXPIRE takes (a huge burst over a tiny rate
        // would otherwise wrap to 0, which deletes the key at once).
        let ttl = (self.burst / self.rate).ceil().min(f64::from(i32::MAX)) as u64 + 1;
        let args = [
            (self.rate * 1000.0).to_string(),
            (self.burst * 1000.0).to_string(),
            now_ms.to_string(),
            ttl.to_string(),
        ];
        let redis = redis.clone();
        let rejection = self.rejection.clone();
        let allow_degradation = self.allow_degradation;
        let (rate, nodelay) = (self.rate, self.nodelay);
        Flow::Wait(Box::pin(async move {
            match redis
                .eval::<(i64, String)>(&REDIS_SCRIPT, &key, &args)
                .await
            {
                Ok((1, excess)) if !nodelay => {
                    delayed(excess.parse::<f64>().unwrap_or(0.0) / 1000.0 / rate)
                }
                Ok((1, _)) => Flow::Continue,
                Ok(_) => Flow::Respond(rejection.response()),
                Err(e) => {
                    redis_policy::failed(NAME, "failed to limit req", &key, &e, allow_degradation)
                }
            }
        }))
    }
}

impl Plugin for LimitReq {
    fn phases(&self) -> Phases {
        Phases::ACCESS
    }

    fn access(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        if let Some((redis, prefix)) = &self.redis {
            return self.access_redis(redis, prefix, ctx, req);
        }
        let key = self.key.resolve(ctx, req);
        match self
            .buckets
            .incoming(&key, self.rate, self.burst, Instant::now())
        {
            None => Flow::Respond(self.rejection.response()),
            Some(_) if self.nodelay => Flow::Continue,
            Some(delay) => delayed(delay),
        }
    }
}

pub struct LimitReqSpec;

impl PluginSpec for LimitReqSpec {
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
    use crate::consumer::ConsumerIndex;
    use crate::registry;
    use crate::testing;

    fn reason(conf: Value) -> String {
        testing::refusal(NAME, &conf)
    }

    #[test]
    fn schema_errors() {
        assert_eq!(registry::find(NAME).unwrap().priority(), 1001);
        assert_eq!(
            reason(json!({"burst": 0, "key": "remote_addr"})),
            "property \"rate\" is required"
        );
        assert!(reason(json!({"rate": 0, "burst": 0, "key": "remote_addr"})).contains("rate"));
        assert!(reason(json!({"rate": 1, "burst": -1, "key": "remote_addr"})).contains("burst"));
        assert_eq!(
            reason(json!({"rate": 1, "burst": 0, "key": "k", "policy": "redis"})),
            "then clause did not match"
        );
        assert!(registry::check(
            NAME,
            &json!({"rate": 1, "burst": 0, "key": "k", "policy": "redis", "redis_host": "127.0.0.1"}),
            SchemaType::Route
        )
        .is_ok());
        assert!(registry::check(
            NAME,
            &json!({"rate": 0.5, "burst": 0, "key": "remote_addr"}),
            SchemaType::Route
        )
        .is_ok());
    }

    #[test]
    fn keys_a_client_rotates_are_bounded_in_bytes() {
        // Two requests per 8 KiB key keep each bucket draining for 1000 s.
        let b = Buckets::default();
        let t0 = Instant::now();
        let pad = "x".repeat(8 << 10);
        for i in 0..3_000 {
            let key = format!("{i}{pad}");
            b.incoming(&key, 0.001, 5.0, t0);
            b.incoming(&key, 0.001, 5.0, t0);
        }
        let held = b.map.lock().unwrap();
        assert!(held.bytes <= LOCAL_STATE_BYTES, "{} bytes", held.bytes);
        assert!(held.map.len() > 1_000, "only {} kept", held.map.len());
        assert_eq!(
            held.bytes,
            held.map.keys().map(|k| entry_bytes(k)).sum::<usize>()
        );
    }

    #[test]
    fn leaky_bucket_as_resty_limit_req() {
        let b = Buckets::default();
        let t0 = Instant::now();
        // rate 2/s, burst 1: the first is free, the second waits 0.5 s,
        // the third is over.
        assert_eq!(b.incoming("k", 2.0, 1.0, t0), Some(0.0));
        assert_eq!(b.incoming("k", 2.0, 1.0, t0), Some(0.5));
        assert_eq!(b.incoming("k", 2.0, 1.0, t0), None);
        // A rejection does not fill the bucket: half a second later the
        // excess has drained to 0.
        assert_eq!(
            b.incoming("k", 2.0, 1.0, t0 + Duration::from_millis(500)),
            Some(0.5)
        );
        assert_eq!(b.incoming("other", 2.0, 1.0, t0), Some(0.0));
    }

    #[tokio::test]
    async fn rejects_and_delays_through_the_chain() {
        let set = testing::compile(&json!({NAME: {"rate": 1, "burst": 0, "key": "remote_addr", "rejected_code": 429, "rejected_msg": "too fast"}})).unwrap();
        let chain = testing::chain(Vec::new(), set, ConsumerIndex::default());
        assert_eq!(
            testing::send(chain.clone(), testing::request("127.0.0.1", "/", &[]))
                .await
                .status,
            200
        );
        let second = testing::send(chain.clone(), testing::request("127.0.0.1", "/", &[])).await;
        assert_eq!(second.status, 429);
        assert_eq!(second.json(), json!({"error_msg": "too fast"}));
        // Another client has its own bucket.
        assert_eq!(
            testing::send(chain, testing::request("127.0.0.2", "/", &[]))
                .await
                .status,
            200
        );

        let set = testing::compile(&json!({NAME: {"rate": 10, "burst": 1, "key": "remote_addr"}}))
            .unwrap();
        let chain = testing::chain(Vec::new(), set, ConsumerIndex::default());
        assert_eq!(
            testing::send(chain.clone(), testing::request("127.0.0.1", "/", &[]))
                .await
                .status,
            200
        );
        let start = Instant::now();
        assert_eq!(
            testing::send(chain, testing::request("127.0.0.1", "/", &[]))
                .await
                .status,
            200
        );
        assert!(
            start.elapsed() >= Duration::from_millis(90),
            "delayed {:?}",
            start.elapsed()
        );
    }
}
