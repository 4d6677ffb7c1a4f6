#![allow(clippy::unwrap_used)]
//! Hostile and broken clients, over raw TCP where framing matters.

use std::time::{Duration, Instant};

use harness::serde_json::json;
use harness::{raw, raw_upstream, upstream, Conn, Gateway, Upstream};

const WAIT: Duration = Duration::from_secs(3);

async fn gateway_with(extra: &str) -> (Gateway, Upstream) {
    let gw = Gateway::start_with(extra).await;
    let u1 = Upstream::start("u1").await;
    gw.put(
        "routes/all",
        json!({"uri": "/*", "upstream": upstream(&[(&u1.node(), 1)])}),
    )
    .await;
    (gw, u1)
}

fn status(resp: &str) -> &str {
    resp.get(9..12).unwrap_or("")
}

#[tokio::test]
async fn smuggling_shapes_are_refused_and_never_forwarded() {
    let (gw, u1) = gateway_with("").await;
    let cases: [(&[u8], &str); 5] = [
        (
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabcd",
            "400",
        ),
        (
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            "501",
        ),
        (
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd",
            "400",
        ),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n", "400"),
        (b"\x16\x03\x01\x02\x00 not http\r\n\r\n", "400"),
    ];
    for (bytes, want) in cases {
        let (resp, closed) = raw(gw.data, bytes, WAIT).await;
        assert_eq!(
            status(&resp),
            want,
            "{:?} -> {resp:?}",
            String::from_utf8_lossy(bytes)
        );
        assert!(closed, "connection must be closed after {want}");
        assert_eq!(
            resp.matches("HTTP/1.1").count(),
            1,
            "no second (smuggled) response"
        );
    }
    assert_eq!(u1.hits(), 0, "nothing reached the upstream");
    assert_eq!(gw.get("/still-serving").await.status, 200);
    gw.stop().await;
}

