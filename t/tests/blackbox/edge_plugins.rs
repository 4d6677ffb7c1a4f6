#![allow(clippy::unwrap_used)]
//! cors, redirect, request-id and real-ip through the real server, with
//! the plugins around them (key-auth, ip-restriction) and a real upstream.

use harness::serde_json::json;
use harness::{send, upstream, Gateway, Resp, Upstream};

async fn call(gw: &Gateway, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
    let headers: Vec<(&str, String)> = headers.iter().map(|(k, v)| (*k, v.to_string())).collect();
    send(gw.data, method, path, &headers, String::new(), None).await
}

#[tokio::test]
async fn cors_answers_preflight_before_auth_and_decorates_refusals() {
    let gw = Gateway::start().await;
    let up = Upstream::start("cors").await;
    gw.put(
        "consumers",
        json!({"username": "jack", "plugins": {"key-auth": {"key": "jack-key"}}}),
    )
    .await;
    gw.put(
        "routes/1",
        json!({"uri": "/api", "upstream": upstream(&[(&up.node(), 1)]), "plugins": {
            "key-auth": {},
            "cors": {"allow_origins": "https://app.test,https://admin.test", "allow_methods": "GET,POST",
                     "allow_headers": "apikey", "allow_credential": true, "expose_headers": "X-Request-Id"}
        }}),
    )
    .await;
    // A browser's preflight carries no key: the gateway answers it.
    let pre = call(
        &gw,
        "OPTIONS",
        "/api",
        &[
            ("origin", "https://app.test"),
            ("access-control-request-method", "POST"),
        ],
    )
    .await;
    assert_eq!(pre.status, 200, "{}", pre.text());
    assert_eq!(up.hits(), 0);
    assert_eq!(
        pre.header("access-control-allow-origin"),
        Some("https://app.test")
    );
    assert_eq!(pre.header("access-control-allow-methods"), Some("GET,POST"));
    assert_eq!(pre.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(pre.header("vary"), Some("Origin"));
    // key-auth's refusal still carries CORS headers, so the page can read it.
    let refused = call(&gw, "GET", "/api", &[("origin", "https://admin.test")]).await;
    assert_eq!(refused.status, 401);
    assert_eq!(
        refused.header("access-control-allow-origin"),
        Some("https://admin.test")
    );
    let ok = call(
        &gw,
        "GET",
        "/api",
        &[("origin", "https://app.test"), ("apikey", "jack-key")],
    )
    .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.upstream(), "cors");
    assert_eq!(
        ok.header("access-control-expose-headers"),
        Some("X-Request-Id")
    );
    // An origin not listed gets nothing to allow it.
    let other = call(
        &gw,
        "GET",
        "/api",
        &[("origin", "https://evil.test"), ("apikey", "jack-key")],
    )
    .await;
    assert_eq!(other.status, 200);
    assert_eq!(other.header("access-control-allow-origin"), None);
}

