//! HTTP/2 connections to the nodes of `grpc` (h2c) and `grpcs` (TLS, ALPN
//! `h2`) upstreams.
//!
//! HTTP/2 carries the request's host in `:authority`, taken from the request
//! URI, so the URI must name the host `pass_host` chose while the connection
//! goes to the node. The pool therefore keys connections by node (address
//! and TLS server name) itself and hands out a [`SendRequest`] that any
//! request URI can use; one multiplexed connection per node serves every
//! request, as nginx's `grpc_pass` does with keep-alive.
//!
//! `keepalive_pool.requests` retires a connection after that many streams;
//! `keepalive_pool.idle_timeout` replaces one that has been idle longer at
//! its next use. A connection the node closed is replaced at the next use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::uri::Authority;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use tokio::time::Instant;

use crate::connector::{self, ConnectError};

use crate::body::ProxyBody;

/// One node's connection and what it has served.
struct Live {
    sender: SendRequest<ProxyBody>,
    streams: u32,
    last_used: Instant,
}

/// Which connection a request may share.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct NodeKey {
    node: Authority,
    server_name: String,
}

/// HTTP/2 connections of one connect timeout, TLS setting and pool shape.
pub struct H2Pool {
    /// `None`: h2c (`grpc`); otherwise TLS offering only ALPN `h2`.
    tls: Option<Arc<ClientConfig>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    nodes: Mutex<HashMap<NodeKey, Arc<tokio::sync::Mutex<Option<Live>>>>>,
}

impl H2Pool {
    /// A pool for h2c (`tls: None`) or TLS connections.
    pub fn new(
        tls: Option<ClientConfig>,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        let tls = tls.map(|mut config| {
            config.alpn_protocols = vec![b"h2".to_vec()];
            Arc::new(config)
        });
        H2Pool {
            tls,
            connect_timeout,
            idle_timeout,
            nodes: Mutex::new(HashMap::new()),
        }
    }

    /// A sender on the live connection to `node` (dialled as `node`,
    /// verified as `server_name` under TLS), connecting first when there is
    /// none, it is closed, idle for too long or has carried `max_streams`.
    pub async fn sender(
        &self,
        node: &Authority,
        server_name: &str,
        max_streams: u32,
    ) -> Result<SendRequest<ProxyBody>, ConnectError> {
        let key = NodeKey {
            node: node.clone(),
            server_name: server_name.to_string(),
        };
        let slot = {
            let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
            nodes.entry(key).or_default().clone()
        };
        // One connection attempt per node at a time; the others wait for it.
        let mut live = slot.lock().await;
        if let Some(l) = live.as_mut() {
            let usable = !l.sender.is_closed()
                && l.streams < max_streams
                && l.last_used.elapsed() < self.idle_timeout;
            if usable {
                l.streams += 1;
                l.last_used = Instant::now();
                return Ok(l.sender.clone());
            }
        }
        // Dropping the old sender lets its connection finish its streams
        // and close.
        *live = None;
        let sender = tokio::time::timeout(self.connect_timeout, self.connect(node, server_name))
            .await
            .map_err(|_| ConnectError::TimedOut(self.connect_timeout))??;
        *live = Some(Live {
            sender: sender.clone(),
            streams: 1,
            last_used: Instant::now(),
        });
        Ok(sender)
    }

    async fn connect(
        &self,
        node: &Authority,
        server_name: &str,
    ) -> Result<SendRequest<ProxyBody>, ConnectError> {
        let tls = self.tls.as_ref().map(|config| (config, server_name));
        let io = connector::dial(node, tls, None).await?;
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new());
        let (sender, conn) = builder.handshake(TokioIo::new(io)).await?;
        tokio::spawn(finish(node.clone(), conn));
        Ok(sender)
    }
}

/// Drives a connection until it ends.
async fn finish<F: std::future::Future<Output = Result<(), hyper::Error>>>(
    node: Authority,
    conn: F,
) {
    if let Err(e) = conn.await {
        tracing::debug!(%node, error = %e, "HTTP/2 upstream connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Either, Full};

    /// An h2c server answering 200 with the `:authority` it was given.
    async fn h2c_node() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = conns.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        |req: http::Request<hyper::body::Incoming>| async move {
                            let authority = req
                                .uri()
                                .authority()
                                .map(|a| a.to_string())
                                .unwrap_or_default();
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(authority),
                            )))
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr, conns)
    }

    fn request(authority: &str) -> http::Request<ProxyBody> {
        http::Request::get(format!("http://{authority}/svc/Method"))
            .body(Either::Left(Full::new(Bytes::new())))
            .unwrap()
    }

    #[tokio::test]
    async fn one_connection_per_node_any_authority_and_retired_after_max_streams() {
        let (addr, conns) = h2c_node().await;
        let node: Authority = addr.to_string().parse().unwrap();
        let pool = H2Pool::new(None, Duration::from_secs(1), Duration::from_secs(60));
        for authority in [
            "api.example.com",
            "other.example.com:8080",
            "api.example.com",
        ] {
            let mut sender = pool.sender(&node, "unused", 100).await.unwrap();
            let resp = sender.send_request(request(authority)).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, authority.as_bytes(), "`:authority` is the request's");
        }
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A limit of 2 streams: the third request gets a new connection.
        let pool = H2Pool::new(None, Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..3 {
            let mut sender = pool.sender(&node, "unused", 2).await.unwrap();
            sender.send_request(request("a")).await.unwrap();
        }
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_refused_node_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let node: Authority = l.local_addr().unwrap().to_string().parse().unwrap();
        drop(l);
        let pool = H2Pool::new(None, Duration::from_secs(1), Duration::from_secs(60));
        assert!(matches!(
            pool.sender(&node, "x", 10).await,
            Err(ConnectError::Io(_))
        ));
    }
}
