#![allow(clippy::unwrap_used)]
//! ip-restriction end to end, from several loopback source addresses.

use std::net::IpAddr;

use harness::serde_json::json;
use harness::{need_alt_loopback, send, upstream, Gateway, Upstream};

fn ip(s: &str) -> Option<IpAddr> {
    Some(s.parse().unwrap())
}

#[tokio::test]
async fn lists_messages_and_codes() {
    if !need_alt_loopback("ip_restriction::lists_messages_and_codes").await {
        return;
    }
    let gw = Gateway::start().await;
    let u1 = Upstream::start("u1").await;
    let route = |conf| json!({"uri": "/ip", "upstream": upstream(&[(&u1.node(), 1)]), "plugins": {"ip-restriction": conf}});

    gw.put(
        "routes/1",
        route(json!({"whitelist": ["127.0.0.0/30", "::1"]})),
    )
    .await;
    assert_eq!(
        send(gw.data, "GET", "/ip", &[], String::new(), ip("127.0.0.3"))
            .await
            .status,
        200
    );
    let blocked = send(gw.data, "GET", "/ip", &[], String::new(), ip("127.0.0.5")).await;
    assert_eq!(blocked.status, 403);
    assert_eq!(
        blocked.text(),
        "{\"message\":\"Your IP address is not allowed\"}\n"
    );

    gw.put(
        "routes/1",
        route(json!({"blacklist": ["127.0.0.2"], "message": "Go away", "response_code": 404})),
    )
    .await;
    let hits = u1.hits();
    let r = send(gw.data, "GET", "/ip", &[], String::new(), ip("127.0.0.2")).await;
    assert_eq!(
        (r.status.as_u16(), r.json()),
        (404, json!({"message": "Go away"}))
    );
    assert_eq!(
        u1.hits(),
        hits,
        "a blocked request never reaches the upstream"
    );
    assert_eq!(
        send(gw.data, "GET", "/ip", &[], String::new(), ip("127.0.0.1"))
            .await
            .status,
        200
    );
    gw.stop().await;
}

#[tokio::test]
async fn forwarded_headers_cannot_spoof_the_peer() {
    let gw = Gateway::start().await;
    let u1 = Upstream::start("u1").await;
    gw.put(
        "routes/1",
        json!({"uri": "/ip", "upstream": upstream(&[(&u1.node(), 1)]), "plugins": {"ip-restriction": {"whitelist": ["10.0.0.1"]}}}),
    )
    .await;
    let spoof = [
        ("x-forwarded-for", "10.0.0.1".to_string()),
        ("x-real-ip", "10.0.0.1".to_string()),
        ("forwarded", "for=10.0.0.1".to_string()),
    ];
    let r = send(gw.data, "GET", "/ip", &spoof, String::new(), None).await;
    assert_eq!(r.status, 403);
    gw.stop().await;
}

#[tokio::test]
async fn trusted_proxy_is_believed_when_configured() {
    let gw = Gateway::start_with(
        "nginx_config:\n  http:\n    real_ip_from:\n      - 127.0.0.1\n    real_ip_header: X-Forwarded-For\n",
    )
    .await;
    let u1 = Upstream::start("u1").await;
    gw.put(
        "routes/1",
        json!({"uri": "/ip", "upstream": upstream(&[(&u1.node(), 1)]), "plugins": {"ip-restriction": {"whitelist": ["10.0.0.1"]}}}),
    )
    .await;
    let r = send(
        gw.data,
        "GET",
        "/ip",
        &[("x-forwarded-for", "10.0.0.1".into())],
        String::new(),
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["x-real-ip"], "10.0.0.1");
    assert_eq!(
        send(
            gw.data,
            "GET",
            "/ip",
            &[("x-forwarded-for", "10.0.0.2".into())],
            String::new(),
            None
        )
        .await
        .status,
        403
    );
    gw.stop().await;
}

#[tokio::test]
async fn global_rules_and_services() {
    let gw = Gateway::start().await;
    let u1 = Upstream::start("u1").await;
    gw.put("services/s", json!({"upstream": upstream(&[(&u1.node(), 1)]), "plugins": {"ip-restriction": {"blacklist": ["127.0.0.1"]}}})).await;
    gw.put("routes/a", json!({"uri": "/svc", "service_id": "s"}))
        .await;
    gw.put("routes/b", json!({"uri": "/own", "service_id": "s", "plugins": {"ip-restriction": {"whitelist": ["127.0.0.1"]}}})).await;
    assert_eq!(gw.get("/svc").await.status, 403);
    assert_eq!(
        gw.get("/own").await.status,
        200,
        "the route's own conf replaces the service's"
    );

    gw.put(
        "global_rules/g",
        json!({"plugins": {"ip-restriction": {"blacklist": ["127.0.0.0/8"]}}}),
    )
    .await;
    assert_eq!(gw.get("/own").await.status, 403);
    assert_eq!(
        gw.get("/no-route-here").await.status,
        403,
        "global rules run before the 404"
    );
    gw.admin("DELETE", "global_rules/g", None).await;
    assert_eq!(gw.get("/own").await.status, 200);
    gw.stop().await;
}