/// Content-Length together with Transfer-Encoding, in either order and on
/// any request of a keep-alive connection: 400, the connection closed, and
/// neither that request nor anything after it reaches the upstream.
#[tokio::test]
async fn content_length_with_chunked_is_refused() {
    let (gw, u1) = gateway_with("").await;
    let attacks: [&[u8]; 2] = [
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    for attack in attacks {
        let (resp, closed) = raw(gw.data, attack, WAIT).await;
        assert_eq!(status(&resp), "400", "{resp}");
        assert!(closed, "{resp}");
        assert_eq!(resp.matches("HTTP/1.1 ").count(), 1, "one response: {resp}");
    }
    assert_eq!(u1.hits(), 0, "nothing reached the upstream");

    // Third request of a keep-alive connection, after a body that itself
    // looks like a smuggling attempt: the first two are served, the third
    // refused.
    let decoy = "GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
    let stream = format!(
        "GET /one HTTP/1.1\r\nHost: x\r\n\r\n\
         POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{decoy}\
         POST /three HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
         GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        decoy.len()
    );
    let (resp, closed) = raw(gw.data, stream.as_bytes(), WAIT).await;
    assert!(closed, "{resp}");
    let statuses: Vec<&str> = resp
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &resp[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "200", "400"], "{resp}");
    assert_eq!(u1.hits(), 2);
    assert!(!resp.contains("smuggled"), "{resp}");
    assert_eq!(gw.get("/still-serving").await.status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn bad_chunked_body_is_the_clients_fault() {
    let (gw, _u1) = gateway_with("").await;
    let (resp, closed) = raw(
        gw.data,
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        WAIT,
    )
    .await;
    assert_eq!(status(&resp), "400", "{resp}");
    assert!(closed);
    gw.stop().await;
}

#[tokio::test]
async fn head_limits_follow_nginx() {
    let (gw, u1) = gateway_with("").await;
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(9000));
    assert_eq!(
        status(&raw(gw.data, long_uri.as_bytes(), WAIT).await.0),
        "414"
    );
    let long_header = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-A: {}\r\n\r\n",
        "a".repeat(9000)
    );
    assert_eq!(
        status(&raw(gw.data, long_header.as_bytes(), WAIT).await.0),
        "400"
    );
    let big_head: String = (0..10)
        .map(|i| format!("X-{i}: {}\r\n", "a".repeat(4000)))
        .collect();
    let big_head = format!("GET / HTTP/1.1\r\nHost: x\r\n{big_head}\r\n");
    let status_big = raw(gw.data, big_head.as_bytes(), WAIT).await.0;
    assert!(
        ["400", "431"].contains(&status(&status_big)),
        "{status_big:.80}"
    );
    assert_eq!(
        status(&raw(gw.data, b"GET / HTTP/1.1\r\n\r\n", WAIT).await.0),
        "400",
        "HTTP/1.1 needs Host"
    );
    assert_eq!(u1.hits(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn body_size_limit_413_before_the_upstream() {
    let (gw, u1) = gateway_with("nginx_config:\n  http:\n    client_max_body_size: 1k\n").await;
    let big = format!(
        "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n{}",
        "a".repeat(2000)
    );
    let (resp, closed) = raw(gw.data, big.as_bytes(), WAIT).await;
    assert_eq!(status(&resp), "413");
    assert!(closed);
    let chunk = "a".repeat(600);
    let chunked = format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n");
    assert_eq!(
        status(&raw(gw.data, chunked.as_bytes(), WAIT).await.0),
        "413"
    );
    assert_eq!(u1.hits(), 0, "oversized bodies never reach the upstream");
    let small = format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n258\r\n{chunk}\r\n0\r\n\r\n");
    let (resp, _) = raw(gw.data, small.as_bytes(), WAIT).await;
    assert_eq!(status(&resp), "200");
    assert!(resp.contains("\"body_len\":600"), "{resp}");
    gw.stop().await;
}

#[tokio::test]
async fn stalled_body_times_out_with_408() {
    let (gw, _u1) = gateway_with("nginx_config:\n  http:\n    client_body_timeout: 1s\n").await;
    let t = Instant::now();
    let (resp, closed) = raw(
        gw.data,
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status(&resp), "408", "{resp}");
    assert!(closed);
    assert!(t.elapsed() < Duration::from_secs(4));
    gw.stop().await;
}

#[tokio::test]
async fn connection_cap_sheds_load() {
    let (gw, _u1) = gateway_with("nginx_config:\n  event:\n    worker_connections: 2\n").await;
    let mut a = Conn::open(gw.data, None).await.unwrap();
    let mut b = Conn::open(gw.data, None).await.unwrap();
    assert_eq!(a.send("GET", "/x", &[], String::new()).await.status, 200);
    assert_eq!(b.send("GET", "/x", &[], String::new()).await.status, 200);
    let (resp, closed) = raw(gw.data, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n", WAIT).await;
    assert_eq!(status(&resp), "503");
    assert!(closed);
    drop(a);
    // The freed slot is served again.
    let deadline = Instant::now() + WAIT;
    loop {
        let (resp, _) = raw(
            gw.data,
            b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            WAIT,
        )
        .await;
        if status(&resp) == "200" {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(b.send("GET", "/x", &[], String::new()).await.status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn truncated_upstream_body_aborts_the_client_connection() {
    let gw = Gateway::start().await;
    let up = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b").await;
    gw.put(
        "routes/t",
        json!({"uri": "/t", "upstream": upstream(&[(&up.to_string(), 1)])}),
    )
    .await;
    let (resp, closed) = raw(gw.data, b"GET /t HTTP/1.1\r\nHost: x\r\n\r\n", WAIT).await;
    assert_eq!(status(&resp), "200");
    assert!(closed, "the client must see the connection end");
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    assert!(body.len() < 100, "never a complete-looking response");
    let early = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Le").await;
    gw.put(
        "routes/e",
        json!({"uri": "/e", "upstream": upstream(&[(&early.to_string(), 1)])}),
    )
    .await;
    assert_eq!(
        gw.get("/e").await.status,
        502,
        "closed before the head: 502"
    );
    gw.stop().await;
}

/// A new HTTP/2 (h2c, prior knowledge) connection to the gateway: its
/// request sender and the task driving it.
async fn h2c<B>(
    gw: &Gateway,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<hyper::Result<()>>,
)
where
    B: http_body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(gw.data).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    (sender, tokio::spawn(conn))
}

#[tokio::test]
async fn h2c_prior_knowledge() {
    use http_body_util::{BodyExt, Empty};
    let (gw, _u1) = gateway_with("").await;
    let (mut sender, _conn) = h2c(&gw).await;
    let req = http::Request::get(format!("http://{}/h2", gw.data))
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: harness::serde_json::Value = harness::serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["version"], "HTTP/1.1",
        "upstream is spoken to in HTTP/1.1"
    );
    gw.stop().await;
}

/// The protocol is told from the first bytes a client sends, whichever way
/// they are split: one byte, then the rest of a pipelined pair of requests;
/// "P", then the rest of the HTTP/2 preface.
#[tokio::test]
async fn first_bytes_split_anywhere_are_served() {
    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (gw, u1) = gateway_with("").await;
    let mut s = tokio::net::TcpStream::connect(gw.data).await.unwrap();
    s.write_all(b"G").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"ET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answers = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut answers))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answers.matches("HTTP/1.1 200 OK").count(), 2, "{answers}");
    assert!(
        answers.contains("\"/one\"") && answers.contains("\"/two\""),
        "{answers}"
    );
    assert_eq!(u1.hits(), 2);

    // HTTP/2 with prior knowledge, its preface split after one byte.
    let (near, far) = tokio::io::duplex(64 * 1024);
    let mut tcp = tokio::net::TcpStream::connect(gw.data).await.unwrap();
    tcp.write_all(b"P").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(near),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    // The client wrote "PRI * HTTP/2.0..." into the pipe: pass it on minus
    // the "P" already sent.
    tokio::spawn(async move {
        let (mut far_r, mut far_w) = tokio::io::split(far);
        let (mut tcp_r, mut tcp_w) = tcp.into_split();
        let mut p = [0u8; 1];
        far_r.read_exact(&mut p).await.unwrap();
        assert_eq!(&p, b"P");
        let up = tokio::io::copy(&mut far_r, &mut tcp_w);
        let down = tokio::io::copy(&mut tcp_r, &mut far_w);
        let _ = tokio::join!(up, down);
    });
    let req = http::Request::get(format!("http://{}/h2", gw.data))
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("\"/h2\""));
    gw.stop().await;
}

/// A raw upstream that sends `head` and `body` (in 64 KiB writes), then
/// keeps the connection open for `hold`.
async fn scripted_upstream(head: String, body_len: usize, hold: Duration) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let head = head.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                let _ = s.read(&mut buf).await;
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b'z'; 64 * 1024];
                let mut left = body_len;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if s.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n;
                }
                tokio::time::sleep(hold).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn stalled_upstream_body_is_cut_after_the_read_timeout() {
    let gw = Gateway::start().await;
    let up = scripted_upstream(
        "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n".into(),
        10,
        Duration::from_secs(30),
    )
    .await;
    let mut conf = upstream(&[(&up.to_string(), 1)]);
    conf["timeout"] = json!({"connect": 1, "send": 1, "read": 0.5});
    gw.put("routes/s", json!({"uri": "/s", "upstream": conf}))
        .await;
    let t = Instant::now();
    let (resp, closed) = raw(
        gw.data,
        b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(closed, "client connection aborted");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert!(resp.starts_with("HTTP/1.1 200"));
    gw.stop().await;
}

#[tokio::test]
async fn client_that_stops_reading_is_dropped_after_send_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (gw, _u1) = gateway_with("nginx_config:\n  http:\n    send_timeout: 1s\n").await;
    const SIZE: usize = 64 * 1024 * 1024;
    let up = scripted_upstream(
        format!("HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\n\r\n"),
        SIZE,
        Duration::from_secs(1),
    )
    .await;
    gw.put(
        "routes/big",
        json!({"uri": "/big", "upstream": upstream(&[(&up.to_string(), 1)])}),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(gw.data).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Read nothing for a while: the gateway's writes block, then time out.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => total += n,
            Err(_) => panic!("connection still open after send_timeout"),
        }
    }
    assert!(
        total < SIZE,
        "the whole body arrived ({total} bytes): the slow reader was not dropped"
    );
    gw.stop().await;
}

/// An upstream that reads one buffer of the request and then nothing more,
/// holding the connection open.
async fn deaf_upstream() -> std::net::SocketAddr {
    use tokio::io::AsyncReadExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    addr
}

/// `timeout.send`: an upstream that stops taking the request body is given
/// up on after `send`, not after `read` (which here is much longer).
#[tokio::test]
async fn upstream_that_stops_taking_the_body_times_out_after_send() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gateway::start().await;
    let up = deaf_upstream().await;
    let mut conf = upstream(&[(&up.to_string(), 1)]);
    conf["timeout"] = json!({"connect": 1, "send": 1, "read": 20});
    gw.put("routes/up", json!({"uri": "/up", "upstream": conf}))
        .await;
    const SIZE: usize = 256 * 1024 * 1024;
    let s = tokio::net::TcpStream::connect(gw.data).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let t = Instant::now();
    let writer = tokio::spawn(async move {
        let head = format!("POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {SIZE}\r\n\r\n");
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b'u'; 256 * 1024];
        for _ in 0..SIZE / chunk.len() {
            wr.write_all(&chunk).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    while !resp.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), rd.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => resp.extend_from_slice(&buf[..n]),
            other => panic!("no answer: {other:?} after {:?}", t.elapsed()),
        }
    }
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 504"), "{resp}");
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "took {:?}",
        t.elapsed()
    );
    writer.abort();
    gw.stop().await;
}

