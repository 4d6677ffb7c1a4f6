#![allow(clippy::unwrap_used)]
//! traffic-split, api-breaker, fault-injection, referer-restriction and
//! gzip through the real gateway, with real upstreams.

use std::collections::BTreeMap;

use std::time::{Duration, Instant};

use harness::serde_json::{json, Value};
use harness::{send, upstream, Gateway, Upstream};

async fn get_with(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> harness::Resp {
    let headers: Vec<(&str, String)> = headers.iter().map(|(k, v)| (*k, v.to_string())).collect();
    send(gw.data, "GET", path, &headers, String::new(), None).await
}

fn tally(names: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut map = BTreeMap::new();
    for n in names {
        *map.entry(n).or_default() += 1;
    }
    map
}

#[tokio::test]
async fn traffic_split_sends_by_weight_and_match() {
    let gw = Gateway::start().await;
    let (u0, u1, u2) = (
        Upstream::start("u0").await,
        Upstream::start("u1").await,
        Upstream::start("u2").await,
    );
    gw.put("upstreams/canary", upstream(&[(&u1.node(), 1)]))
        .await;
    gw.put(
        "routes/w",
        json!({
            "uri": "/w",
            "upstream": upstream(&[(&u0.node(), 1)]),
            "plugins": {"traffic-split": {"rules": [{"weighted_upstreams": [
                {"upstream_id": "canary", "weight": 2},
                {"upstream": {"type": "roundrobin", "nodes": {u2.node(): 1}}, "weight": 1},
                {"weight": 1}
            ]}]}}
        }),
    )
    .await;
    let mut names = Vec::new();
    for _ in 0..8 {
        let r = gw.get("/w").await;
        assert_eq!(r.status, 200, "{}", r.text());
        names.push(r.upstream());
    }
    assert_eq!(
        tally(names),
        BTreeMap::from([("u0".into(), 2), ("u1".into(), 4), ("u2".into(), 2)])
    );

    // Blue-green: a header decides; other requests keep the route's upstream.
    gw.put(
        "routes/bg",
        json!({
            "uri": "/bg",
            "upstream": upstream(&[(&u0.node(), 1)]),
            "plugins": {"traffic-split": {"rules": [{
                "match": [{"vars": [["http_release", "==", "blue"]]},
                          {"vars": [["arg_beta", "==", "1"]]}],
                "weighted_upstreams": [{"upstream_id": "canary"}]
            }]}}
        }),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(
            get_with(&gw, "/bg", &[("release", "blue")])
                .await
                .upstream(),
            "u1"
        );
        assert_eq!(gw.get("/bg?beta=1").await.upstream(), "u1");
        assert_eq!(
            get_with(&gw, "/bg", &[("release", "green")])
                .await
                .upstream(),
            "u0"
        );
    }

    // The upstream object it names follows its changes.
    gw.put("upstreams/canary", upstream(&[(&u2.node(), 1)]))
        .await;
    assert_eq!(
        get_with(&gw, "/bg", &[("release", "blue")])
            .await
            .upstream(),
        "u2"
    );
    // And cannot be deleted while named.
    let r = gw.admin("DELETE", "upstreams/canary", None).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error_msg"],
        "can not delete this upstream, plugin in route [bg] is still using it now"
    );
    gw.stop().await;
}

#[tokio::test]
async fn traffic_split_refusals_and_missing_upstreams() {
    let gw = Gateway::start().await;
    let (u0, u1) = (Upstream::start("u0").await, Upstream::start("u1").await);
    let r = gw
        .admin(
            "PUT",
            "routes/bad",
            Some(json!({
                "uri": "/bad", "upstream": upstream(&[(&u0.node(), 1)]),
                "plugins": {"traffic-split": {"rules": [{"match": [{"vars": [["arg_name", 123, "jack"]]}]}]}}
            })),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error_msg"],
        "failed to check the configuration of plugin traffic-split err: failed to validate the 'vars' expression: invalid operator '123'"
    );
    let r = gw
        .admin(
            "PUT",
            "routes/bad",
            Some(json!({
                "uri": "/bad", "upstream": upstream(&[(&u0.node(), 1)]),
                "plugins": {"traffic-split": {"rules": [{"weighted_upstreams": [
                    {"upstream": {"type": "roundrobin"}}
                ]}]}}
            })),
        )
        .await;
    assert_eq!(r.status, 400);
    let msg = r.json()["error_msg"].as_str().unwrap().to_string();
    assert!(
        msg.starts_with("failed to check the configuration of plugin traffic-split err: property \"rules\" validation failed: failed to validate item 1: property \"weighted_upstreams\" validation failed: failed to validate item 1: property \"upstream\" validation failed:"),
        "{msg}"
    );

    // An upstream_id that does not exist is APISIX's 500, until it does.
    gw.put(
        "routes/m",
        json!({
            "uri": "/m", "upstream": upstream(&[(&u0.node(), 1)]),
            "plugins": {"traffic-split": {"rules": [{"weighted_upstreams": [{"upstream_id": "later"}]}]}}
        }),
    )
    .await;
    let r = gw.get("/m").await;
    assert_eq!(r.status, 500);
    assert_eq!(
        r.text(),
        "failed to fetch upstream info by upstream id: later"
    );
    gw.put("upstreams/later", upstream(&[(&u1.node(), 1)]))
        .await;
    assert_eq!(gw.get("/m").await.upstream(), "u1");
    gw.stop().await;
}

