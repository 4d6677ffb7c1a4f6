use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::chain::{Entry, PluginSet};
use crate::consumer::ConsumerIndex;
use crate::plugin::StateCache;
use crate::registry::PluginError;
use crate::testing::{self, send, Answer};

fn check_err(conf: Value) -> String {
    match testing::compile(&json!({ NAME: conf })) {
        Err(PluginError::Invalid { reason, .. }) => reason,
        other => panic!("expected an invalid configuration, got {other:?}"),
    }
}

#[test]
fn schema_errors_use_apisix_wording() {
    let cases = [
        (
            json!({"time_window": 60, "rejected_code": 503}),
            "value should match only one schema, but matches none",
        ),
        (
            json!({"count": -100, "time_window": 60}),
            "property \"count\" validation failed: value should match only one schema, but matches none",
        ),
        (
            json!({"count": 2, "time_window": 0}),
            "property \"time_window\" validation failed: value should match only one schema, but matches none",
        ),
        (
            json!({"count": 2, "time_window": 60, "rejected_msg": true}),
            "property \"rejected_msg\" validation failed: wrong type: expected string, got boolean",
        ),
        (
            json!({"count": 2, "time_window": 60, "rejected_msg": ""}),
            "property \"rejected_msg\" validation failed: string too short, expected at least 1, got 0",
        ),
        (
            json!({"count": 2, "time_window": 60, "rejected_code": 600}),
            "property \"rejected_code\" validation failed: expected 600 to be at most 599",
        ),
        (
            json!({"count": 2, "time_window": 60, "key_type": "header"}),
            "property \"key_type\" validation failed: matches none of the enum values",
        ),
        (
            json!({"count": 2, "time_window": 60, "policy": "memcached"}),
            "property \"policy\" validation failed: matches none of the enum values",
        ),
        (
            json!({"count": 2, "time_window": 60, "rules": [{"count": 1, "time_window": 1, "key": "a"}]}),
            "count/time_window and rules cannot be specified at the same time",
        ),
        (
            json!({"count": 2, "rules": [{"count": 1, "time_window": 1, "key": "a"}]}),
            "count/time_window and rules cannot be specified at the same time",
        ),
        (
            json!({"group": "g", "rules": [{"count": 1, "time_window": 1, "key": "a"}]}),
            "group and rules cannot be specified at the same time",
        ),
        (
            json!({"rules": [{"count": 1, "time_window": 1, "key": "$a"}, {"count": 2, "time_window": 2, "key": "$a"}]}),
            "duplicate key '$a' in rules",
        ),
        (
            json!({"rules": [{"count": 1, "time_window": 1}]}),
            "property \"rules\" validation failed: failed to validate item 1: property \"key\" is required",
        ),
        (
            json!({"count": 2, "time_window": 60, "policy": "redis"}),
            "then clause did not match",
        ),
        (
            json!({"count": 2, "time_window": 60, "policy": "redis-cluster", "redis_cluster_nodes": ["a:1"]}),
            "else clause did not match",
        ),
        (
            json!({"count": 2, "time_window": 60, "policy": "redis-sentinel"}),
            "else clause did not match",
        ),
        (
            json!({"count": 2, "time_window": 60, "policy": "redis", "redis_host": "127.0.0.1", "sync_interval": 0.05}),
            "sync_interval should not be smaller than 0.1",
        ),
        (
            json!({"count": 2, "time_window": 1, "policy": "redis", "redis_host": "127.0.0.1", "sync_interval": 2}),
            "sync_interval should be smaller than time_window",
        ),
    ];
    for (conf, want) in cases {
        assert_eq!(check_err(conf.clone()), want, "{conf}");
    }
    for ok in [
        json!({"count": 2, "time_window": 60}),
        json!({"count": "$http_x_count", "time_window": "60", "key_type": "var_combination", "key": "$remote_addr $http_x"}),
        json!({"rules": [{"count": 1, "time_window": 1, "key": "$a", "header_prefix": "A"}]}),
    ] {
        assert!(check(&ok).is_ok(), "{ok}");
    }
    // Metadata.
    let spec = crate::find(NAME).expect("registered");
    assert_eq!(
        spec.check(&json!({"limit_header": 1}), SchemaType::Metadata)
            .unwrap_err(),
        "property \"limit_header\" validation failed: wrong type: expected string, got number"
    );
    assert!(spec
        .check(&json!({"limit_header": "X-Limit"}), SchemaType::Metadata)
        .is_ok());
}

