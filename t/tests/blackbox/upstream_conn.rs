#![allow(clippy::unwrap_used)]
//! How upstream connections are used: HTTP/2 for `grpc` upstreams, and
//! `keepalive_pool.requests` retiring a connection after its share.

use std::collections::HashSet;

use bytes::Bytes;
use harness::serde_json::json;
use harness::{upstream, Conn, Gateway, Upstream};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A gRPC-shaped call (an empty message) from an h2c client.
async fn grpc_call(gw: &Gateway, path: &str) -> http::Response<hyper::body::Incoming> {
    let tcp = tokio::net::TcpStream::connect(gw.data).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{}{path}", gw.data))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    sender.send_request(req).await.unwrap()
}

#[tokio::test]
async fn grpc_upstreams_get_http2_with_te_trailers() {
    let gw = Gateway::start().await;
    let u = Upstream::start_h2c("h2").await;
    let mut up = upstream(&[(&u.node(), 1)]);
    up["scheme"] = json!("grpc");
    gw.put("routes/g", json!({"uri": "/svc.Echo/*", "upstream": up}))
        .await;

    // An HTTP/1.1 client, proxied over HTTP/2: the client's Host becomes
    // `:authority` (pass_host: pass), and no separate `host` header is sent.
    let r = gw.get("/svc.Echo/Say").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["version"], "HTTP/2.0");
    assert_eq!(r.json()["path"], format!("http://{}/svc.Echo/Say", gw.data));
    assert!(r.json()["headers"].get("host").is_none(), "{}", r.text());

    // pass_host: rewrite sets `:authority`, while the node is still dialled.
    let mut up = upstream(&[(&u.node(), 1)]);
    up["scheme"] = json!("grpc");
    up["pass_host"] = json!("rewrite");
    up["upstream_host"] = json!("grpc.example.com");
    gw.put("routes/r", json!({"uri": "/svc.Rewrite/*", "upstream": up}))
        .await;
    let r = gw.get("/svc.Rewrite/Say").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "http://grpc.example.com/svc.Rewrite/Say");

    // A gRPC-shaped call from an h2c client: content type and TE pass on.
    let resp = grpc_call(&gw, "/svc.Echo/Say").await;
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let echo: harness::serde_json::Value = harness::serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["version"], "HTTP/2.0");
    assert_eq!(echo["headers"]["te"], "trailers");
    assert_eq!(echo["headers"]["content-type"], "application/grpc");
    assert_eq!(echo["body_len"], 5);
    gw.stop().await;
}

/// Distinct upstream-side connections seen over `n` requests on one client
/// connection.
async fn upstream_connections(gw: &Gateway, path: &str, n: usize) -> usize {
    let mut conn = Conn::open(gw.data, None).await.unwrap();
    let mut peers = HashSet::new();
    for _ in 0..n {
        let r = conn.send("GET", path, &[], String::new()).await;
        assert_eq!(r.status, 200);
        peers.insert(r.json()["peer"].as_str().unwrap().to_string());
        // Let the connection go back to the pool before the next request.
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    peers.len()
}

#[tokio::test]
async fn keepalive_pool_requests_retires_connections() {
    let gw = Gateway::start().await;
    let u = Upstream::start("u").await;
    let mut capped = upstream(&[(&u.node(), 1)]);
    capped["keepalive_pool"] = json!({"size": 4, "idle_timeout": 30, "requests": 3});
    gw.put(
        "routes/capped",
        json!({"uri": "/capped", "upstream": capped}),
    )
    .await;
    gw.put(
        "routes/default",
        json!({"uri": "/default", "upstream": upstream(&[(&u.node(), 1)])}),
    )
    .await;
    assert_eq!(upstream_connections(&gw, "/capped", 9).await, 3);
    assert_eq!(
        upstream_connections(&gw, "/default", 9).await,
        1,
        "APISIX's default of 1000 requests keeps one connection"
    );
    gw.stop().await;
}

/// An h2c upstream answering like a gRPC server: a message, then
/// `grpc-status` in trailers.
async fn grpc_like_upstream() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    let frames = http_body_util::StreamBody::new(futures_util::stream::iter([
                        Ok::<_, std::convert::Infallible>(http_body::Frame::data(
                            Bytes::from_static(b"\0\0\0\0\x02hi"),
                        )),
                        Ok(http_body::Frame::trailers(trailers)),
                    ]));
                    let resp = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(frames)
                        .unwrap();
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn grpc_trailers_reach_http2_clients() {
    let gw = Gateway::start().await;
    let node = grpc_like_upstream().await;
    let mut up = upstream(&[(&node.to_string(), 1)]);
    up["scheme"] = json!("grpc");
    gw.put("routes/g", json!({"uri": "/svc.Echo/*", "upstream": up}))
        .await;
    let resp = grpc_call(&gw, "/svc.Echo/Say").await;
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers passed on");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(&collected.to_bytes()[..], b"\0\0\0\0\x02hi");
    gw.stop().await;
}

/// `keepalive_pool.idle_timeout`: an upstream connection idle for longer is
/// closed, and the next request opens a new one; within it, one is reused.
#[tokio::test]
async fn keepalive_pool_idle_timeout_closes_idle_connections() {
    let gw = Gateway::start().await;
    let u = Upstream::start("u").await;
    let mut up = upstream(&[(&u.node(), 1)]);
    up["keepalive_pool"] = json!({"size": 4, "idle_timeout": 0.3, "requests": 100});
    gw.put("routes/idle", json!({"uri": "/idle", "upstream": up}))
        .await;
    let peer = |r: harness::Resp| r.json()["peer"].as_str().unwrap().to_string();
    let first = peer(gw.get("/idle").await);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let soon = peer(gw.get("/idle").await);
    assert_eq!(first, soon, "reused while fresh");
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let later = peer(gw.get("/idle").await);
    assert_ne!(first, later, "a new connection after the idle timeout");
    gw.stop().await;
}

/// An upstream that closes every connection after one answer, without
/// saying `Connection: close`: a pooled connection it closed is never used
/// for the next request (or, if the close races the request, the request
/// goes out again on a new connection), so every request succeeds.
#[tokio::test]
async fn upstream_closing_kept_alive_connections_costs_no_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                // Gone just after answering, as a server whose keep-alive
                // timeout is tiny.
            });
        }
    });
    let gw = Gateway::start().await;
    gw.put(
        "routes/once",
        json!({"uri": "/once", "upstream": upstream(&[(&node, 1)])}),
    )
    .await;
    let mut conn = Conn::open(gw.data, None).await.unwrap();
    for i in 0..50 {
        let r = conn.send("GET", "/once", &[], String::new()).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        if i % 2 == 0 {
            tokio::task::yield_now().await;
        }
    }
    gw.stop().await;
}

