#![allow(clippy::unwrap_used)]
//! Weighted round robin as APISIX distributes, through the data plane.

use std::collections::BTreeMap;
use std::time::Duration;

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

#[tokio::test]
async fn chash_keeps_a_key_on_one_node() {
    let gw = Gateway::start().await;
    let (u1, u2, u3) = (
        Upstream::start("u1").await,
        Upstream::start("u2").await,
        Upstream::start("u3").await,
    );
    let mut up = upstream(&[(&u1.node(), 1), (&u2.node(), 1), (&u3.node(), 1)]);
    up["type"] = json!("chash");
    up["hash_on"] = json!("header");
    up["key"] = json!("x-user");
    gw.put("routes/h", json!({"uri": "/h", "upstream": up}))
        .await;
    let mut seen = std::collections::BTreeSet::new();
    for user in 0..30 {
        let headers = [("x-user", format!("user-{user}"))];
        let first = harness::send(gw.data, "GET", "/h", &headers, String::new(), None)
            .await
            .upstream();
        for _ in 0..3 {
            let again = harness::send(gw.data, "GET", "/h", &headers, String::new(), None)
                .await
                .upstream();
            assert_eq!(again, first, "user-{user} moved");
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 3, "keys spread over every node: {seen:?}");
    gw.stop().await;
}

#[tokio::test]
async fn least_conn_avoids_the_busy_node() {
    let gw = std::sync::Arc::new(Gateway::start().await);
    let (u1, u2) = (Upstream::start("u1").await, Upstream::start("u2").await);
    let mut up = upstream(&[(&u1.node(), 1), (&u2.node(), 1)]);
    up["type"] = json!("least_conn");
    gw.put("routes/l", json!({"uri": "/l", "upstream": up}))
        .await;
    // Hold one slow request on whichever node takes it...
    let slow_gw = gw.clone();
    let before = u1.hits() + u2.hits();
    let slow = tokio::spawn(async move { slow_gw.get("/l?sleep_ms=800").await.upstream() });
    // Wait until an upstream has the slow request in hand.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while u1.hits() + u2.hits() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "slow request never arrived"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // ...then every quick request goes to the other one.
    let quick: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..6 {
            v.push(gw.get("/l").await.upstream());
        }
        v
    };
    let busy = slow.await.unwrap();
    assert!(
        quick.iter().all(|n| *n != busy),
        "busy {busy}, quick went to {quick:?}"
    );
}

/// `ewma` sends most requests to the node that answers faster.
#[tokio::test]
async fn ewma_prefers_the_faster_node() {
    let gw = Gateway::start().await;
    let fast = Upstream::start("fast").await;
    let slow = delaying_upstream(Duration::from_millis(20)).await;
    let mut up = upstream(&[(&fast.node(), 1), (&slow.to_string(), 1)]);
    up["type"] = json!("ewma");
    gw.put("routes/e", json!({"uri": "/e", "upstream": up}))
        .await;
    let seen = counts(&gw, "/e", 100).await;
    let to_fast = seen.get("fast").copied().unwrap_or(0);
    assert!(to_fast >= 80, "{seen:?}");
    gw.stop().await;
}

/// An HTTP/1.1 upstream named `delayed` that waits `delay` before answering.
async fn delaying_upstream(delay: Duration) -> std::net::SocketAddr {
    use http_body_util::Full;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    tokio::time::sleep(delay).await;
                    let resp = http::Response::builder()
                        .header("x-upstream-name", "delayed")
                        .body(Full::new(bytes::Bytes::from_static(
                            b"{\"upstream\":\"delayed\"}",
                        )))
                        .unwrap();
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// Every `hash_on` source APISIX offers keeps a key on one node and
/// spreads different keys: a cookie, a variable, a combination of
/// variables; `consumer` (no consumer is ever authenticated here) falls back
/// to the client address, as APISIX does.
#[tokio::test]
async fn chash_hash_on_sources() {
    let gw = Gateway::start().await;
    let (u1, u2, u3) = (
        Upstream::start("u1").await,
        Upstream::start("u2").await,
        Upstream::start("u3").await,
    );
    let nodes = [
        (&u1.node()[..], 1),
        (&u2.node()[..], 1),
        (&u3.node()[..], 1),
    ];
    let sources = [
        ("cookie", json!({"hash_on": "cookie", "key": "sid"})),
        ("vars", json!({"hash_on": "vars", "key": "arg_user"})),
        (
            "combo",
            json!({"hash_on": "vars_combinations", "key": "$arg_user-$http_x_region"}),
        ),
        ("consumer", json!({"hash_on": "consumer"})),
    ];
    for (name, conf) in &sources {
        let mut up = upstream(&nodes);
        up["type"] = json!("chash");
        for (k, v) in conf.as_object().unwrap() {
            up[k] = v.clone();
        }
        gw.put(
            &format!("routes/{name}"),
            json!({"uri": format!("/{name}"), "upstream": up}),
        )
        .await;
    }
    for (name, _) in &sources {
        let mut seen = std::collections::BTreeSet::new();
        for user in 0..24 {
            let path = format!("/{name}?user=u{user}");
            let headers = [
                ("cookie", format!("theme=dark; sid=s{user}")),
                ("x-region", "eu".to_string()),
            ];
            let first = harness::send(gw.data, "GET", &path, &headers, String::new(), None)
                .await
                .upstream();
            for _ in 0..2 {
                let again = harness::send(gw.data, "GET", &path, &headers, String::new(), None)
                    .await
                    .upstream();
                assert_eq!(again, first, "{name}: u{user} moved");
            }
            seen.insert(first);
        }
        if *name == "consumer" {
            assert_eq!(seen.len(), 1, "one client address, one node: {seen:?}");
        } else {
            assert_eq!(
                seen.len(),
                3,
                "{name}: keys spread over every node: {seen:?}"
            );
        }
    }
    gw.stop().await;
}