#[test]
fn sentinel_and_sliding_windows_are_refused_yet() {
    // APISIX's schema takes them; the check refuses them, so the Admin API
    // never stores what the data plane would not run.
    let redis =
        json!({"count": 2, "time_window": 60, "policy": "redis", "redis_host": "127.0.0.1"});
    assert!(check(&redis).is_ok());
    let cluster = json!({"count": 2, "time_window": 60, "policy": "redis-cluster",
                         "redis_cluster_nodes": ["127.0.0.1:7000"], "redis_cluster_name": "c"});
    assert!(check(&cluster).is_ok());
    let sentinel = json!({"count": 2, "time_window": 60, "policy": "redis-sentinel",
                          "redis_sentinels": [{"host": "127.0.0.1", "port": 26379}],
                          "redis_master_name": "m"});
    assert!(super::schema().validate(&sentinel).is_ok());
    assert!(check_err(sentinel).starts_with("policy redis-sentinel is not supported yet"));
    let sliding = json!({"count": 2, "time_window": 60, "window_type": "sliding"});
    assert!(check_err(sliding).starts_with("window_type sliding is not supported yet"));
}

fn header(a: &Answer, name: &str) -> Option<String> {
    a.headers
        .get(name)
        .map(|v| v.to_str().unwrap_or_default().to_string())
}

fn quota(a: &Answer) -> (u16, Option<String>, Option<String>, Option<String>) {
    (
        a.status.as_u16(),
        header(a, "x-ratelimit-limit"),
        header(a, "x-ratelimit-remaining"),
        header(a, "x-ratelimit-reset"),
    )
}

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

async fn hit(set: &PluginSet, client: &str, headers: &[(&str, &str)]) -> Answer {
    let chain = testing::chain(Vec::new(), set.clone(), ConsumerIndex::default());
    send(chain, testing::request(client, "/hello", headers)).await
}

