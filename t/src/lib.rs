//! Test harness: a real ferrogate server on loopback ports, real upstream
//! HTTP servers, and a plain HTTP/1.1 client that can pick its source
//! address (127.0.0.x) and keep connections alive.
//!
//! Nothing is mocked: requests go through the kernel's TCP stack into the
//! same `gateway::start` the binary runs.

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpSocket};

pub use serde_json;

pub mod cluster;
pub mod ports;
pub mod redis;

/// The admin key every test gateway uses.
pub const KEY: &str = "test-admin-key-0123456789abcdef";

/// A running gateway with its temp prefix.
pub struct Gateway {
    pub data: SocketAddr,
    pub admin: SocketAddr,
    /// The HTTPS listener, when the config enables one (see
    /// [`Self::start_tls`]); test gateways have none otherwise.
    pub tls: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
    running: Option<gateway::Running>,
}

impl Gateway {
    /// Starts a gateway with the default test config plus `extra` YAML
    /// appended (top-level sections).
    pub async fn start_with(extra: &str) -> Gateway {
        Self::start_full("", extra).await
    }

    /// Like [`Self::start_with`], with extra lines inside the `apisix:` section.
    pub async fn start_with_apisix(apisix_extra: &str) -> Gateway {
        Self::start_full(apisix_extra, "").await
    }

    /// A gateway with an HTTPS listener on a free loopback port; `ssl_extra`
    /// adds lines inside `apisix.ssl` (four-space indented).
    pub async fn start_tls(ssl_extra: &str) -> Gateway {
        Self::start_full(
            &format!("  ssl:\n    listen:\n      - ip: 127.0.0.1\n        port: 0\n{ssl_extra}"),
            "",
        )
        .await
    }

    /// `apisix_extra` inside `apisix:`, `extra` as top-level sections.
    pub async fn start_full(apisix_extra: &str, extra: &str) -> Gateway {
        // APISIX serves HTTPS on 9443 unless told not to; test gateways
        // that do not ask for it keep off that shared port.
        let no_tls;
        let apisix_extra = if apisix_extra.contains("  ssl:\n") {
            apisix_extra
        } else {
            no_tls = format!("  ssl:\n    enable: false\n{apisix_extra}");
            &no_tls
        };
        // Nor do they write access logs or export metrics on the shared
        // default port unless a test says so: tests of those name them.
        let mut extra = extra.to_string();
        if !extra.contains("nginx_config:") {
            extra.push_str("nginx_config:\n  http:\n    enable_access_log: false\n");
        }
        if !extra.contains("plugin_attr:") {
            extra.push_str("plugin_attr:\n  prometheus:\n    enable_export_server: false\n");
        }
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "apisix:\n  node_listen:\n    - ip: 127.0.0.1\n      port: 0\n{apisix_extra}\
             deployment:\n  role: traditional\n  admin:\n    admin_key:\n      - name: admin\n        key: {KEY}\n        role: admin\n      - name: viewer\n        key: viewer-{KEY}\n        role: viewer\n    admin_listen:\n      ip: 127.0.0.1\n      port: 0\n{extra}"
        );
        let path = dir.path().join("conf").join("config.yaml");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, yaml).unwrap();
        let config = gateway::GatewayConfig::load(&path).unwrap();
        let running = gateway::start(config).await.unwrap();
        Gateway {
            data: running.data_addrs[0],
            admin: running.admin_addr.unwrap(),
            tls: running.tls_addrs.first().copied(),
            dir,
            running: Some(running),
        }
    }

    pub async fn start() -> Gateway {
        Self::start_with("").await
    }

    /// A standalone gateway (`config_provider: yaml`) serving `apisix_yaml`
    /// from `conf/apisix.yaml`; it has no Admin API.
    pub async fn start_standalone(apisix_yaml: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("conf");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(conf.join("apisix.yaml"), apisix_yaml).unwrap();
        let yaml = "apisix:\n  node_listen:\n    - ip: 127.0.0.1\n      port: 0\n  ssl:\n    enable: false\n\
                    deployment:\n  role: data_plane\n  role_data_plane:\n    config_provider: yaml\n";
        let path = conf.join("config.yaml");
        std::fs::write(&path, yaml).unwrap();
        let config = gateway::GatewayConfig::load(&path).unwrap();
        let running = gateway::start(config).await.unwrap();
        Gateway {
            data: running.data_addrs[0],
            admin: running
                .admin_addr
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            tls: None,
            dir,
            running: Some(running),
        }
    }

    /// Replaces `conf/apisix.yaml` atomically (write, then rename), as a
    /// careful operator would.
    pub fn write_apisix_yaml(&self, text: &str) {
        let conf = self.dir.path().join("conf");
        let tmp = conf.join("apisix.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, conf.join("apisix.yaml")).unwrap();
    }

    /// One Admin API call with the admin key.
    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let mut headers = vec![("x-api-key", KEY.to_string())];
        let body = body.map(|b| {
            headers.push(("content-type", "application/json".into()));
            b.to_string()
        });
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/apisix/admin/{path}")
        };
        send(
            self.admin,
            method,
            &path,
            &headers,
            body.unwrap_or_default(),
            None,
        )
        .await
    }

    /// PUT that must succeed.
    pub async fn put(&self, path: &str, body: Value) -> Resp {
        let r = self.admin("PUT", path, Some(body)).await;
        assert!(
            r.status.is_success(),
            "PUT {path}: {} {}",
            r.status,
            r.text()
        );
        r
    }

    pub async fn get(&self, path: &str) -> Resp {
        send(self.data, "GET", path, &[], String::new(), None).await
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown(Duration::from_secs(5)).await;
        }
    }
}