/// An upload that takes longer than connect + send + read together still
/// goes through, as long as no single phase stalls.
#[tokio::test]
async fn a_slow_steady_upload_is_not_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (gw, u1) = gateway_with("").await;
    let mut conf = upstream(&[(&u1.node(), 1)]);
    conf["timeout"] = json!({"connect": 0.5, "send": 0.5, "read": 0.5});
    gw.put("routes/slow", json!({"uri": "/slow", "upstream": conf}))
        .await;
    let mut s = tokio::net::TcpStream::connect(gw.data).await.unwrap();
    s.write_all(
        b"POST /slow HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        s.write_all(b"4\r\nabcd\r\n").await.unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let mut resp = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut resp))
        .await
        .unwrap()
        .unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains(r#""body_len":32"#), "{resp}");
    gw.stop().await;
}

/// Slowloris: 100 clients trickling their request heads are cut off after
/// `client_header_timeout`, and meanwhile everybody else is served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_heads_are_cut_off_and_slow_nobody_down() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (gw, _u1) = gateway_with("nginx_config:\n  http:\n    client_header_timeout: 1s\n").await;
    let mut tricklers = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let addr = gw.data;
        tricklers.spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let started = Instant::now();
            let head =
                b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Trickle: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
            for byte in head.iter().cycle() {
                if s.write_all(&[*byte]).await.is_err() {
                    break;
                }
                // Has the gateway hung up?
                let mut buf = [0u8; 64];
                match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    _ => {}
                }
                if started.elapsed() > Duration::from_secs(8) {
                    break;
                }
            }
            started.elapsed()
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..20 {
        let t = Instant::now();
        let r = gw.get("/fast").await;
        assert_eq!(r.status, 200);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "a normal request took {:?} beside the tricklers",
            t.elapsed()
        );
    }
    while let Some(lasted) = tricklers.join_next().await {
        let lasted = lasted.unwrap();
        assert!(
            lasted < Duration::from_secs(4),
            "a trickling client was kept {lasted:?}"
        );
    }
    gw.stop().await;
}

