#![allow(clippy::unwrap_used)]
//! Config changes reach the very next request, on kept-alive connections
//! too, and never fail a request while routes change under traffic.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use harness::serde_json::json;
use harness::{upstream, Conn, Gateway, Upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_request_sees_the_change_on_a_kept_connection() {
    let gw = Gateway::start().await;
    let (u1, u2) = (Upstream::start("u1").await, Upstream::start("u2").await);
    let mut conn = Conn::open(gw.data, None).await.unwrap();
    assert_eq!(conn.send("GET", "/k", &[], String::new()).await.status, 404);
    gw.put(
        "routes/k",
        json!({"uri": "/k", "upstream": upstream(&[(&u1.node(), 1)])}),
    )
    .await;
    assert_eq!(
        conn.send("GET", "/k", &[], String::new()).await.upstream(),
        "u1"
    );
    gw.put(
        "routes/k",
        json!({"uri": "/k", "upstream": upstream(&[(&u2.node(), 1)])}),
    )
    .await;
    assert_eq!(
        conn.send("GET", "/k", &[], String::new()).await.upstream(),
        "u2"
    );
    gw.put("routes/k", json!({"uri": "/k", "upstream": upstream(&[(&u2.node(), 1)]), "plugins": {"ip-restriction": {"blacklist": ["127.0.0.1"]}}})).await;
    assert_eq!(conn.send("GET", "/k", &[], String::new()).await.status, 403);
    gw.put(
        "routes/k",
        json!({"uri": "/k2", "upstream": upstream(&[(&u1.node(), 1)])}),
    )
    .await;
    assert_eq!(
        conn.send("GET", "/k", &[], String::new()).await.status,
        404,
        "the old uri is gone"
    );
    assert_eq!(
        conn.send("GET", "/k2", &[], String::new()).await.upstream(),
        "u1"
    );
    gw.admin("DELETE", "routes/k", None).await;
    assert_eq!(
        conn.send("GET", "/k2", &[], String::new()).await.status,
        404
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_failed_request_while_routes_change() {
    let gw = Arc::new(Gateway::start().await);
    let (u1, u2) = (Upstream::start("u1").await, Upstream::start("u2").await);
    gw.put(
        "routes/live",
        json!({"uri": "/live", "upstream": upstream(&[(&u1.node(), 1)])}),
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (gw, stop, ok) = (gw.clone(), stop.clone(), ok.clone());
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::open(gw.data, None).await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                let r = conn.send("GET", "/live", &[], String::new()).await;
                assert_eq!(r.status, 200, "{}", r.text());
                ok.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for i in 0..200 {
        let node = if i % 2 == 0 { u2.node() } else { u1.node() };
        gw.put(
            "routes/live",
            json!({"uri": "/live", "upstream": upstream(&[(&node, 1)])}),
        )
        .await;
        gw.put(
            &format!("routes/churn{}", i % 10),
            json!({"uri": format!("/c{i}"), "upstream": upstream(&[(&node, 1)])}),
        )
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert!(ok.load(Ordering::Relaxed) > 0);
}
