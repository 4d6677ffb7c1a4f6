#![allow(clippy::unwrap_used)]
//! Health checks: passive marking from traffic, active probes, recovery,
//! and APISIX's all-unhealthy fallback.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use harness::serde_json::json;
use harness::{raw_upstream, refused_addr, upstream, Gateway, Upstream};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// An upstream answering `{"upstream":"toggle"}` with a status that the
/// test can change at any time.
async fn toggle_upstream(status: Arc<AtomicU16>) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let status = status.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let code = status.load(Ordering::SeqCst);
                    async move {
                        let mut resp = http::Response::new(Full::new(Bytes::from_static(
                            b"{\"upstream\":\"toggle\"}",
                        )));
                        *resp.status_mut() = http::StatusCode::from_u16(code).unwrap();
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

async fn served(gw: &Gateway, path: &str, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let r = gw.get(path).await;
        let name = if r.status == 200 {
            r.upstream()
        } else {
            format!("status {}", r.status.as_u16())
        };
        *out.entry(name).or_default() += 1;
    }
    out
}

/// Waits (up to 5 s) until every request to `path` is answered by `only`:
/// the probes have taken the other nodes out.
async fn until_only(gw: &Gateway, path: &str, only: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let counts = served(gw, path, 6).await;
        if counts == BTreeMap::from([(only.to_string(), 6)]) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "other nodes still served: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn passive_checks_take_a_failing_node_out() {
    let gw = Gateway::start().await;
    let u1 = Upstream::start("u1").await;
    let bad =
        raw_upstream(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n").await;
    let mut up = upstream(&[(&u1.node(), 1), (&bad.to_string(), 1)]);
    // APISIX requires `active` beside `passive`; its default probe of the
    // bad node (500) agrees with the passive verdict.
    up["checks"] = json!({
        "active": {},
        "passive": {"unhealthy": {"http_statuses": [500], "http_failures": 2}}
    });
    gw.put("routes/p", json!({"uri": "/p", "upstream": up}))
        .await;
    // Two 500s mark the bad node; from then on only u1 answers.
    let warmup = served(&gw, "/p", 4).await;
    assert_eq!(warmup.get("status 500"), Some(&2), "{warmup:?}");
    let after = served(&gw, "/p", 10).await;
    assert_eq!(after, BTreeMap::from([("u1".to_string(), 10)]));
    gw.stop().await;
}

#[tokio::test]
async fn active_checks_skip_a_dead_node_and_bring_it_back() {
    let gw = Gateway::start().await;
    let u1 = Upstream::start("u1").await;
    let status = Arc::new(AtomicU16::new(503));
    let toggle = toggle_upstream(status.clone()).await;
    let mut up = upstream(&[(&u1.node(), 1), (&toggle.to_string(), 1)]);
    up["retries"] = json!(0);
    up["checks"] = json!({"active": {
        "http_path": "/status", "timeout": 1,
        "healthy": {"interval": 1, "successes": 1},
        "unhealthy": {"interval": 1, "http_failures": 1}
    }});
    gw.put("routes/a", json!({"uri": "/a", "upstream": up}))
        .await;
    // The first probe round marks the toggle node unhealthy.
    until_only(&gw, "/a", "u1").await;
    // Healthy again: traffic comes back to it.
    status.store(200, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if served(&gw, "/a", 6).await.contains_key("toggle") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "recovered node never served again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn every_node_unhealthy_falls_back_to_all() {
    let gw = Gateway::start().await;
    let down = refused_addr().to_string();
    let mut up = upstream(&[(&down, 1)]);
    up["checks"] = json!({"active": {"healthy": {"interval": 1}, "unhealthy": {"interval": 1, "tcp_failures": 1}}});
    gw.put("routes/d", json!({"uri": "/d", "upstream": up}))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Still tried (502), not refused without trying.
    let r = gw.get("/d").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-apisix-upstream-status"), Some("502"));
    gw.stop().await;
}

/// Health state belongs to the nodes, not to one compiled snapshot: an
/// update that keeps the nodes and checks (here, a new `desc` and a new
/// route on the same upstream) does not bring a node marked unhealthy back.
#[tokio::test]
async fn health_survives_configuration_swaps() {
    let gw = Gateway::start().await;
    let u1 = Upstream::start("u1").await;
    let bad =
        raw_upstream(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n").await;
    let mut up = upstream(&[(&u1.node(), 1), (&bad.to_string(), 1)]);
    // APISIX requires `active` beside `passive`; its default probe of the
    // bad node (500) agrees with the passive verdict.
    up["checks"] = json!({
        "active": {},
        "passive": {"unhealthy": {"http_statuses": [500], "http_failures": 2}}
    });
    gw.put("upstreams/shared", up.clone()).await;
    gw.put("routes/p", json!({"uri": "/p", "upstream_id": "shared"}))
        .await;
    let warmup = served(&gw, "/p", 4).await;
    assert_eq!(warmup.get("status 500"), Some(&2), "{warmup:?}");

    up["desc"] = json!("same nodes, new description");
    gw.put("upstreams/shared", up).await;
    gw.put("routes/q", json!({"uri": "/q", "upstream_id": "shared"}))
        .await;
    let after = served(&gw, "/p", 10).await;
    assert_eq!(
        after,
        BTreeMap::from([("u1".to_string(), 10)]),
        "after the swap"
    );
    let other = served(&gw, "/q", 10).await;
    assert_eq!(
        other,
        BTreeMap::from([("u1".to_string(), 10)]),
        "new route, same upstream"
    );
    gw.stop().await;
}

/// `checks.active.type: tcp` probes by connecting only, which is what a
/// gRPC (HTTP/2-only) node can answer: the live node stays in, the one
/// that refuses connections is taken out.
#[tokio::test]
async fn tcp_probes_for_grpc_nodes() {
    let gw = Gateway::start().await;
    let h2 = Upstream::start_h2c("h2").await;
    let mut up = upstream(&[(&h2.node(), 1), (&refused_addr().to_string(), 1)]);
    up["scheme"] = json!("grpc");
    up["retries"] = json!(0);
    up["checks"] = json!({"active": {
        "type": "tcp", "timeout": 1,
        "healthy": {"interval": 1, "successes": 1},
        "unhealthy": {"interval": 1, "tcp_failures": 1}
    }});
    gw.put("routes/g", json!({"uri": "/g", "upstream": up}))
        .await;
    until_only(&gw, "/g", "h2").await;
    gw.stop().await;
}