/// `keepalive_timeout`: an idle kept-alive client connection is closed.
#[tokio::test]
async fn idle_keepalive_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (gw, _u1) = gateway_with("nginx_config:\n  http:\n    keepalive_timeout: 1s\n").await;
    let mut s = tokio::net::TcpStream::connect(gw.data).await.unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let idle = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "idle connection still open after 5 s");
    let waited = idle.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
    gw.stop().await;
}

/// A client that connects and sends nothing is closed after
/// `client_header_timeout`, counted from the accept, as nginx does.
#[tokio::test]
async fn silent_connections_are_closed_after_client_header_timeout() {
    use tokio::io::AsyncReadExt;
    let (gw, _u1) = gateway_with("nginx_config:\n  http:\n    client_header_timeout: 1s\n").await;
    let mut s = tokio::net::TcpStream::connect(gw.data).await.unwrap();
    let opened = Instant::now();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "silent connection still open after 5 s"
    );
    let waited = opened.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
    // Everybody else is still served.
    assert_eq!(gw.get("/after").await.status, 200);
    gw.stop().await;
}

/// Reads one HTTP/1.1 response with a Content-Length body from `s`.
async fn read_response(s: &mut tokio::net::TcpStream, pending: &mut Vec<u8>) -> String {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if pending.len() >= end + 4 + len {
                let whole: Vec<u8> = pending.drain(..end + 4 + len).collect();
                return String::from_utf8_lossy(&whole).to_string();
            }
        }
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("response within 5 s")
            .expect("read");
        assert!(
            n > 0,
            "connection closed; had {:?}",
            String::from_utf8_lossy(pending)
        );
        pending.extend_from_slice(&buf[..n]);
    }
}

