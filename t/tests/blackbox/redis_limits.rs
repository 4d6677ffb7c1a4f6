#![allow(clippy::unwrap_used)]
//! limit-count, limit-req and limit-conn on real Redis (a single server and
//! a three-master cluster): counters shared by gateway processes, exact
//! limits under concurrent load, and Redis going away mid-load.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use harness::cluster::{free_port, Node};
use harness::redis::{redis_available, Redis, RedisCluster};
use harness::serde_json::{json, Value};
use harness::{send, upstream, Gateway, Upstream, KEY};

fn route(u: &Upstream, plugins: Value) -> Value {
    route_at(u, "/*", plugins)
}

fn route_at(u: &Upstream, uri: &str, plugins: Value) -> Value {
    json!({"uri": uri, "plugins": plugins, "upstream": upstream(&[(&u.node(), 1)])})
}

fn count_on(port: u16, extra: Value) -> Value {
    let mut conf = json!({
        "count": 3, "time_window": 60, "key": "remote_addr",
        "policy": "redis", "redis_host": "127.0.0.1", "redis_port": port,
        "redis_timeout": 300, "rejected_code": 429
    });
    if let (Some(c), Some(e)) = (conf.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    json!({"limit-count": conf})
}

async fn get(addr: SocketAddr, path: &str) -> harness::Resp {
    send(addr, "GET", path, &[], String::new(), None).await
}

/// A ferrogate process on its own embedded store.
fn process() -> Node {
    let (data, admin) = (free_port(), free_port());
    let yaml = format!(
        "apisix:\n  node_listen:\n    - ip: 127.0.0.1\n      port: {data}\n  ssl:\n    enable: false\n\
         deployment:\n  role: traditional\n  admin:\n    admin_key:\n      - name: admin\n        key: {KEY}\n        role: admin\n\
         \x20   admin_listen:\n      ip: 127.0.0.1\n      port: {admin}\n"
    );
    Node::start_with_config(tempfile::tempdir().unwrap(), &yaml, data, admin)
}

#[tokio::test]
async fn limit_count_counts_in_redis_with_apisix_keys_and_headers() {
    if !redis_available("limit_count_counts_in_redis_with_apisix_keys_and_headers") {
        return;
    }
    let redis = Redis::start();
    let gw = Gateway::start().await;
    let u = Upstream::start("u").await;
    gw.put("routes/r", route(&u, count_on(redis.port, json!({}))))
        .await;
    for left in ["2", "1", "0"] {
        let r = gw.get("/a").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-ratelimit-limit"), Some("3"));
        assert_eq!(r.header("x-ratelimit-remaining"), Some(left));
    }
    let r = gw.get("/a").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    let reset: f64 = r.header("x-ratelimit-reset").unwrap().parse().unwrap();
    assert!(reset > 55.0 && reset <= 60.0, "{reset}");
    let keys = redis.keys();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(
        keys[0].starts_with("plugin-limit-count:v1:/apisix/routes/r:")
            && keys[0].ends_with(":127.0.0.1"),
        "{keys:?}"
    );
    let ttl: i64 = redis.cli(&["TTL", &keys[0]]).trim().parse().unwrap();
    assert!(ttl > 50 && ttl <= 60, "{ttl}");

    // A group shares one counter between routes, under the group's name.
    let grouped = count_on(redis.port, json!({"group": "g1", "count": 2}));
    gw.put("routes/g1", route_at(&u, "/g1", grouped.clone()))
        .await;
    gw.put("routes/g2", route_at(&u, "/g2", grouped)).await;
    assert_eq!(gw.get("/g1").await.status, 200);
    assert_eq!(gw.get("/g2").await.status, 200);
    assert_eq!(gw.get("/g1").await.status, 429);
    assert!(redis
        .keys()
        .contains(&"plugin-limit-count:v1:g1:127.0.0.1".to_string()));
    gw.stop().await;
}

#[tokio::test]
async fn two_gateway_processes_share_counters_on_one_redis() {
    if !redis_available("two_gateway_processes_share_counters_on_one_redis") {
        return;
    }
    let redis = Redis::start();
    let u = Upstream::start("u").await;
    let nodes = [process(), process()];
    for node in &nodes {
        let mut plugins = count_on(redis.port, json!({"count": 4}));
        plugins["limit-req"] = json!({
            "rate": 100, "burst": 100, "key": "remote_addr", "nodelay": true,
            "policy": "redis", "redis_host": "127.0.0.1", "redis_port": redis.port
        });
        let r = node
            .admin("PUT", "routes/shared", Some(route(&u, plugins)))
            .await;
        assert!(r.status.is_success(), "{}", r.text());
    }
    // Both nodes hold the same configuration, so the same counter: four
    // requests in all, whichever node takes them.
    let mut statuses = Vec::new();
    for i in 0..6 {
        statuses.push(nodes[i % 2].get("/x", &[]).await.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429]);
    let limit_req_keys: Vec<String> = redis
        .keys()
        .into_iter()
        .filter(|k| k.starts_with("limit_req:/apisix/routes/shared:"))
        .collect();
    assert_eq!(limit_req_keys.len(), 1, "{:?}", redis.keys());
}

#[tokio::test]
async fn a_limit_of_n_lets_exactly_n_through_under_concurrent_load() {
    if !redis_available("a_limit_of_n_lets_exactly_n_through_under_concurrent_load") {
        return;
    }
    let redis = Redis::start();
    let gw = Gateway::start().await;
    let u = Upstream::start("u").await;
    gw.put(
        "routes/r",
        route(&u, count_on(redis.port, json!({"count": 25}))),
    )
    .await;
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let addr = gw.data;
            tokio::spawn(async move { get(addr, "/c").await.status.as_u16() })
        })
        .collect();
    let mut passed = 0;
    let mut rejected = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => passed += 1,
            429 => rejected += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((passed, rejected), (25, 75));
    gw.stop().await;
}

