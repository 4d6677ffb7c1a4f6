#![allow(clippy::unwrap_used)]
//! What upstreams and clients see through the proxy, and failures.

use std::time::Instant;

use harness::serde_json::json;
use harness::{raw_upstream, refused_addr, send, upstream, Conn, Gateway, Upstream};

#[tokio::test]
async fn forwarding_headers_and_passthrough() {
    let gw = Gateway::start().await;
    let u1 = Upstream::start("u1").await;
    gw.put(
        "routes/e",
        json!({"uri": "/e/*", "upstream": upstream(&[(&u1.node(), 1)])}),
    )
    .await;
    let r = send(
        gw.data,
        "POST",
        "/e/deep/path?a=1&b=two%20words",
        &[
            ("host", "client.test".into()),
            ("x-forwarded-for", "10.1.2.3".into()),
            ("x-forwarded-proto", "https".into()),
            ("keep-alive", "timeout=5".into()),
            ("te", "trailers".into()),
            ("x-custom", "abc 123".into()),
        ],
        "payload".into(),
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    let up = r.json();
    let h = &up["headers"];
    assert_eq!(up["path"], "/e/deep/path?a=1&b=two%20words");
    assert_eq!(up["method"], "POST");
    assert_eq!(up["version"], "HTTP/1.1");
    assert_eq!(up["body_len"], 7);
    assert_eq!(h["host"], "client.test");
    assert_eq!(h["x-real-ip"], "127.0.0.1");
    assert_eq!(h["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "client.test");
    assert_eq!(h["x-forwarded-port"], gw.data.port().to_string());
    assert_eq!(h["x-custom"], "abc 123");
    assert!(h.get("keep-alive").is_none() && h.get("te").is_none());
    assert_eq!(r.header("x-upstream-name"), Some("u1"));
    assert!(r.header("server").unwrap().starts_with("ferrogate/"));
    assert!(
        r.header("keep-alive").is_none(),
        "hop-by-hop response headers are dropped"
    );
    gw.stop().await;
}

#[tokio::test]
async fn pass_host_modes() {
    let gw = Gateway::start().await;
    let u1 = Upstream::start("u1").await;
    let mut node = upstream(&[(&u1.node(), 1)]);
    node["pass_host"] = json!("node");
    gw.put("routes/n", json!({"uri": "/n", "upstream": node}))
        .await;
    let mut rewrite = upstream(&[(&u1.node(), 1)]);
    rewrite["pass_host"] = json!("rewrite");
    rewrite["upstream_host"] = json!("backend.internal");
    gw.put("routes/r", json!({"uri": "/r", "upstream": rewrite}))
        .await;
    let host = [("host", "client.test".to_string())];
    assert_eq!(
        send(gw.data, "GET", "/n", &host, String::new(), None)
            .await
            .json()["headers"]["host"],
        u1.node()
    );
    assert_eq!(
        send(gw.data, "GET", "/r", &host, String::new(), None)
            .await
            .json()["headers"]["host"],
        "backend.internal"
    );
    gw.stop().await;
}

#[tokio::test]
async fn large_bodies_stream_both_ways() {
    let gw = Gateway::start().await;
    let u1 = Upstream::start("u1").await;
    gw.put(
        "routes/b",
        json!({"uri": "/big", "upstream": upstream(&[(&u1.node(), 1)])}),
    )
    .await;
    let body: String = (0..(1 << 20))
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let sum: u64 = body.bytes().map(u64::from).sum();
    let r = send(gw.data, "PUT", "/big", &[], body, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], 1 << 20);
    assert_eq!(r.json()["body_sum"], sum);
    gw.stop().await;
}

#[tokio::test]
async fn failures_map_to_502_504_and_retries() {
    let gw = Gateway::start().await;
    let u1 = Upstream::start("u1").await;
    let down = refused_addr().to_string();
    gw.put(
        "routes/down",
        json!({"uri": "/down", "upstream": upstream(&[(&down, 1)])}),
    )
    .await;
    let r = gw.get("/down").await;
    assert_eq!(r.status, 502);
    assert!(r.text().contains("502 Bad Gateway"));
    assert_eq!(r.header("x-apisix-upstream-status"), Some("502"));

    gw.put(
        "routes/retry",
        json!({"uri": "/retry", "upstream": upstream(&[(&down, 1), (&u1.node(), 1)])}),
    )
    .await;
    for _ in 0..6 {
        assert_eq!(gw.get("/retry").await.upstream(), "u1");
    }
    let mut no_retry = upstream(&[(&down, 1), (&u1.node(), 1)]);
    no_retry["retries"] = json!(0);
    gw.put("routes/r0", json!({"uri": "/r0", "upstream": no_retry}))
        .await;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(gw.get("/r0").await.status.as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 502).count(),
        5,
        "{statuses:?}"
    );

    let mut slow = upstream(&[(&u1.node(), 1)]);
    slow["timeout"] = json!({"connect": 0.2, "send": 0.2, "read": 0.2});
    gw.put("routes/slow", json!({"uri": "/slow", "upstream": slow}))
        .await;
    let t = Instant::now();
    let r = gw.get("/slow?sleep_ms=2000").await;
    assert_eq!(r.status, 504);
    assert!(t.elapsed().as_millis() < 1500);
    assert!(r.text().contains("504 Gateway Time-out"));
    assert_eq!(r.header("x-apisix-upstream-status"), Some("504"));

    gw.put(
        "routes/five",
        json!({"uri": "/five", "upstream": upstream(&[(&u1.node(), 1)])}),
    )
    .await;
    let r = gw.get("/five?status=503").await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-apisix-upstream-status")),
        (503, Some("503"))
    );
    assert_eq!(
        gw.get("/five").await.header("x-apisix-upstream-status"),
        None
    );
    // The client connection survives upstream failures.
    let mut conn = Conn::open(gw.data, None).await.unwrap();
    assert_eq!(
        conn.send("GET", "/down", &[], String::new()).await.status,
        502
    );
    assert_eq!(
        conn.send("GET", "/five", &[], String::new()).await.status,
        200
    );
    gw.stop().await;
}

