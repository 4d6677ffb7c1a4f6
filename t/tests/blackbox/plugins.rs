#![allow(clippy::unwrap_used)]
//! The plugin runtime end to end: APISIX's phase order, consumers and their
//! plugins, plugin state across config swaps, and standalone reloads that
//! are never served half-applied.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use harness::serde_json::{json, Value};
use harness::{send, upstream, Gateway, Upstream};

async fn get(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> harness::Resp {
    let headers: Vec<(&str, String)> = headers.iter().map(|(k, v)| (*k, v.to_string())).collect();
    send(gw.data, "GET", path, &headers, String::new(), None).await
}

/// key-auth runs in rewrite (priority 2500), ip-restriction in access
/// (priority 3000): a request with no key from a denied address gets
/// key-auth's 401, as in APISIX, not ip-restriction's 403.
#[tokio::test]
async fn rewrite_phase_answers_before_access_phase() {
    let gw = Gateway::start().await;
    let u1 = Upstream::start("u1").await;
    gw.put(
        "consumers",
        json!({"username": "jack", "plugins": {"key-auth": {"key": "jack-key"}}}),
    )
    .await;
    gw.put(
        "routes/1",
        json!({"uri": "/p", "upstream": upstream(&[(&u1.node(), 1)]), "plugins": {
            "ip-restriction": {"blacklist": ["127.0.0.1"]},
            "key-auth": {}
        }}),
    )
    .await;
    let r = get(&gw, "/p", &[]).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json(), json!({"message": "Missing API key in request"}));
    let r = get(&gw, "/p", &[("apikey", "jack-key")]).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(u1.hits(), 0);
    gw.stop().await;
}