#[tokio::test]
async fn redirect_to_https_uses_the_configured_port_and_keeps_the_method() {
    let gw = Gateway::start_with("plugin_attr:\n  redirect:\n    https_port: 8443\n").await;
    let up = Upstream::start("r").await;
    gw.put(
        "routes/1",
        json!({"uri": "/secure/*", "upstream": upstream(&[(&up.node(), 1)]),
               "plugins": {"redirect": {"http_to_https": true}}}),
    )
    .await;
    gw.put(
        "routes/2",
        json!({"uri": "/old/*", "upstream": upstream(&[(&up.node(), 1)]),
               "plugins": {"redirect": {"regex_uri": ["^/old/(.*)", "/new/$1"], "ret_code": 301, "append_query_string": true}}}),
    )
    .await;
    let get = call(&gw, "GET", "/secure/a?x=1", &[("host", "Shop.Test:9080")]).await;
    assert_eq!(get.status, 301);
    assert_eq!(
        get.header("location"),
        Some("https://shop.test:8443/secure/a?x=1")
    );
    assert!(get.text().contains("301 Moved Permanently"));
    let post = call(&gw, "POST", "/secure/a", &[("host", "shop.test")]).await;
    assert_eq!(post.status, 308);
    let moved = call(&gw, "GET", "/old/page?y=2", &[]).await;
    assert_eq!(moved.status, 301);
    assert_eq!(moved.header("location"), Some("/new/page?y=2"));
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn request_id_reaches_the_upstream_and_the_client() {
    let gw = Gateway::start().await;
    let up = Upstream::start("rid").await;
    gw.put(
        "routes/1",
        json!({"uri": "/id", "upstream": upstream(&[(&up.node(), 1)]),
               "plugins": {"request-id": {"algorithm": "nanoid"}}}),
    )
    .await;
    let a = call(&gw, "GET", "/id", &[]).await;
    let sent = a.json()["headers"]["x-request-id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(sent.len(), 21);
    assert_eq!(a.header("x-request-id"), Some(sent.as_str()));
    let b = call(&gw, "GET", "/id", &[]).await;
    assert_ne!(b.header("x-request-id"), Some(sent.as_str()));
    let mine = call(&gw, "GET", "/id", &[("x-request-id", "trace-42")]).await;
    assert_eq!(mine.json()["headers"]["x-request-id"], "trace-42");
    assert_eq!(mine.header("x-request-id"), Some("trace-42"));
}

#[tokio::test]
async fn real_ip_feeds_ip_restriction_and_the_forwarding_headers() {
    let gw = Gateway::start().await;
    let up = Upstream::start("rip").await;
    gw.put(
        "routes/1",
        json!({"uri": "/rip", "upstream": upstream(&[(&up.node(), 1)]), "plugins": {
            "real-ip": {"source": "http_x_forwarded_for", "trusted_addresses": ["127.0.0.0/8"], "recursive": true},
            "ip-restriction": {"blacklist": ["10.9.9.9"]}
        }}),
    )
    .await;
    let r = call(
        &gw,
        "GET",
        "/rip",
        &[("x-forwarded-for", "1.1.1.1, 10.2.3.4, 127.0.0.5")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["x-real-ip"], "10.2.3.4");
    assert_eq!(
        r.json()["headers"]["x-forwarded-for"],
        "1.1.1.1, 10.2.3.4, 127.0.0.5, 10.2.3.4"
    );
    let denied = call(&gw, "GET", "/rip", &[("x-forwarded-for", "10.9.9.9")]).await;
    assert_eq!(denied.status, 403);
    // Not a client address: the TCP peer stays.
    let junk = call(&gw, "GET", "/rip", &[("x-forwarded-for", "not-an-ip")]).await;
    assert_eq!(junk.json()["headers"]["x-real-ip"], "127.0.0.1");
}

/// Requests to `path` at once; how many got each status.
async fn at_once(gw: &Gateway, path: &str, n: usize) -> std::collections::BTreeMap<u16, usize> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let addr = gw.data;
            let path = path.to_string();
            tokio::spawn(async move {
                send(addr, "GET", &path, &[], String::new(), None)
                    .await
                    .status
                    .as_u16()
            })
        })
        .collect();
    let mut seen = std::collections::BTreeMap::new();
    for t in tasks {
        *seen.entry(t.await.unwrap()).or_default() += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_req_lets_exactly_rate_plus_burst_through_at_once() {
    let gw = Gateway::start().await;
    let up = Upstream::start("lr").await;
    gw.put(
        "routes/1",
        json!({"uri": "/lr", "upstream": upstream(&[(&up.node(), 1)]),
               "plugins": {"limit-req": {"rate": 1, "burst": 4, "nodelay": true, "key": "remote_addr"}}}),
    )
    .await;
    let seen = at_once(&gw, "/lr", 20).await;
    assert_eq!(seen.get(&200), Some(&5), "{seen:?}");
    assert_eq!(seen.get(&503), Some(&15), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_conn_counts_requests_in_flight_and_gives_slots_back() {
    let gw = Gateway::start().await;
    let up = Upstream::start("lc").await;
    gw.put(
        "routes/1",
        json!({"uri": "/lc", "upstream": upstream(&[(&up.node(), 1)]),
               "plugins": {"limit-conn": {"conn": 3, "burst": 0, "default_conn_delay": 0.1, "key": "remote_addr"}}}),
    )
    .await;
    let seen = at_once(&gw, "/lc?sleep_ms=600", 8).await;
    assert_eq!(seen.get(&200), Some(&3), "{seen:?}");
    assert_eq!(seen.get(&503), Some(&5), "{seen:?}");
    // Every slot came back: three at once pass again.
    let again = at_once(&gw, "/lc?sleep_ms=200", 3).await;
    assert_eq!(again.get(&200), Some(&3), "{again:?}");

    // A client that goes away while its request is in flight gives its
    // slot back too.
    for _ in 0..3 {
        let addr = gw.data;
        let gone = tokio::spawn(async move {
            send(addr, "GET", "/lc?sleep_ms=3000", &[], String::new(), None).await
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        gone.abort();
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let after = at_once(&gw, "/lc", 3).await;
    assert_eq!(after.get(&200), Some(&3), "{after:?}");
}

#[tokio::test]
async fn uri_blocker_and_ua_restriction_refuse_before_the_upstream() {
    let gw = Gateway::start().await;
    let up = Upstream::start("guard").await;
    gw.put(
        "routes/1",
        json!({"uri": "/*", "upstream": upstream(&[(&up.node(), 1)]), "plugins": {
            "uri-blocker": {"block_rules": ["\\.\\./", "(?i)\\.env$"], "rejected_code": 404},
            "ua-restriction": {"denylist": ["^curl/", "sqlmap"], "bypass_missing": true}
        }}),
    )
    .await;
    assert_eq!(call(&gw, "GET", "/static/../secret", &[]).await.status, 404);
    assert_eq!(call(&gw, "GET", "/app/.ENV", &[]).await.status, 404);
    let bot = call(&gw, "GET", "/page", &[("user-agent", "sqlmap/1.7")]).await;
    assert_eq!(bot.status, 403);
    assert_eq!(bot.json(), json!({"message": "Not allowed"}));
    assert_eq!(
        call(&gw, "GET", "/page", &[("user-agent", "Mozilla/5.0")])
            .await
            .status,
        200
    );
    assert_eq!(call(&gw, "GET", "/page", &[]).await.status, 200);
    assert_eq!(up.hits(), 2);
}