/// A retry after an unreachable node sends the request whole (its headers
/// were kept for it); a node whose answer head cannot be passed on is not
/// followed by another try, as nginx's default `proxy_next_upstream error
/// timeout` does not retry an invalid header.
#[tokio::test]
async fn retries_send_the_whole_request_but_not_after_an_invalid_answer() {
    let gw = Gateway::start().await;
    let u1 = Upstream::start("u1").await;
    let down = refused_addr().to_string();
    gw.put(
        "routes/retry",
        json!({"uri": "/retry", "upstream": upstream(&[(&down, 1), (&u1.node(), 1)])}),
    )
    .await;
    for _ in 0..4 {
        let sent = [("x-custom", "kept".to_string())];
        let r = send(gw.data, "GET", "/retry?q=1", &sent, String::new(), None).await;
        assert_eq!(r.upstream(), "u1");
        let doc = r.json();
        assert_eq!(doc["headers"]["x-custom"], "kept", "{doc}");
        assert_eq!(doc["headers"]["x-real-ip"], "127.0.0.1", "{doc}");
        assert!(doc["headers"]["host"].is_string(), "{doc}");
    }

    let invalid = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").await;
    gw.put(
        "routes/invalid",
        json!({"uri": "/invalid", "upstream": upstream(&[(&invalid.to_string(), 1), (&u1.node(), 1)])}),
    )
    .await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        let r = gw.get("/invalid").await;
        seen.push((
            r.status.as_u16(),
            r.header("x-apisix-upstream-status").map(str::to_string),
        ));
    }
    let refused = seen.iter().filter(|(s, _)| *s == 502).count();
    assert_eq!(refused, 3, "round robin over both nodes: {seen:?}");
    assert!(
        seen.iter()
            .all(|s| *s == (502, Some("502".to_string())) || *s == (200, None)),
        "one try for an invalid answer: {seen:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn trusted_addresses_keep_forwarded_headers() {
    let gw = Gateway::start_with_apisix("  trusted_addresses:\n    - 127.0.0.0/8\n").await;
    let u1 = Upstream::start("u1").await;
    gw.put(
        "routes/t",
        json!({"uri": "/t", "upstream": upstream(&[(&u1.node(), 1)])}),
    )
    .await;
    let sent = [
        ("x-forwarded-proto", "https".to_string()),
        ("x-forwarded-host", "public.example".to_string()),
        ("x-forwarded-port", "443".to_string()),
    ];
    let h = send(gw.data, "GET", "/t", &sent, String::new(), None)
        .await
        .json()["headers"]
        .clone();
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-host"], "public.example");
    assert_eq!(h["x-forwarded-port"], "443");
    gw.stop().await;
}

/// `timeout.read` counts from the moment the request is sent, not from its
/// start plus `connect`; `retry_timeout` stops further tries once it has
/// passed.
#[tokio::test]
async fn read_timeout_and_retry_timeout() {
    use std::time::{Duration, Instant};
    let gw = Gateway::start().await;
    // Three nodes that accept and never answer.
    let mut silent = Vec::new();
    for _ in 0..3 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        silent.push(l.local_addr().unwrap().to_string());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
    }
    let nodes: Vec<(&str, u64)> = silent.iter().map(|n| (n.as_str(), 1)).collect();
    let mut up = upstream(&nodes);
    up["timeout"] = json!({"connect": 2, "send": 2, "read": 0.3});
    up["retries"] = json!(0);
    gw.put("routes/one", json!({"uri": "/one", "upstream": up.clone()}))
        .await;
    let t = Instant::now();
    let r = gw.get("/one").await;
    assert_eq!(r.status, 504);
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "read, not connect + read, bounds the wait: {:?}",
        t.elapsed()
    );

    up["retries"] = json!(2);
    gw.put("routes/all", json!({"uri": "/all", "upstream": up.clone()}))
        .await;
    let r = gw.get("/all").await;
    assert_eq!(r.header("x-apisix-upstream-status"), Some("504, 504, 504"));

    up["retry_timeout"] = json!(0.5);
    gw.put("routes/bounded", json!({"uri": "/bounded", "upstream": up}))
        .await;
    let r = gw.get("/bounded").await;
    assert_eq!(r.status, 504);
    assert_eq!(
        r.header("x-apisix-upstream-status"),
        Some("504, 504"),
        "no third try after retry_timeout"
    );
    gw.stop().await;
}