/// Whatever framing a node answers with, the client gets the same body in
/// its own framing; an answer that cannot be framed is a 502.
#[tokio::test]
async fn upstream_answers_in_every_framing_reach_the_client() {
    let gw = Gateway::start().await;
    let cases: [(&str, &'static [u8], u16, &str); 6] = [
        (
            "length",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Up: 1\r\n\r\nhello",
            200,
            "hello",
        ),
        (
            "chunked",
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nhel\r\n2\r\nlo\r\n0\r\nx-sum: 5\r\n\r\n",
            201,
            "hello",
        ),
        (
            "close",
            b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello until close",
            200,
            "hello until close",
        ),
        (
            "continue",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\nok",
            202,
            "ok",
        ),
        (
            "conflict",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            502,
            "",
        ),
        ("garbage", b"SMTP ready\r\n\r\n", 502, ""),
    ];
    for (name, reply, _, _) in &cases {
        let node = harness::raw_upstream(reply).await;
        gw.put(
            &format!("routes/{name}"),
            json!({"uri": format!("/{name}"), "upstream": upstream(&[(&node.to_string(), 1)])}),
        )
        .await;
    }
    for (name, _, status, body) in cases {
        let resp = gw.get(&format!("/{name}")).await;
        assert_eq!(resp.status.as_u16(), status, "{name}");
        if status < 300 {
            assert_eq!(resp.text(), body, "{name}");
        }
        if name == "length" {
            assert_eq!(resp.headers["x-up"], "1");
            assert_eq!(resp.headers["content-length"], "5");
        }
    }
    gw.stop().await;
}

/// A POST streamed by the client reaches the node whole, by length or
/// in chunks, and the node's answer comes back.
#[tokio::test]
async fn streamed_request_bodies_reach_the_node() {
    let gw = Gateway::start().await;
    let up = Upstream::start("echo").await;
    gw.put(
        "routes/echo",
        json!({"uri": "/*", "upstream": upstream(&[(&up.node(), 1)])}),
    )
    .await;
    let big = "x".repeat(200_000);
    let resp = harness::send(gw.data, "POST", "/echo", &[], big, None).await;
    assert_eq!(resp.status, 200);
    assert!(
        resp.text().contains(r#""body_len":200000"#),
        "{}",
        resp.text()
    );
    let (answer, _) = harness::raw(
        gw.data,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        std::time::Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""body_len":11"#), "{answer}");
    assert!(
        answer.contains(r#""transfer-encoding":"chunked""#),
        "sent on in chunks: {answer}"
    );
    gw.stop().await;
}

/// A node that refuses an upload after its head (413, then closes) has
/// that answer passed on, not turned into a 502.
#[tokio::test]
async fn an_early_answer_to_an_upload_is_passed_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gateway::start().await;
    let node = harness::raw_upstream(
        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!",
    )
    .await;
    gw.put(
        "routes/upload",
        json!({"uri": "/upload", "upstream": upstream(&[(&node.to_string(), 1)])}),
    )
    .await;
    let size = 4 << 20;
    let stream = tokio::net::TcpStream::connect(gw.data).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        let head = format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n");
        let _ = wr.write_all(head.as_bytes()).await;
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..size / chunk.len() {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
            if answer.ends_with(b"too big!") {
                break;
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    writer.abort();
    gw.stop().await;
}