fn route_with(u: &Upstream, uri: &str, plugins: Value) -> Value {
    json!({"uri": uri, "plugins": plugins, "upstream": upstream(&[(&u.node(), 1)])})
}

#[tokio::test]
async fn fault_injection_aborts_and_delays_before_other_plugins() {
    let gw = Gateway::start().await;
    let u = Upstream::start("u").await;
    gw.put(
        "routes/abort",
        route_with(
            &u,
            "/abort",
            json!({
                "fault-injection": {"abort": {
                    "http_status": 403, "body": "Fault Injection! $remote_addr\n",
                    "headers": {"h1": "v1", "h2": 2},
                    "vars": [[["arg_name", "==", "jack"]]]
                }},
                // Runs in rewrite at 11000: before key-auth would refuse.
                "key-auth": {}
            }),
        ),
    )
    .await;
    let r = gw.get("/abort?name=jack").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "Fault Injection! 127.0.0.1\n");
    assert_eq!(r.header("h2"), Some("2"));
    assert_eq!(gw.get("/abort?name=rose").await.status, 401);
    assert_eq!(u.hits(), 0);

    gw.put(
        "routes/delay",
        route_with(
            &u,
            "/delay",
            json!({"fault-injection": {"delay": {"duration": 0.3}}}),
        ),
    )
    .await;
    let start = Instant::now();
    let r = gw.get("/delay").await;
    assert_eq!(r.status, 200);
    assert!(start.elapsed() >= Duration::from_millis(290));
    gw.stop().await;
}

#[tokio::test]
async fn referer_restriction_by_host() {
    let gw = Gateway::start().await;
    let u = Upstream::start("u").await;
    gw.put(
        "routes/r",
        route_with(
            &u,
            "/r",
            json!({"referer-restriction": {"whitelist": ["*.xx.com", "yy.com"]}}),
        ),
    )
    .await;
    assert_eq!(
        get_with(&gw, "/r", &[("referer", "http://www.xx.com/a")])
            .await
            .status,
        200
    );
    let r = get_with(&gw, "/r", &[("referer", "https://www.yy.com/am")]).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.json(),
        json!({"message": "Your referer host is not allowed"})
    );
    assert_eq!(gw.get("/r").await.status, 403);
    let r = gw
        .admin(
            "PUT",
            "routes/r",
            Some(route_with(
                &u,
                "/r",
                json!({"referer-restriction": {"whitelist": ["a"], "blacklist": ["b"]}}),
            )),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error_msg"],
        "failed to check the configuration of plugin referer-restriction err: value should match only one schema, but matches both schemas 1 and 2"
    );
    gw.stop().await;
}

#[tokio::test]
async fn api_breaker_opens_on_upstream_failures_and_closes_again() {
    let gw = Gateway::start().await;
    let u = Upstream::start("u").await;
    gw.put(
        "routes/b",
        route_with(
            &u,
            "/b",
            json!({"api-breaker": {
                "break_response_code": 502,
                "break_response_body": "{\"message\":\"breaker opened.\"}",
                "break_response_headers": [{"key": "Content-Type", "value": "application/json"}],
                "unhealthy": {"http_statuses": [500], "failures": 3},
                "healthy": {"http_statuses": [200], "successes": 1}
            }}),
        ),
    )
    .await;
    let mut seen = Vec::new();
    for code in [200, 500, 503, 500, 500, 500] {
        seen.push(gw.get(&format!("/b?status={code}")).await.status.as_u16());
    }
    assert_eq!(seen, [200, 500, 503, 500, 500, 502]);
    let r = gw.get("/b").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.text(), "{\"message\":\"breaker opened.\"}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    // Open for 2 s (the first trip); then requests go through, and a
    // healthy answer closes it for good.
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.get("/b").await.status == 502 {
        assert!(Instant::now() < deadline, "the breaker never closed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(gw.get("/b?status=500").await.status, 500);
    gw.stop().await;
}

#[tokio::test]
async fn gzip_compresses_for_clients_that_accept_it() {
    let gw = Gateway::start().await;
    let u = Upstream::start("u").await;
    gw.put(
        "routes/z",
        route_with(
            &u,
            "/z",
            json!({"gzip": {"types": "*", "min_length": 20, "comp_level": 6, "vary": true}}),
        ),
    )
    .await;
    let padding = "a".repeat(3000);
    let path = format!("/z?pad={padding}");
    let plain = gw.get(&path).await;
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(plain.header("vary"), Some("Accept-Encoding"));
    let zipped = get_with(&gw, &path, &[("accept-encoding", "gzip, deflate")]).await;
    assert_eq!(zipped.status, 200);
    assert_eq!(zipped.header("content-encoding"), Some("gzip"));
    assert!(zipped.header("content-length").is_none());
    assert!(
        zipped.body.len() < plain.body.len() / 4,
        "{} vs {}",
        zipped.body.len(),
        plain.body.len()
    );
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(&zipped.body[..]),
        &mut text,
    )
    .unwrap();
    let echoed: Value = harness::serde_json::from_str(&text).unwrap();
    assert_eq!(echoed["path"], path);
    gw.stop().await;
}