/// A keep-alive connection that goes quiet gives hyper's buffers back and
/// is picked up again when the client speaks: the next request, one that
/// arrives in pieces, and pipelined ones are all served on the same
/// connection.
#[tokio::test]
async fn quiet_keepalive_connections_serve_what_comes_next() {
    use tokio::io::AsyncWriteExt;
    let (gw, _u1) = gateway_with("").await;
    let mut s = tokio::net::TcpStream::connect(gw.data).await.unwrap();
    let mut pending = Vec::new();
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    s.write_all(get("/one").as_bytes()).await.unwrap();
    let r = read_response(&mut s, &mut pending).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("/one"), "{r}");

    // Well past the quiet period: the connection is parked.
    tokio::time::sleep(Duration::from_millis(700)).await;
    s.write_all(get("/two").as_bytes()).await.unwrap();
    let r = read_response(&mut s, &mut pending).await;
    assert!(r.starts_with("HTTP/1.1 200") && r.contains("/two"), "{r}");

    // Parked again, then a head in two pieces with a pause between.
    tokio::time::sleep(Duration::from_millis(700)).await;
    s.write_all(b"GET /thr").await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.write_all(b"ee HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s, &mut pending).await;
    assert!(r.starts_with("HTTP/1.1 200") && r.contains("/three"), "{r}");

    // Parked again, then three pipelined requests in one write.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let burst = format!("{}{}{}", get("/p1"), get("/p2"), get("/p3"));
    s.write_all(burst.as_bytes()).await.unwrap();
    for path in ["/p1", "/p2", "/p3"] {
        let r = read_response(&mut s, &mut pending).await;
        assert!(
            r.starts_with("HTTP/1.1 200") && r.contains(path),
            "{path}: {r}"
        );
    }
    gw.stop().await;
}