#[tokio::test]
async fn redis_stopped_mid_load_never_hangs_a_request() {
    if !redis_available("redis_stopped_mid_load_never_hangs_a_request") {
        return;
    }
    let mut redis = Redis::start();
    let gw = Gateway::start().await;
    let u = Upstream::start("u").await;
    let strict = count_on(redis.port, json!({"count": 1_000_000}));
    let lenient = count_on(
        redis.port,
        json!({"count": 1_000_000, "allow_degradation": true}),
    );
    gw.put("routes/strict", route_at(&u, "/strict", strict))
        .await;
    gw.put("routes/lenient", route_at(&u, "/lenient", lenient))
        .await;
    assert_eq!(gw.get("/strict").await.status, 200);

    // Load from several clients while Redis goes away and comes back.
    let addr = gw.data;
    let load: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(async move {
                let path = if i % 2 == 0 { "/strict" } else { "/lenient" };
                let mut worst = Duration::ZERO;
                let mut seen = Vec::new();
                let end = Instant::now() + Duration::from_millis(2500);
                while Instant::now() < end {
                    let start = Instant::now();
                    let r = get(addr, path).await;
                    worst = worst.max(start.elapsed());
                    seen.push((r.status.as_u16(), r.text()));
                }
                (path, worst, seen)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.stop();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    redis.restart();
    for t in load {
        let (path, worst, seen) = t.await.unwrap();
        // redis_timeout is 300 ms: no request waits much beyond it.
        assert!(worst < Duration::from_secs(2), "{path}: worst {worst:?}");
        if path == "/lenient" {
            assert!(seen.iter().all(|(s, _)| *s == 200), "{path}: {seen:?}");
        } else {
            let failed: Vec<_> = seen.iter().filter(|(s, _)| *s == 500).collect();
            assert!(!failed.is_empty(), "Redis was down: some 500s expected");
            assert_eq!(
                failed[0].1.trim_end(),
                r#"{"error_msg":"failed to limit count"}"#
            );
            let odd: Vec<_> = seen
                .iter()
                .filter(|(s, _)| *s != 200 && *s != 500)
                .collect();
            assert!(odd.is_empty(), "{:?}", &odd[..odd.len().min(3)]);
        }
    }
    // Back: counting again, without a restart of the gateway.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = gw.get("/strict").await;
        if r.status == 200 && r.header("x-ratelimit-remaining").is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {} after Redis came back",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!redis.keys().is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn limit_req_and_limit_conn_on_redis() {
    if !redis_available("limit_req_and_limit_conn_on_redis") {
        return;
    }
    let redis = Redis::start();
    let gw = Gateway::start().await;
    let u = Upstream::start("u").await;
    let on_redis = json!({"policy": "redis", "redis_host": "127.0.0.1", "redis_port": redis.port});
    let mut req = json!({"rate": 1, "burst": 0, "key": "remote_addr", "rejected_code": 429});
    req.as_object_mut()
        .unwrap()
        .extend(on_redis.as_object().unwrap().clone());
    gw.put(
        "routes/req",
        route_at(&u, "/req", json!({"limit-req": req})),
    )
    .await;
    assert_eq!(gw.get("/req").await.status, 200);
    assert_eq!(gw.get("/req").await.status, 429);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(gw.get("/req").await.status, 200);

    let mut conn = json!({"conn": 1, "burst": 0, "default_conn_delay": 0.1,
                          "key": "remote_addr", "rejected_code": 429});
    conn.as_object_mut()
        .unwrap()
        .extend(on_redis.as_object().unwrap().clone());
    gw.put(
        "routes/conn",
        route_at(&u, "/conn", json!({"limit-conn": conn})),
    )
    .await;
    let addr = gw.data;
    let slow = tokio::spawn(async move { get(addr, "/conn?sleep_ms=800").await.status });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // One in flight (held in Redis): the next is over the limit.
    assert_eq!(gw.get("/conn").await.status, 429);
    let held: Vec<String> = redis
        .keys()
        .into_iter()
        .filter(|k| k.starts_with("limit_conn:/apisix/routes/conn:"))
        .collect();
    assert_eq!(held.len(), 1);
    assert_eq!(redis.cli(&["ZCARD", &held[0]]).trim(), "1");
    assert_eq!(slow.await.unwrap(), 200);
    // The slot is given back once the response is done.
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.cli(&["ZCARD", &held[0]]).trim() != "0" {
        assert!(Instant::now() < deadline, "the slot was not given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gw.get("/conn").await.status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn limit_count_on_a_redis_cluster() {
    if !redis_available("limit_count_on_a_redis_cluster") {
        return;
    }
    let cluster = RedisCluster::start();
    let gw = Gateway::start().await;
    let u = Upstream::start("u").await;
    gw.put(
        "routes/r",
        route(
            &u,
            json!({"limit-count": {
                "count": 2, "time_window": 60, "key_type": "var", "key": "http_x_user",
                "policy": "redis-cluster", "redis_cluster_nodes": cluster.nodes(),
                "redis_cluster_name": "test", "redis_timeout": 1000, "rejected_code": 429
            }}),
        ),
    )
    .await;
    // Many users: their keys land on every master.
    for user in 0..12 {
        let h = [("x-user", user.to_string())];
        for want in [200, 200, 429] {
            let r = send(gw.data, "GET", "/u", &h, String::new(), None).await;
            assert_eq!(r.status, want, "user {user}: {}", r.text());
        }
    }
    let keys = cluster.keys();
    assert_eq!(keys.len(), 12, "{keys:?}");
    let per_node: Vec<usize> = cluster
        .ports
        .iter()
        .map(|p| {
            harness::redis::cli_at(*p, &["DBSIZE"])
                .trim()
                .parse()
                .unwrap_or(0)
        })
        .collect();
    assert!(
        per_node.iter().filter(|n| **n > 0).count() >= 2,
        "{per_node:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn limit_count_over_tls_to_redis() {
    if !redis_available("limit_count_over_tls_to_redis") {
        return;
    }
    let redis = Redis::start_tls();
    let gw = Gateway::start().await;
    let u = Upstream::start("u").await;
    // redis_ssl_verify false (APISIX's default): encrypted, the
    // self-signed certificate not checked.
    gw.put(
        "routes/r",
        route(
            &u,
            count_on(redis.port, json!({"count": 1, "redis_ssl": true})),
        ),
    )
    .await;
    let r = gw.get("/t").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(gw.get("/t").await.status, 429);
    // Verified against the system's roots, the self-signed one fails: 500.
    gw.put(
        "routes/r",
        route(
            &u,
            count_on(
                redis.port,
                json!({"count": 1, "redis_ssl": true, "redis_ssl_verify": true}),
            ),
        ),
    )
    .await;
    assert_eq!(gw.get("/t").await.status, 500);
    gw.stop().await;
}
