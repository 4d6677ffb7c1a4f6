//! Listeners: the data plane (hyper, HTTP/1.1 and h2c) and the Admin API
//! (axum), with graceful shutdown.
//!
//! Each data-plane request loads the live snapshot once, is tagged with the
//! client address ([`ClientIp`]: the TCP peer, or what a trusted proxy says
//! when `nginx_config.http.real_ip_from` names the peer) and runs through the
//! snapshot's service. The `Server` header of every answer is the gateway's.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::ServiceExt;

use plugins::{ClientIp, ResponseBody};

use crate::config::RealIp;
use crate::proxy::ConnMeta;
use crate::snapshot::SharedSnapshot;

/// Settings of the data-plane listeners.
#[derive(Clone)]
pub struct DataPlane {
    pub live: SharedSnapshot,
    pub server_header: HeaderValue,
    pub real_ip: Option<Arc<RealIp>>,
    /// `client_header_timeout`: time to send a request head.
    pub header_timeout: Duration,
    /// `keepalive_timeout`: hyper times the wait for the next request head
    /// with the same timer, so the shorter of the two bounds both.
    pub keepalive_timeout: Duration,
}

/// Binds a listener, with a clear error naming the address.
pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for the {what}: {e}"))?;
    Ok(socket.listen(1024)?)
}

/// The address ip-restriction and `X-Real-IP` use for this request.
pub fn client_ip(peer: IpAddr, headers: &http::HeaderMap, real_ip: Option<&RealIp>) -> IpAddr {
    let peer = peer.to_canonical();
    let Some(rip) = real_ip else { return peer };
    if !rip.trusted.contains(peer) {
        return peer;
    }
    let Some(value) = headers
        .get(rip.header.as_str())
        .and_then(|v| v.to_str().ok())
    else {
        return peer;
    };
    let addrs: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let parsed = |s: &str| s.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
    if rip.recursive {
        // Walk from the right, skipping trusted hops; the first untrusted
        // address is the client.
        for a in addrs.iter().rev() {
            match parsed(a) {
                Some(ip) if rip.trusted.contains(ip) => continue,
                Some(ip) => return ip,
                None => return peer,
            }
        }
        addrs.first().and_then(|a| parsed(a)).unwrap_or(peer)
    } else {
        addrs.last().and_then(|a| parsed(a)).unwrap_or(peer)
    }
}

async fn handle(
    plane: Arc<DataPlane>,
    peer: SocketAddr,
    local_port: u16,
    mut req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let snapshot = plane.live.load_full();
    let ip = client_ip(peer.ip(), req.headers(), plane.real_ip.as_deref());
    let ext = req.extensions_mut();
    ext.insert(ClientIp(ip));
    ext.insert(ConnMeta {
        local_port,
        scheme: "http",
    });
    let mut resp = snapshot.service.clone().oneshot(req).await?;
    resp.headers_mut()
        .insert(http::header::SERVER, plane.server_header.clone());
    Ok(resp)
}

/// Serves the data plane on `listener` until `shutdown` flips to true.
pub async fn serve_data_plane(
    listener: TcpListener,
    plane: DataPlane,
    mut shutdown: watch::Receiver<bool>,
    graceful: Arc<GracefulShutdown>,
) {
    let plane = Arc::new(plane);
    let local_port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(plane.header_timeout.min(plane.keepalive_timeout))
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly
                    // instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        serve_connection(
            stream,
            peer,
            local_port,
            plane.clone(),
            builder.clone(),
            &graceful,
        );
    }
}

fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    local_port: u16,
    plane: Arc<DataPlane>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    graceful: &GracefulShutdown,
) {
    let _ = stream.set_nodelay(true);
    let svc = hyper::service::service_fn(move |req| handle(plane.clone(), peer, local_port, req));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    let conn = graceful.watch(conn.into_owned());
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%peer, error = %e, "client connection ended with an error");
        }
    });
}

/// Serves the Admin API until `shutdown` flips to true.
pub async fn serve_admin(
    listener: TcpListener,
    app: axum::Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    let result = axum::serve(listener, service)
        .with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "admin listener failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugins::cidr::IpSet;

    fn rip(recursive: bool) -> RealIp {
        RealIp {
            trusted: IpSet::from_entries(&["10.0.0.0/8"]).unwrap(),
            header: "x-forwarded-for".into(),
            recursive,
        }
    }

    fn headers(xff: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("x-forwarded-for", xff.parse().unwrap());
        h
    }

    #[test]
    fn untrusted_peer_cannot_claim_an_address() {
        let peer: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(
            client_ip(peer, &headers("127.0.0.1"), Some(&rip(false))),
            peer
        );
        assert_eq!(client_ip(peer, &headers("127.0.0.1"), None), peer);
    }

    #[test]
    fn trusted_proxy_reports_the_client() {
        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        let h = headers("198.51.100.1, 203.0.113.9, 10.0.0.9");
        assert_eq!(
            client_ip(proxy, &h, Some(&rip(false))),
            "10.0.0.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(proxy, &h, Some(&rip(true))),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(proxy, &headers("garbage"), Some(&rip(false))),
            proxy
        );
    }
}
