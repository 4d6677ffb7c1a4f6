#![allow(clippy::unwrap_used)]
//! http-logger against a real HTTP collector: batches as APISIX sends
//! them, the collector down and back (entries retried, requests never
//! slower), and `plugin_metadata` log formats.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use harness::serde_json::{json, Value};
use harness::{upstream, Gateway, Upstream};

/// What the collector received: content type and body of each POST.
type Received = Arc<Mutex<Vec<(String, String)>>>;

/// A log collector on `addr` (a free port when `None`).
struct Collector {
    addr: SocketAddr,
    got: Received,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start(addr: Option<SocketAddr>) -> Collector {
        let listener = TcpListener::bind(addr.unwrap_or(([127, 0, 0, 1], 0).into()))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let got: Received = Arc::default();
        let sink = got.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let sink = sink.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let sink = sink.clone();
                            async move {
                                let ct = req
                                    .headers()
                                    .get("content-type")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_string();
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                sink.lock()
                                    .unwrap()
                                    .push((ct, String::from_utf8_lossy(&body).into_owned()));
                                Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from("ok"))))
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Collector { addr, got, task }
    }

    fn uri(&self) -> String {
        format!("http://{}/logs", self.addr)
    }

    /// Waits until `n` POSTs arrived; all of them.
    async fn posts(&self, n: usize) -> Vec<(String, String)> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let got = self.got.lock().unwrap().clone();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{} posts, want {n}: {got:?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn batches_reach_the_collector() {
    let gw = Gateway::start().await;
    let up = Upstream::start("u").await;
    let collector = Collector::start(None).await;
    gw.put(
        "routes/logged",
        json!({"uri": "/logged", "upstream": upstream(&[(&up.node(), 1)]),
               "plugins": {"http-logger": {"uri": collector.uri(), "batch_max_size": 3,
                                           "inactive_timeout": 1,
                                           "log_format_extra": {"agent": "$http_user_agent", "env": "test"}}}}),
    )
    .await;
    for i in 0..7 {
        let r = gw.get(&format!("/logged?n={i}")).await;
        assert_eq!(r.status, 200);
    }
    let posts = collector.posts(3).await;
    let mut entries = Vec::new();
    for (ct, body) in &posts {
        assert_eq!(ct, "application/json");
        let batch: Value = harness::serde_json::from_str(body).unwrap();
        entries.extend(batch.as_array().unwrap().iter().cloned());
    }
    let sizes: Vec<usize> = posts
        .iter()
        .map(|(_, b)| {
            harness::serde_json::from_str::<Value>(b)
                .unwrap()
                .as_array()
                .unwrap()
                .len()
        })
        .collect();
    assert_eq!(sizes, vec![3, 3, 1]);
    // Every request once, in order, with APISIX's fields.
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e["route_id"], "logged");
        assert_eq!(e["request"]["method"], "GET");
        assert_eq!(e["request"]["uri"], format!("/logged?n={i}"));
        assert_eq!(e["request"]["querystring"]["n"], i.to_string());
        assert_eq!(e["response"]["status"], 200);
        assert_eq!(e["client_ip"], "127.0.0.1");
        assert_eq!(e["upstream"], up.node());
        assert!(e["latency"].as_f64().unwrap() >= 0.0);
        assert!(e["start_time"].as_u64().unwrap() > 1_700_000_000_000);
        assert!(e["request"]["headers"]["host"].is_string(), "{e}");
        assert!(e["response"]["size"].as_u64().unwrap() > 0);
        assert_eq!(e["env"], "test");
        assert!(e["agent"].is_string() || e["agent"].is_null(), "{e}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn collector_down_then_back() {
    let gw = Gateway::start().await;
    let up = Upstream::start("u").await;
    // A port nothing listens on yet.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    gw.put(
        "routes/down",
        json!({"uri": "/down", "upstream": upstream(&[(&up.node(), 1)]),
               "plugins": {"http-logger": {"uri": format!("http://{addr}/logs"),
                   "batch_max_size": 1, "max_retry_count": 10, "retry_delay": 1}}}),
    )
    .await;
    // Requests do not wait for the logger while its collector is down.
    for _ in 0..3 {
        let start = Instant::now();
        assert_eq!(gw.get("/down").await.status, 200);
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let collector = Collector::start(Some(addr)).await;
    // Retried until the collector answered: each entry exactly once, as
    // one object per POST (batch_max_size 1).
    let posts = collector.posts(3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(collector.got.lock().unwrap().len(), 3);
    for (_, body) in posts {
        let e: Value = harness::serde_json::from_str(&body).unwrap();
        assert_eq!(e["route_id"], "down");
    }
    gw.stop().await;
}

#[tokio::test]
async fn metadata_log_format_and_new_lines() {
    let gw = Gateway::start().await;
    let collector = Collector::start(None).await;
    gw.put(
        "plugin_metadata/http-logger",
        json!({"log_format": {"client": "$remote_addr", "status": "$status", "tag": "gw"}}),
    )
    .await;
    gw.put(
        "global_rules/log",
        json!({"plugins": {"http-logger": {"uri": collector.uri(), "batch_max_size": 2,
                                          "concat_method": "new_line"}}}),
    )
    .await;
    // Unrouted requests are logged too.
    assert_eq!(gw.get("/nowhere").await.status, 404);
    assert_eq!(gw.get("/nowhere").await.status, 404);
    let posts = collector.posts(1).await;
    let (ct, body) = &posts[0];
    assert_eq!(ct, "text/plain");
    let lines: Vec<Value> = body
        .lines()
        .map(|l| harness::serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{body}");
    for l in lines {
        assert_eq!(
            l,
            json!({"client": "127.0.0.1", "status": "404", "tag": "gw", "route_id": "no-matched"})
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn file_and_tcp_loggers() {
    let gw = Gateway::start().await;
    let up = Upstream::start("u").await;
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let file = gw.dir.path().join("logs/file-logger.log");
    gw.put(
        "routes/f",
        json!({"uri": "/f", "upstream": upstream(&[(&up.node(), 1)]),
               "plugins": {
                   "file-logger": {"path": file.to_str().unwrap(),
                                   "match": [[["arg_log", "==", "yes"]]]},
                   "tcp-logger": {"host": "127.0.0.1", "port": tcp.local_addr().unwrap().port(),
                                  "batch_max_size": 2, "log_format": {"uri": "$uri", "s": "$status"}}}}),
    )
    .await;
    assert_eq!(gw.get("/f?log=yes").await.status, 200);
    assert_eq!(gw.get("/f?log=no").await.status, 200);
    // file-logger: only the matching request, as one JSON line.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        if !text.is_empty() || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = std::fs::read_to_string(&file).unwrap_or(text);
    let lines: Vec<Value> = text
        .lines()
        .map(|l| harness::serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert_eq!(lines[0]["request"]["uri"], "/f?log=yes");
    assert_eq!(lines[0]["route_id"], "f");
    // tcp-logger: both requests in one batch on one connection.
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(10), tcp.accept())
        .await
        .unwrap()
        .unwrap();
    let mut got = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut conn, &mut got)
        .await
        .unwrap();
    let batch: Value = harness::serde_json::from_str(&got).unwrap();
    assert_eq!(
        batch,
        json!([{"uri": "/f", "s": "200", "route_id": "f"}, {"uri": "/f", "s": "200", "route_id": "f"}])
    );
    gw.stop().await;
}

#[tokio::test]
async fn request_bodies_in_entries() {
    let gw = Gateway::start().await;
    let up = Upstream::start("u").await;
    let collector = Collector::start(None).await;
    gw.put(
        "routes/body",
        json!({"uri": "/body", "upstream": upstream(&[(&up.node(), 1)]),
               "plugins": {"http-logger": {"uri": collector.uri(), "batch_max_size": 1,
                   "include_req_body": true, "max_req_body_bytes": 5,
                   "include_req_body_expr": [["arg_log", "==", "yes"]]}}}),
    )
    .await;
    // A body with a length, a chunked one, one the expression leaves out.
    let post = |path: &'static str, headers: Vec<(&'static str, String)>, body: &'static str| {
        let target = gw.data;
        async move { harness::send(target, "POST", path, &headers, body.to_string(), None).await }
    };
    let r = post("/body?log=yes", vec![], "hello world").await;
    assert_eq!(r.status, 200);
    // The upstream got the whole body; the entry its first 5 bytes.
    assert_eq!(r.json()["body_len"], 11);
    let r = post(
        "/body?log=yes",
        vec![("transfer-encoding", "chunked".into())],
        "abcdefg",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], 7);
    let r = post("/body?log=no", vec![], "secret").await;
    assert_eq!(r.status, 200);
    let posts = collector.posts(3).await;
    let entries: Vec<Value> = posts
        .iter()
        .map(|(_, b)| harness::serde_json::from_str(b).unwrap())
        .collect();
    let body_of = |uri: &str, n: usize| {
        entries
            .iter()
            .filter(|e| e["request"]["uri"] == uri)
            .nth(n)
            .map(|e| e["request"]["body"].clone())
            .unwrap()
    };
    assert_eq!(body_of("/body?log=yes", 0), json!("hello"));
    assert_eq!(body_of("/body?log=yes", 1), json!("abcde"));
    assert_eq!(body_of("/body?log=no", 0), Value::Null);
    gw.stop().await;
}

/// A TLS acceptor with a self-signed certificate for `localhost`.
fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

#[tokio::test]
async fn tls_collectors() {
    let gw = Gateway::start().await;
    let up = Upstream::start("u").await;
    let acceptor = tls_acceptor();
    // An https collector: each POST's body.
    let https = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let https_port = https.local_addr().unwrap().port();
    let posts: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = posts.clone();
    let tls = acceptor.clone();
    let https_task = tokio::spawn(async move {
        while let Ok((tcp, _)) = https.accept().await {
            let (tls, sink) = (tls.clone(), sink.clone());
            tokio::spawn(async move {
                let Ok(stream) = tls.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let sink = sink.clone();
                    async move {
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        sink.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&body).into_owned());
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from("ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    // A TLS TCP collector: the server name asked for, and what was sent.
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_port = tcp.local_addr().unwrap().port();
    let tcp_task = tokio::spawn(async move {
        let (conn, _) = tcp.accept().await.unwrap();
        let mut stream = acceptor.accept(conn).await.unwrap();
        let sni = stream.get_ref().1.server_name().map(str::to_string);
        let mut got = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut got)
            .await
            .unwrap();
        (sni, got)
    });
    let node = up.node();
    gw.put(
        "routes/tls-logged",
        json!({"uri": "/tls-logged", "upstream": upstream(&[(&node, 1)]),
               "plugins": {
                   "http-logger": {"uri": format!("https://localhost:{https_port}/logs"),
                                   "batch_max_size": 1},
                   "tcp-logger": {"host": "127.0.0.1", "port": tcp_port, "tls": true,
                                  "tls_options": "logs.test", "batch_max_size": 1,
                                  "log_format": {"uri": "$uri"}}}}),
    )
    .await;
    // ssl_verify: a self-signed certificate is refused, nothing is sent.
    gw.put(
        "routes/verified",
        json!({"uri": "/verified", "upstream": upstream(&[(&node, 1)]),
               "plugins": {"http-logger": {"uri": format!("https://localhost:{https_port}/logs"),
                                           "batch_max_size": 1, "ssl_verify": true,
                                           "log_format": {"route": "verified"}}}}),
    )
    .await;
    assert_eq!(gw.get("/verified").await.status, 200);
    assert_eq!(gw.get("/tls-logged").await.status, 200);
    let (sni, got) = tokio::time::timeout(Duration::from_secs(10), tcp_task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sni.as_deref(), Some("logs.test"));
    let entry: Value = harness::serde_json::from_str(&got).unwrap();
    assert_eq!(entry["uri"], "/tls-logged");
    let deadline = Instant::now() + Duration::from_secs(10);
    while posts.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no POST over https");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let posts = posts.lock().unwrap().clone();
    assert_eq!(posts.len(), 1, "{posts:?}");
    let entry: Value = harness::serde_json::from_str(&posts[0]).unwrap();
    assert_eq!(entry["route_id"], "tls-logged");
    https_task.abort();
    gw.stop().await;
}