#[tokio::test]
async fn counts_per_client_and_rejects_past_the_limit() {
    let set = testing::compile(&json!({NAME: {"count": 2, "time_window": 60}})).unwrap();
    let first = hit(&set, "10.0.0.1", &[]).await;
    assert_eq!(quota(&first), (200, s("2"), s("1"), s("60")));
    assert_eq!(first.json()["uri"], "/hello");
    let second = hit(&set, "10.0.0.1", &[]).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(header(&second, "x-ratelimit-remaining"), s("0"));
    let reset: f64 = header(&second, "x-ratelimit-reset")
        .unwrap()
        .parse()
        .unwrap();
    assert!(reset > 59.0 && reset <= 60.0, "{reset}");
    let third = hit(&set, "10.0.0.1", &[]).await;
    assert_eq!(third.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(third.body, "");
    assert_eq!(header(&third, "x-ratelimit-limit"), s("2"));
    assert_eq!(header(&third, "x-ratelimit-remaining"), s("0"));
    // Another client has its own window.
    let other = hit(&set, "10.0.0.2", &[]).await;
    assert_eq!(quota(&other), (200, s("2"), s("1"), s("60")));
}

#[tokio::test]
async fn rejected_code_and_message() {
    let set = testing::compile(&json!({NAME: {
        "count": 1, "time_window": 60, "rejected_code": 429, "rejected_msg": "Requests are too frequent"
    }}))
    .unwrap();
    assert_eq!(hit(&set, "10.0.0.1", &[]).await.status, StatusCode::OK);
    let rejected = hit(&set, "10.0.0.1", &[]).await;
    assert_eq!(rejected.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        rejected.body,
        "{\"error_msg\":\"Requests are too frequent\"}\n"
    );
    assert_eq!(rejected.headers["content-type"], "application/json");
}

#[tokio::test]
async fn quota_headers_can_be_hidden() {
    let set = testing::compile(&json!({NAME: {
        "count": 1, "time_window": 60, "show_limit_quota_header": false
    }}))
    .unwrap();
    let a = hit(&set, "10.0.0.1", &[]).await;
    assert_eq!(quota(&a), (200, None, None, None));
    let b = hit(&set, "10.0.0.1", &[]).await;
    assert_eq!(quota(&b), (503, None, None, None));
}

#[tokio::test]
async fn key_types() {
    // A variable; missing, it falls back to the client address.
    let set =
        testing::compile(&json!({NAME: {"count": 1, "time_window": 60, "key": "http_x_api_key"}}))
            .unwrap();
    assert_eq!(
        hit(&set, "10.0.0.1", &[("x-api-key", "k1")]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        hit(&set, "10.0.0.2", &[("x-api-key", "k1")])
            .await
            .status
            .as_u16(),
        503
    );
    assert_eq!(
        hit(&set, "10.0.0.2", &[("x-api-key", "k2")]).await.status,
        StatusCode::OK
    );
    assert_eq!(hit(&set, "10.0.0.3", &[]).await.status, StatusCode::OK);
    assert_eq!(hit(&set, "10.0.0.3", &[]).await.status.as_u16(), 503);

    let set = testing::compile(&json!({NAME: {
        "count": 1, "time_window": 60, "key_type": "var_combination", "key": "$http_x_user:$arg_tenant"
    }}))
    .unwrap();
    assert_eq!(
        hit(&set, "10.0.0.1", &[("x-user", "u")]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        hit(&set, "10.0.0.2", &[("x-user", "u")])
            .await
            .status
            .as_u16(),
        503
    );
    // No variable resolved: the client address.
    assert_eq!(hit(&set, "10.0.0.9", &[]).await.status, StatusCode::OK);
    assert_eq!(hit(&set, "10.0.0.9", &[]).await.status.as_u16(), 503);

    let set = testing::compile(&json!({NAME: {
        "count": 1, "time_window": 60, "key_type": "constant", "key": "everyone"
    }}))
    .unwrap();
    assert_eq!(hit(&set, "10.0.0.1", &[]).await.status, StatusCode::OK);
    assert_eq!(hit(&set, "10.0.0.2", &[]).await.status.as_u16(), 503);
}

#[tokio::test]
async fn counters_survive_recompiling_and_reset_on_conf_change() {
    let cache = StateCache::default();
    let none = BTreeMap::new();
    let conf = json!({NAME: {"count": 2, "time_window": 60}});
    let old = testing::compile_with(&conf, &cache, &none).unwrap();
    assert_eq!(hit(&old, "10.0.0.1", &[]).await.status, StatusCode::OK);
    // A new snapshot while the old one is still live (an unrelated change).
    let new = testing::compile_with(&conf, &cache, &none).unwrap();
    drop(old);
    assert_eq!(quota(&hit(&new, "10.0.0.1", &[]).await).2, s("0"));
    assert_eq!(hit(&new, "10.0.0.1", &[]).await.status.as_u16(), 503);
    // Same conf, written in another key order: still the same counters.
    let reordered = json!({NAME: {"time_window": 60, "count": 2}});
    let same = testing::compile_with(&reordered, &cache, &none).unwrap();
    assert_eq!(hit(&same, "10.0.0.1", &[]).await.status.as_u16(), 503);
    // A changed configuration starts over.
    let changed = json!({NAME: {"count": 3, "time_window": 60}});
    let fresh = testing::compile_with(&changed, &cache, &none).unwrap();
    let a = hit(&fresh, "10.0.0.1", &[]).await;
    assert_eq!(quota(&a), (200, s("3"), s("2"), s("60")));
    drop((new, same));
    // Once nobody holds the old counters they are gone.
    let back = testing::compile_with(&conf, &cache, &none).unwrap();
    assert_eq!(quota(&hit(&back, "10.0.0.1", &[]).await).2, s("1"));
}

#[tokio::test]
async fn metadata_renames_the_headers() {
    let cache = StateCache::default();
    let metadata = BTreeMap::from([(
        NAME.to_string(),
        json!({"limit_header": "X-Limit-Quota", "remaining_header": "X-Limit-Left", "reset_header": "X-Limit-Reset"}),
    )]);
    let set = testing::compile_with(
        &json!({NAME: {"count": 1, "time_window": 60}}),
        &cache,
        &metadata,
    )
    .unwrap();
    let a = hit(&set, "10.0.0.1", &[]).await;
    assert_eq!(header(&a, "x-limit-quota"), s("1"));
    assert_eq!(header(&a, "x-limit-left"), s("0"));
    assert_eq!(header(&a, "x-limit-reset"), s("60"));
    assert_eq!(header(&a, "x-ratelimit-limit"), None);
    let b = hit(&set, "10.0.0.1", &[]).await;
    assert_eq!(b.status.as_u16(), 503);
    assert_eq!(header(&b, "x-limit-left"), s("0"));

    // Only some renamed; an unusable name keeps the default.
    let metadata = BTreeMap::from([(
        NAME.to_string(),
        json!({"remaining_header": "X-Left", "limit_header": "bad header"}),
    )]);
    let set = testing::compile_with(
        &json!({NAME: {"count": 5, "time_window": 60}}),
        &StateCache::default(),
        &metadata,
    )
    .unwrap();
    let a = hit(&set, "10.0.0.1", &[]).await;
    assert_eq!(header(&a, "x-ratelimit-limit"), s("5"));
    assert_eq!(header(&a, "x-left"), s("4"));
    assert_eq!(header(&a, "x-ratelimit-reset"), s("60"));
}

/// A clock tests move by hand.
#[derive(Clone)]
struct FakeClock {
    base: Instant,
    offset_ms: Arc<AtomicU64>,
}

impl FakeClock {
    fn new() -> Self {
        FakeClock {
            base: Instant::now(),
            offset_ms: Arc::new(AtomicU64::new(0)),
        }
    }
    fn advance(&self, ms: u64) {
        self.offset_ms.fetch_add(ms, Ordering::SeqCst);
    }
    fn clock(&self) -> Clock {
        let me = self.clone();
        Arc::new(move || me.base + Duration::from_millis(me.offset_ms.load(Ordering::SeqCst)))
    }
}

fn cx<'a>(owner: &'a str, conf: &'a Value, state: &'a StateCache) -> CompileCx<'a> {
    CompileCx {
        owner,
        metadata: None,
        attr: None,
        state,
        conf,
        name: NAME,
        upstream_exists: None,
    }
}

fn set_of(plugin: LimitCount) -> PluginSet {
    PluginSet::new(vec![Entry::new(NAME, PRIORITY, Arc::new(plugin))])
}

#[tokio::test]
async fn windows_reset_when_they_end() {
    let clock = FakeClock::new();
    let state = StateCache::default();
    let conf = json!({"count": 2, "time_window": 60});
    let set =
        set_of(compile_with_clock(&conf, &cx("routes/1", &conf, &state), clock.clock()).unwrap());
    assert_eq!(
        quota(&hit(&set, "10.0.0.1", &[]).await),
        (200, s("2"), s("1"), s("60"))
    );
    clock.advance(500);
    assert_eq!(
        quota(&hit(&set, "10.0.0.1", &[]).await),
        (200, s("2"), s("0"), s("59.5"))
    );
    clock.advance(20_250);
    assert_eq!(
        quota(&hit(&set, "10.0.0.1", &[]).await),
        (503, s("2"), s("0"), s("39.25"))
    );
    clock.advance(39_249);
    assert_eq!(
        quota(&hit(&set, "10.0.0.1", &[]).await),
        (503, s("2"), s("0"), s("0"))
    );
    clock.advance(1);
    // The window is over: a new one starts.
    assert_eq!(
        quota(&hit(&set, "10.0.0.1", &[]).await),
        (200, s("2"), s("1"), s("60"))
    );
}

#[tokio::test]
async fn groups_share_counters_across_routes() {
    let state = StateCache::default();
    let conf = json!({"count": 2, "time_window": 60, "group": "services"});
    let r1 = set_of(compile(&conf, &cx("routes/1", &conf, &state)).unwrap());
    let r2 = set_of(compile(&conf, &cx("routes/2", &conf, &state)).unwrap());
    assert_eq!(hit(&r1, "10.0.0.1", &[]).await.status, StatusCode::OK);
    assert_eq!(hit(&r2, "10.0.0.1", &[]).await.status, StatusCode::OK);
    assert_eq!(hit(&r1, "10.0.0.1", &[]).await.status.as_u16(), 503);
    // Without a group, each route counts for itself.
    let plain = json!({"count": 1, "time_window": 60});
    let p1 = set_of(compile(&plain, &cx("routes/1", &plain, &state)).unwrap());
    let p2 = set_of(compile(&plain, &cx("routes/2", &plain, &state)).unwrap());
    assert_eq!(hit(&p1, "10.0.0.1", &[]).await.status, StatusCode::OK);
    assert_eq!(hit(&p2, "10.0.0.1", &[]).await.status, StatusCode::OK);
    assert_eq!(hit(&p2, "10.0.0.1", &[]).await.status.as_u16(), 503);
}

#[tokio::test]
async fn dynamic_count_and_degradation() {
    let set =
        testing::compile(&json!({NAME: {"count": "$http_x_limit", "time_window": "60"}})).unwrap();
    let a = hit(&set, "10.0.0.1", &[("x-limit", "1")]).await;
    assert_eq!(quota(&a), (200, s("1"), s("0"), s("60")));
    assert_eq!(
        hit(&set, "10.0.0.1", &[("x-limit", "1")])
            .await
            .status
            .as_u16(),
        503
    );
    // Raising the limit lets the same window go on.
    assert_eq!(
        hit(&set, "10.0.0.1", &[("x-limit", "3")]).await.status,
        StatusCode::OK
    );
    // Unresolvable: 500, or through with allow_degradation.
    assert_eq!(hit(&set, "10.0.0.2", &[]).await.status.as_u16(), 500);
    assert_eq!(
        hit(&set, "10.0.0.2", &[("x-limit", "1.5")])
            .await
            .status
            .as_u16(),
        500
    );
    let lenient = testing::compile(&json!({NAME: {
        "count": "$http_x_limit", "time_window": 60, "allow_degradation": true
    }}))
    .unwrap();
    assert_eq!(hit(&lenient, "10.0.0.2", &[]).await.status, StatusCode::OK);
    assert_eq!(
        parse_resolved("0").unwrap_err(),
        "resolved value must be a positive number, got: 0"
    );
    assert_eq!(
        parse_resolved("2.5").unwrap_err(),
        "resolved value must be an integer, got: 2.5"
    );
    assert_eq!(
        parse_resolved("abc").unwrap_err(),
        "resolved value is not a number"
    );
    assert_eq!(parse_resolved(" 7 ").unwrap(), 7);
}

#[tokio::test]
async fn rules_limit_by_several_keys() {
    let set = testing::compile(&json!({NAME: {"rules": [
        {"count": 2, "time_window": 60, "key": "$http_x_user", "header_prefix": "User"},
        {"count": 1, "time_window": 30, "key": "${http_x_team}"}
    ]}}))
    .unwrap();
    let a = hit(&set, "10.0.0.1", &[("x-user", "jack"), ("x-team", "a")]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(header(&a, "x-user-ratelimit-limit"), s("2"));
    assert_eq!(header(&a, "x-user-ratelimit-remaining"), s("1"));
    assert_eq!(header(&a, "x-2-ratelimit-limit"), s("1"));
    assert_eq!(header(&a, "x-2-ratelimit-reset"), s("30"));
    // The team rule rejects.
    let b = hit(&set, "10.0.0.1", &[("x-user", "jack"), ("x-team", "a")]).await;
    assert_eq!(b.status.as_u16(), 503);
    assert_eq!(header(&b, "x-user-ratelimit-remaining"), s("0"));
    assert_eq!(header(&b, "x-2-ratelimit-remaining"), s("0"));
    // Only the user rule applies.
    let c = hit(&set, "10.0.0.1", &[("x-user", "rose")]).await;
    assert_eq!(c.status, StatusCode::OK);
    assert_eq!(header(&c, "x-2-ratelimit-limit"), None);
    // No rule applies: APISIX answers 500.
    assert_eq!(hit(&set, "10.0.0.1", &[]).await.status.as_u16(), 500);
}

#[test]
fn expired_windows_are_swept() {
    let counters = Counters::default();
    let t0 = Instant::now();
    for i in 0..10_000 {
        counters.incoming(&format!("k{i}"), 5, 1, 1, t0);
    }
    assert_eq!(counters.len(), 10_000);
    let later = t0 + Duration::from_secs(2);
    for i in 0..10_000 {
        counters.incoming(&format!("n{i}"), 5, 1, 1, later);
    }
    // Each shard swept its expired keys while growing.
    assert!(counters.len() < 15_000, "{}", counters.len());
    let outcome = counters.incoming("n1", 5, 1, 1, later);
    assert_eq!(outcome.remaining, 3);
}

#[test]
fn keys_a_client_rotates_are_bounded_in_bytes() {
    // 8 KiB keys (a header's worth), all in a long window: at most about
    // 10 MiB of them are kept, however many come.
    let counters = Counters::default();
    let t0 = Instant::now();
    let pad = "x".repeat(8 << 10);
    for i in 0..5_000 {
        counters.incoming(&format!("{i}{pad}"), 5, 3600, 1, t0);
    }
    let held = counters.len();
    assert!(
        held * (8 << 10) <= LOCAL_STATE_BYTES,
        "{held} keys of 8 KiB held"
    );
    assert!(held > 1_000, "only {held} keys held");
    // Short keys still count as they should.
    for _ in 0..3 {
        counters.incoming("rose", 5, 3600, 1, t0);
    }
    assert_eq!(counters.incoming("rose", 5, 3600, 1, t0).remaining, 1);
}

#[test]
fn registered() {
    let spec = crate::find(NAME).expect("registered");
    assert_eq!(spec.priority(), PRIORITY);
    assert!(spec.metadata_schema().is_some());
    let doc = spec.schema().to_json();
    assert_eq!(doc["if"]["properties"]["policy"]["enum"][0], "redis");
    assert_eq!(doc["then"]["required"][0], "redis_host");
}

#[test]
fn reset_header_values_as_lua_prints_them() {
    for (reset, text) in [
        (60.0, "60"),
        (59.5, "59.5"),
        (0.07, "0.07"),
        (59.99, "59.99"),
        (1.1, "1.1"),
    ] {
        assert_eq!(super::reset_value(reset), text, "{reset}");
    }
}