/// A response, fully read.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The name of the test upstream that answered.
    pub fn upstream(&self) -> String {
        self.json()["upstream"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An HTTP/1.1 client connection from a chosen source address.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    target: SocketAddr,
}

impl Conn {
    pub async fn open(target: SocketAddr, source: Option<IpAddr>) -> std::io::Result<Conn> {
        let socket = TcpSocket::new_v4()?;
        if let Some(src) = source {
            socket.bind(SocketAddr::new(src, 0))?;
        }
        let stream = socket.connect(target).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { sender, target })
    }

    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: String,
    ) -> Resp {
        self.try_send(method, path, headers, body).await.unwrap()
    }

    pub async fn try_send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: String,
    ) -> Result<Resp, hyper::Error> {
        let mut req = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(path);
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req = req.header("host", self.target.to_string());
        }
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let req = req.body(Full::new(Bytes::from(body))).unwrap();
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// One request on a fresh connection.
pub async fn send(
    target: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: String,
    source: Option<IpAddr>,
) -> Resp {
    let mut conn = Conn::open(target, source).await.unwrap();
    conn.send(method, path, headers, body).await
}

/// Whether a test that needs client addresses other than 127.0.0.1 can run.
/// On Linux binding 127.0.0.2 always works, so a failure is an error, not a
/// pass; elsewhere `FERROGATE_ALLOW_SKIP=1` turns it into a loud skip.
pub async fn need_alt_loopback(test: &str) -> bool {
    if alt_loopback_works().await {
        return true;
    }
    if std::env::var_os("FERROGATE_ALLOW_SKIP").is_some() {
        eprintln!("SKIPPED {test}: cannot bind 127.0.0.2 as a client address");
        return false;
    }
    panic!("{test} needs 127.0.0.2 as a client address (set FERROGATE_ALLOW_SKIP=1 to skip)");
}

/// Whether this machine lets a client bind 127.0.0.2 (Linux does).
pub async fn alt_loopback_works() -> bool {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    Conn::open(addr, Some("127.0.0.2".parse().unwrap()))
        .await
        .is_ok()
}

/// A test upstream: answers every request with a JSON echo of what it got.
/// `?status=N` sets the status, `?sleep_ms=N` delays the answer.
pub struct Upstream {
    pub name: &'static str,
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// An HTTP/1.1 echo upstream.
    pub async fn start(name: &'static str) -> Upstream {
        Upstream::serve(name, false).await
    }

    /// An echo upstream that speaks only HTTP/2 without TLS (h2c, as gRPC
    /// servers do).
    pub async fn start_h2c(name: &'static str) -> Upstream {
        Upstream::serve(name, true).await
    }

    async fn serve(name: &'static str, h2c: bool) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        echo(name, peer, req)
                    });
                    let io = TokioIo::new(stream);
                    if h2c {
                        let _ = hyper::server::conn::http2::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(io, svc)
                        .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await;
                    }
                });
            }
        });
        Upstream {
            name,
            addr,
            hits,
            task,
        }
    }

    pub fn node(&self) -> String {
        self.addr.to_string()
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo(
    name: &'static str,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let query = parts.uri.query().unwrap_or_default().to_string();
    let arg = |k: &str| {
        query
            .split('&')
            .find_map(|p| p.strip_prefix(&format!("{k}=")).map(str::to_string))
    };
    if let Some(ms) = arg("sleep_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = arg("status").and_then(|v| v.parse().ok()).unwrap_or(200u16);
    let mut headers = serde_json::Map::new();
    for (k, v) in &parts.headers {
        let v = v.to_str().unwrap_or_default().to_string();
        headers
            .entry(k.as_str().to_string())
            .and_modify(|old| {
                *old = Value::String(format!("{}, {v}", old.as_str().unwrap_or_default()))
            })
            .or_insert(Value::String(v));
    }
    let doc = json!({
        "upstream": name,
        "method": parts.method.as_str(),
        "path": parts.uri.to_string(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_len": body.len(),
        "body_sum": body.iter().map(|b| *b as u64).sum::<u64>(),
        "client": peer.ip().to_string(),
        "peer": peer.to_string(),
    });
    let resp = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("server", "test-upstream")
        .header("x-upstream-name", name)
        .header("keep-alive", "timeout=5")
        .body(Full::new(Bytes::from(doc.to_string())))
        .unwrap();
    Ok(resp)
}

/// A loopback address that refuses connections.
///
/// Its port is one `cluster::free_port` handed out, so no listener of another
/// test takes it later.
pub fn refused_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], cluster::free_port()))
}

/// `{"type":"roundrobin","nodes":{...}}` from `(node, weight)` pairs.
pub fn upstream(nodes: &[(&str, u64)]) -> Value {
    let map: serde_json::Map<String, Value> = nodes
        .iter()
        .map(|(n, w)| (n.to_string(), json!(w)))
        .collect();
    json!({"type": "roundrobin", "nodes": map})
}

/// Sends raw bytes, reads until the server closes or `wait` passes.
/// Returns what was read and whether the server closed the connection.
pub async fn raw(target: SocketAddr, bytes: &[u8], wait: Duration) -> (String, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(target).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

/// A raw upstream that answers every connection with `reply` and closes.
pub async fn raw_upstream(reply: &'static [u8]) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply).await;
            });
        }
    });
    addr
}