/// HTTP/2 limits: the gateway announces 128 concurrent streams, and a
/// client that opens and immediately resets streams (CVE-2023-44487, rapid
/// reset) is disconnected while everybody else goes on being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_stream_limits_and_rapid_reset() {
    use std::future::Future;
    let (gw, _u1) = gateway_with("").await;
    let tcp = tokio::net::TcpStream::connect(gw.data).await.unwrap();
    let (client, mut conn) = h2::client::handshake(tcp).await.unwrap();
    // What the server announced, read while the connection is driven.
    let announced = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = announced.clone();
    let conn = tokio::spawn(std::future::poll_fn(move |cx| {
        let polled = std::pin::Pin::new(&mut conn).poll(cx);
        seen.store(
            conn.max_concurrent_send_streams(),
            std::sync::atomic::Ordering::Relaxed,
        );
        polled
    }));
    let mut client = client.ready().await.unwrap();
    // The server's SETTINGS have arrived once a request has been answered.
    let (resp, _) = client
        .send_request(
            http::Request::get(format!("http://{}/first", gw.data))
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    assert_eq!(announced.load(std::sync::atomic::Ordering::Relaxed), 128);

    let t = Instant::now();
    let mut sent = 0;
    let cut_off = loop {
        let Ok(ready) = client.clone().ready().await else {
            break true;
        };
        client = ready;
        let req = http::Request::get(format!("http://{}/reset", gw.data))
            .body(())
            .unwrap();
        match client.send_request(req, false) {
            Ok((_, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
            Err(_) => break true,
        }
        sent += 1;
        if sent >= 100_000 || t.elapsed() > Duration::from_secs(10) {
            break false;
        }
        if sent % 64 == 0 {
            tokio::task::yield_now().await;
        }
    };
    assert!(
        cut_off,
        "{sent} rapid resets in {:?} were all accepted",
        t.elapsed()
    );
    eprintln!("rapid reset: cut off after {sent} streams");
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "the flooding connection was closed");
    assert_eq!(gw.get("/others").await.status, 200);
    gw.stop().await;
}

/// HTTP/2 heads are bounded too: a 100 KiB header list is refused with
/// 431 (nginx's answer for an oversized HTTP/2 head) and the upstream never
/// sees it; normal h2 requests go on.
#[tokio::test]
async fn http2_oversized_head_is_refused() {
    let (gw, u1) = gateway_with("").await;
    let tcp = tokio::net::TcpStream::connect(gw.data).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let big = "v".repeat(100 * 1024);
    let req = http::Request::get(format!("http://{}/big", gw.data))
        .header("x-big", big.as_str())
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    match resp.await {
        Ok(r) => assert_eq!(r.status(), 431, "answered"),
        Err(e) => assert!(e.is_reset() || e.is_go_away(), "{e}"),
    }
    assert_eq!(u1.hits(), 0);
    let mut client = client.ready().await.unwrap();
    let (resp, _) = client
        .send_request(
            http::Request::get(format!("http://{}/small", gw.data))
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    gw.stop().await;
}

/// Two Host headers (or two of another field nginx takes once): 400, the
/// connection closed, nothing proxied, as nginx's "client sent duplicate
/// host header". Routing by one Host while the upstream reads the other
/// would let a client reach a route it does not name.
#[tokio::test]
async fn duplicate_host_is_refused() {
    let (gw, u1) = gateway_with("").await;
    let attacks: [&[u8]; 3] = [
        b"GET /a HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: a.test\r\nhost: a.test\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    ];
    for attack in attacks {
        let (resp, closed) = raw(gw.data, attack, WAIT).await;
        assert_eq!(status(&resp), "400", "{resp}");
        assert!(closed, "{resp}");
    }
    assert_eq!(u1.hits(), 0, "nothing reached the upstream");
    let (resp, _) = raw(
        gw.data,
        b"GET /a HTTP/1.1\r\nHost: a\r\nAccept: x\r\nAccept: y\r\nConnection: close\r\n\r\n",
        WAIT,
    )
    .await;
    assert_eq!(status(&resp), "200", "{resp}");
    gw.stop().await;
}

/// Sends a head declaring a `len`-byte body, then the body, and only then
/// reads the answer, as a simple client does; returns whether the whole
/// body could be sent, and what it could read.
async fn upload_and_read(target: std::net::SocketAddr, head: String, len: usize) -> (bool, String) {
    let stream = tokio::net::TcpStream::connect(target).await.unwrap();
    upload_and_read_over(stream, head, len).await
}

/// [`upload_and_read`] over a connection already open (TLS, say).
pub(crate) async fn upload_and_read_over<S>(
    mut stream: S,
    head: String,
    len: usize,
) -> (bool, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.write_all(head.as_bytes()).await;
    // Let the early answer come, then keep sending into the closed end.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0;
    while sent < len {
        let write = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&chunk)).await;
        if !matches!(write, Ok(Ok(()))) {
            break;
        }
        sent += chunk.len();
    }
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got)).await;
    (sent >= len, String::from_utf8_lossy(&got).into_owned())
}

/// An answer given before the body was read (413 over the size limit on
/// the data plane, 400 on the Admin API) reaches a client that is still
/// sending its 2 MiB body: the gateway lingers, reading and discarding,
/// instead of resetting the connection (nginx's lingering_close).
#[tokio::test]
async fn early_answer_reaches_a_client_still_sending() {
    let (gw, _u1) = gateway_with("nginx_config:\n  http:\n    client_max_body_size: 1k\n").await;
    let len = 2 * 1024 * 1024;
    for _ in 0..3 {
        let head = format!("POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {len}\r\n\r\n");
        let (sent, resp) = upload_and_read(gw.data, head, len).await;
        assert!(sent, "data plane: the upload was cut off (broken pipe)");
        assert_eq!(status(&resp), "413", "data plane: {resp:?}");
        let head = format!(
            "PUT /apisix/admin/routes/big HTTP/1.1\r\nHost: a\r\nX-API-KEY: {}\r\n\
             Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n",
            harness::KEY
        );
        let (sent, resp) = upload_and_read(gw.admin, head, len).await;
        assert!(sent, "Admin API: the upload was cut off (broken pipe)");
        // APISIX answers an oversized Admin body 400.
        assert_eq!(status(&resp), "400", "Admin API: {resp:?}");
    }
    gw.stop().await;
}

