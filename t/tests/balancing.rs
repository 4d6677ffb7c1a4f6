#![allow(clippy::unwrap_used)]
//! Weighted round robin as APISIX distributes, through the data plane.

use std::collections::BTreeMap;

use harness::serde_json::json;
use harness::{upstream, Conn, Gateway, Upstream};

async fn counts(gw: &Gateway, path: &str, n: usize) -> BTreeMap<String, usize> {
    let mut conn = Conn::open(gw.data, None).await.unwrap();
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let r = conn.send("GET", path, &[], String::new()).await;
        assert_eq!(r.status, 200);
        *out.entry(r.upstream()).or_default() += 1;
    }
    out
}

fn map(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[tokio::test]
async fn weights_are_honoured_exactly() {
    let gw = Gateway::start().await;
    let (u1, u2, u3) = (
        Upstream::start("u1").await,
        Upstream::start("u2").await,
        Upstream::start("u3").await,
    );
    gw.put(
        "routes/a",
        json!({"uri": "/a", "upstream": upstream(&[(&u1.node(), 1), (&u2.node(), 2)])}),
    )
    .await;
    assert_eq!(counts(&gw, "/a", 30).await, map(&[("u1", 10), ("u2", 20)]));
    gw.put("routes/b", json!({"uri": "/b", "upstream": upstream(&[(&u1.node(), 3), (&u2.node(), 0), (&u3.node(), 1)])})).await;
    assert_eq!(counts(&gw, "/b", 12).await, map(&[("u1", 9), ("u3", 3)]));
    gw.put(
        "routes/c",
        json!({"uri": "/c", "upstream": {"nodes": [
            {"host": "127.0.0.1", "port": u1.addr.port(), "weight": 1},
            {"host": "127.0.0.1", "port": u2.addr.port(), "weight": 3}]}}),
    )
    .await;
    assert_eq!(counts(&gw, "/c", 20).await, map(&[("u1", 5), ("u2", 15)]));
    gw.stop().await;
}

#[tokio::test]
async fn position_survives_unrelated_updates() {
    let gw = Gateway::start().await;
    let (u1, u2) = (Upstream::start("u1").await, Upstream::start("u2").await);
    gw.put(
        "upstreams/shared",
        upstream(&[(&u1.node(), 1), (&u2.node(), 1)]),
    )
    .await;
    gw.put("routes/a", json!({"uri": "/a", "upstream_id": "shared"}))
        .await;
    let mut conn = Conn::open(gw.data, None).await.unwrap();
    let mut last = String::new();
    for i in 0..40 {
        // An unrelated change between every two requests must not reset the
        // alternation of the shared upstream.
        gw.put(
            &format!("routes/other{}", i % 3),
            json!({"uri": format!("/o{i}"), "upstream": upstream(&[(&u1.node(), 1)])}),
        )
        .await;
        let name = conn.send("GET", "/a", &[], String::new()).await.upstream();
        assert_ne!(name, last, "request {i} repeated {name}");
        last = name;
    }
    gw.stop().await;
}
