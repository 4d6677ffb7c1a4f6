#![allow(clippy::unwrap_used)]
//! traffic-split, api-breaker, fault-injection, referer-restriction and
//! gzip through the real gateway, with real upstreams.

use std::collections::BTreeMap;

use harness::serde_json::json;
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