/// HTTP/2 connections are timed as nginx times them: one that sends only
/// part of the preface is closed after `client_header_timeout`, and one
/// with no stream open after `keepalive_timeout`, while a connection with a
/// stream in progress stays.
#[tokio::test]
async fn idle_http2_connections_are_closed() {
    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (gw, _u1) = gateway_with(
        "nginx_config:\n  http:\n    client_header_timeout: 1s\n    keepalive_timeout: 1s\n",
    )
    .await;

    // The preface's first bytes pick HTTP/2; the rest never comes.
    let mut s = tokio::net::TcpStream::connect(gw.data).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let opened = Instant::now();
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "half a preface kept the connection 6 s");
    assert!(
        opened.elapsed() >= Duration::from_millis(800),
        "closed after {:?}",
        opened.elapsed()
    );

    // One request, then nothing: closed within two keepalive periods and
    // the grace for its GOAWAY.
    let (mut sender, conn) = h2c(&gw).await;
    let req = http::Request::get(format!("http://{}/h2", gw.data))
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let idle = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(6), conn).await;
    assert!(ended.is_ok(), "idle HTTP/2 connection still open after 6 s");
    let waited = idle.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_millis(4500),
        "closed after {waited:?}"
    );
    gw.stop().await;
}

type Frames = std::pin::Pin<
    Box<
        dyn futures_util::Stream<
                Item = Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>,
            > + Send,
    >,
>;

/// A stream still open keeps its HTTP/2 connection past `keepalive_timeout`.
#[tokio::test]
async fn http2_connection_with_an_open_stream_stays() {
    use http_body_util::BodyExt;
    let (gw, _u1) = gateway_with("nginx_config:\n  http:\n    keepalive_timeout: 1s\n").await;
    let (mut sender, conn) = h2c(&gw).await;
    // A request body that takes 3 s to arrive: the stream is open all along.
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let data = rx.recv().await?;
        Some((
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(data)),
            rx,
        ))
    });
    let req = http::Request::post(format!("http://{}/slow-upload", gw.data))
        .body(http_body_util::StreamBody::new(Box::pin(frames) as Frames))
        .unwrap();
    let mut second = sender.clone();
    let answer = tokio::spawn(async move { sender.send_request(req).await });
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        tx.send(bytes::Bytes::from_static(b"part")).await.unwrap();
    }
    drop(tx);
    let resp = answer.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains(r#""body_len":12"#),
        "{body:?}"
    );
    // No GOAWAY came while the stream was open: a new stream is served.
    let again = http::Request::get(format!("http://{}/again", gw.data))
        .body(http_body_util::StreamBody::new(
            Box::pin(futures_util::stream::empty()) as Frames,
        ))
        .unwrap();
    let resp = second.send_request(again).await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(second);
    let _ = conn.await;
    gw.stop().await;
}

/// A GET over a new HTTP/2 connection whose streams get `window` bytes of
/// flow-control window: the answer's head, and the connection's task.
async fn h2_get_with_window(
    gw: &Gateway,
    path: &str,
    window: u32,
) -> (
    http::Response<h2::RecvStream>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = tokio::net::TcpStream::connect(gw.data).await.unwrap();
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get(format!("http://{}{path}", gw.data))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    (resp.await.unwrap(), conn)
}

/// `send_timeout` on HTTP/2: a client that opens no flow-control window
/// for an answer's body never makes a write block, and is closed after one
/// to two `send_timeout`s all the same; a client reading slowly is not.
#[tokio::test]
async fn http2_client_that_opens_no_window_is_closed() {
    let (gw, _u1) = gateway_with("nginx_config:\n  http:\n    send_timeout: 1s\n").await;
    let (resp, conn) = h2_get_with_window(&gw, "/stuck", 0).await;
    // The head needs no window; the body waits for one that never opens.
    assert_eq!(resp.status(), 200);
    let stalled = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(6), conn).await;
    assert!(
        ended.is_ok(),
        "a client with no window kept its connection 6 s"
    );
    let waited = stalled.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_millis(3500),
        "closed after {waited:?}"
    );
    drop(resp);

    // Reading a body 16 bytes at a time, one window every 400 ms, keeps
    // the connection past the same 2 s.
    let (resp, conn) = h2_get_with_window(&gw, "/slow-reader", 16).await;
    let mut body = resp.into_body();
    let started = Instant::now();
    let mut got = 0;
    while started.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let chunk = tokio::time::timeout(Duration::from_secs(2), body.data())
            .await
            .expect("16 more bytes within 2 s")
            .expect("the body goes on")
            .unwrap();
        got += chunk.len();
        body.flow_control().release_capacity(chunk.len()).unwrap();
    }
    assert!(got >= 16 * 6, "{got} bytes read");
    assert!(!conn.is_finished(), "a slow reader was closed");
    gw.stop().await;
}