/// A consumer's own plugins join the route's once it is identified, and
/// replace route plugins of the same name.
#[tokio::test]
async fn consumer_plugins_are_merged_after_authentication() {
    let gw = Gateway::start().await;
    let u1 = Upstream::start("u1").await;
    gw.put(
        "consumers",
        json!({"username": "jack", "plugins": {
            "key-auth": {"key": "jack-key"},
            "ip-restriction": {"blacklist": ["127.0.0.1"], "message": "not jack"}
        }}),
    )
    .await;
    gw.put(
        "consumers",
        json!({"username": "rose", "plugins": {"key-auth": {"key": "rose-key"}}}),
    )
    .await;
    gw.put(
        "routes/1",
        json!({"uri": "/c", "upstream": upstream(&[(&u1.node(), 1)]), "plugins": {"key-auth": {}}}),
    )
    .await;
    let r = get(&gw, "/c", &[("apikey", "jack-key")]).await;
    assert_eq!(
        (r.status.as_u16(), r.json()),
        (403, json!({"message": "not jack"}))
    );
    let r = get(&gw, "/c", &[("apikey", "rose-key")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["x-consumer-username"], "rose");

    // A consumer group's plugins apply to its members; the consumer's own
    // win over the group's.
    gw.put(
        "consumer_groups/g",
        json!({"plugins": {"ip-restriction": {"blacklist": ["127.0.0.1"], "message": "group"}}}),
    )
    .await;
    gw.put(
        "consumers",
        json!({"username": "rose", "group_id": "g", "plugins": {"key-auth": {"key": "rose-key"}}}),
    )
    .await;
    let r = get(&gw, "/c", &[("apikey", "rose-key")]).await;
    assert_eq!(
        (r.status.as_u16(), r.json()),
        (403, json!({"message": "group"}))
    );
    gw.stop().await;
}

/// Credentials identify their consumer and say which credential it was.
#[tokio::test]
async fn credentials_identify_their_consumer() {
    let gw = Gateway::start().await;
    let u1 = Upstream::start("u1").await;
    gw.put(
        "consumers",
        json!({"username": "jack", "labels": {"custom_id": "c-42"}}),
    )
    .await;
    gw.put(
        "consumers/jack/credentials/cred-1",
        json!({"plugins": {"key-auth": {"key": "cred-key"}}}),
    )
    .await;
    gw.put(
        "routes/1",
        json!({"uri": "/k", "upstream": upstream(&[(&u1.node(), 1)]), "plugins": {"key-auth": {}}}),
    )
    .await;
    let r = get(
        &gw,
        "/k",
        &[("apikey", "cred-key"), ("x-consumer-username", "forged")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let h = &r.json()["headers"];
    assert_eq!(h["x-consumer-username"], "jack");
    assert_eq!(h["x-credential-identifier"], "cred-1");
    assert_eq!(h["x-consumer-custom-id"], "c-42");
    // Deleting the consumer takes its credentials along.
    let d = gw.admin("DELETE", "consumers/jack", None).await;
    assert_eq!(d.status, 200);
    let r = get(&gw, "/k", &[("apikey", "cred-key")]).await;
    assert_eq!(r.status, 401);
    let r = gw
        .admin("GET", "consumers/jack/credentials/cred-1", None)
        .await;
    assert_eq!(r.status, 404);
    gw.stop().await;
}

fn remaining(r: &harness::Resp) -> Option<u64> {
    r.header("x-ratelimit-remaining")
        .and_then(|v| v.parse().ok())
}

/// limit-count's counter survives unrelated changes (other routes, the
/// route's own upstream) and starts afresh when its configuration changes.
#[tokio::test]
async fn plugin_state_survives_unrelated_changes_only() {
    let gw = Gateway::start().await;
    let u1 = Upstream::start("u1").await;
    let route = |count: u64, desc: &str| {
        json!({"uri": "/lc", "desc": desc, "upstream": upstream(&[(&u1.node(), 1)]), "plugins": {
            "limit-count": {"count": count, "time_window": 60}
        }})
    };
    gw.put("routes/1", route(3, "a")).await;
    assert_eq!(remaining(&get(&gw, "/lc", &[]).await), Some(2));
    for i in 0..20 {
        gw.put(
            &format!("routes/other-{i}"),
            json!({"uri": format!("/o{i}"), "upstream": upstream(&[(&u1.node(), 1)])}),
        )
        .await;
    }
    // The route itself changes, its limit-count does not.
    gw.put("routes/1", route(3, "b")).await;
    assert_eq!(remaining(&get(&gw, "/lc", &[]).await), Some(1));
    assert_eq!(remaining(&get(&gw, "/lc", &[]).await), Some(0));
    assert_eq!(get(&gw, "/lc", &[]).await.status, 503);
    // A new configuration: a new counter.
    gw.put("routes/1", route(5, "b")).await;
    assert_eq!(remaining(&get(&gw, "/lc", &[]).await), Some(4));
    gw.stop().await;
}

fn yaml_with(route_id: &str, node: &str, tag: &str) -> String {
    // Every version moves the route to a new id: applied as "delete the old
    // route, then add the new one", a reader in between would see a 404.
    format!(
        "routes:\n  - id: {route_id}\n    uri: /y\n    upstream:\n      nodes:\n        \"{node}\": 1\n    plugins:\n      proxy-rewrite:\n        headers:\n          set:\n            x-version: \"{tag}\"\n#END\n"
    )
}

/// A standalone reload goes from one file to the next in one snapshot:
/// requests during many reloads never see a missing route.
#[tokio::test]
async fn yaml_reload_is_never_served_half_applied() {
    let u1 = Upstream::start("u1").await;
    let node = u1.node();
    let gw = Arc::new(Gateway::start_standalone(&yaml_with("r0", &node, "0")).await);
    // Wait for the first version.
    let mut ok = false;
    for _ in 0..100 {
        if get(&gw, "/y", &[]).await.status == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ok, "standalone route never served");
    let stop = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let load = {
        let (gw, stop, bad, served) = (gw.clone(), stop.clone(), bad.clone(), served.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = get(&gw, "/y", &[]).await;
                served.fetch_add(1, Ordering::Relaxed);
                if r.status != 200 {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let mut last_tag = String::new();
    for v in 1..=8 {
        let tag = v.to_string();
        gw.write_apisix_yaml(&yaml_with(&format!("r{v}"), &node, &tag));
        // The file is polled once a second: wait for this version.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let r = get(&gw, "/y", &[]).await;
            let seen: Value = r.json()["headers"]["x-version"].clone();
            if seen == json!(tag) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "version {tag} never served"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        last_tag = tag;
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(last_tag, "8");
    assert!(served.load(Ordering::Relaxed) > 50);
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "requests saw a half-applied reload"
    );
    match Arc::try_unwrap(gw) {
        Ok(gw) => gw.stop().await,
        Err(_) => panic!("gateway still shared"),
    }
}

/// proxy-rewrite `host` changes the Host the upstream gets; the gateway's
/// `X-Forwarded-Host` still names the host the client asked for.
#[tokio::test]
async fn rewritten_host_keeps_forwarded_host() {
    let gw = Gateway::start().await;
    let u1 = Upstream::start("u1").await;
    gw.put(
        "routes/1",
        json!({"uri": "/h", "upstream": upstream(&[(&u1.node(), 1)]), "plugins": {
            "proxy-rewrite": {"host": "backend.internal"}
        }}),
    )
    .await;
    let r = get(&gw, "/h", &[("host", "api.example.com")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = &r.json()["headers"];
    assert_eq!(seen["host"], "backend.internal");
    assert_eq!(seen["x-forwarded-host"], "api.example.com");
    gw.stop().await;
}

/// A path with non-ASCII characters (percent-encoded by the client, or an
/// invalid sequence) goes through proxy-rewrite re-encoded byte by byte,
/// as nginx sends it, and the connection stays usable.
#[tokio::test]
async fn rewritten_non_ascii_paths_are_reencoded() {
    let gw = Gateway::start().await;
    let u1 = Upstream::start("u1").await;
    gw.put(
        "routes/1",
        json!({"uri": "/api/*", "upstream": upstream(&[(&u1.node(), 1)]), "plugins": {
            "proxy-rewrite": {"host": "backend.internal"}
        }}),
    )
    .await;
    gw.put(
        "routes/2",
        json!({"uri": "/v1/*", "upstream": upstream(&[(&u1.node(), 1)]), "plugins": {
            "proxy-rewrite": {"uri": "/v2$uri"}
        }}),
    )
    .await;
    for (path, expect) in [
        ("/api/caf%C3%A9", "/api/caf%C3%A9"),
        ("/api/%ff", "/api/%EF%BF%BD"),
        ("/v1/%E2%82%AC?x=1", "/v2/v1/%E2%82%AC?x=1"),
    ] {
        let r = get(&gw, path, &[]).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.json()["path"], expect, "{path}");
    }
    gw.stop().await;
}
