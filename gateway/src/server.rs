//! Listeners: the data plane (hyper, HTTP/1.1 and h2c) and the Admin API
//! (axum), with graceful shutdown.
//!
//! Each data-plane request loads the live snapshot once, is tagged with the
//! client address ([`ClientIp`]: the TCP peer, or what a trusted proxy says
//! when `nginx_config.http.real_ip_from` names the peer) and runs through the
//! snapshot's service. The `Server` header of every answer is the gateway's.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use http_body::Body as _;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

use plugins::{ClientIp, ConnInfo, ResponseBody};

use crate::body::{BodyFault, ClientBody};
use arc_swap::ArcSwap;

use crate::config::RealIp;
use crate::error::Error;
use crate::error_page::{error_page, with_close};
use crate::framing::{FramingWatch, Verdict};
use crate::limits::{self, BodyLimits};
use crate::snapshot::SharedSnapshot;

/// Settings of the data-plane listeners.
#[derive(Clone)]
pub struct DataPlane {
    pub live: SharedSnapshot,
    pub server_header: HeaderValue,
    /// What a config reload (SIGHUP) may change without a restart.
    pub edge: Arc<ArcSwap<Edge>>,
    /// `client_header_timeout`: time to send a request head.
    pub header_timeout: Duration,
    /// `keepalive_timeout`: hyper times the wait for the next request head
    /// with the same timer, so the shorter of the two bounds both.
    pub keepalive_timeout: Duration,
    /// `send_timeout`: longest a client may leave a write blocked.
    pub send_timeout: Duration,
    /// Client connections served at once (`event.worker_connections`).
    pub connections: Arc<Semaphore>,
}

/// Edge settings that can change while running.
#[derive(Debug, Clone)]
pub struct Edge {
    pub real_ip: Option<RealIp>,
    /// `apisix.trusted_addresses`.
    pub trusted_addresses: Option<plugins::cidr::IpSet>,
    pub body: BodyLimits,
}

/// Binds a listener for `what` (`data plane`, `Admin API`) with
/// `SO_REUSEADDR` and a backlog of 1024. Fails with [`Error::Bind`] naming
/// the address when it cannot be bound, [`Error::Io`] when the socket
/// cannot be made or set up.
pub async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, Error> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .map_err(|error| Error::Bind { addr, what, error })?;
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

/// One client connection, as each of its requests' handling sees it.
struct ClientConn {
    peer: SocketAddr,
    /// The address the client connected to.
    local: SocketAddr,
    framing: Arc<Verdict>,
    /// Requests seen so far (HTTP/1 serves them in order).
    requests: AtomicU64,
}

async fn handle(
    plane: Arc<DataPlane>,
    conn: Arc<ClientConn>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let index = conn.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let admitted = if conn.framing.is_ambiguous(index) {
        // Both Content-Length and Transfer-Encoding: refused unread.
        Err(refuse(http::StatusCode::BAD_REQUEST))
    } else {
        admit(&plane, conn.peer, conn.local, req).await
    };
    let mut resp = match admitted {
        Ok(req) => {
            let snapshot = plane.live.load_full();
            snapshot.service.clone().oneshot(req).await?
        }
        Err(refusal) => refusal,
    };
    resp.headers_mut()
        .insert(http::header::SERVER, plane.server_header.clone());
    Ok(resp)
}

fn refuse(status: http::StatusCode) -> Response<ResponseBody> {
    with_close(error_page(status, None))
}

/// Edge checks (see [`crate::limits`]) and the request as the chain sees it:
/// client address, connection facts, body wrapped for timeouts.
async fn admit(
    plane: &DataPlane,
    peer: SocketAddr,
    local: SocketAddr,
    req: Request<Incoming>,
) -> Result<Request<ClientBody>, Response<ResponseBody>> {
    let (mut parts, incoming) = req.into_parts();
    limits::check_head(&parts.method, &parts.uri, parts.version, &parts.headers).map_err(refuse)?;
    // An owned Arc: the guard must not be held across the body read below.
    let edge = plane.edge.load_full();
    let ip = client_ip(peer.ip(), &parts.headers, edge.real_ip.as_ref());
    parts.extensions.insert(ClientIp(ip));
    parts.extensions.insert(ConnInfo {
        peer,
        local: SocketAddr::new(plugins::vars::canonical(local.ip()), local.port()),
        scheme: "http",
        forwarded_trusted: edge
            .trusted_addresses
            .as_ref()
            .is_some_and(|set| set.contains(peer.ip())),
    });
    let declared = incoming.size_hint().exact();
    if let (Some(max), Some(len)) = (edge.body.max_size, declared) {
        if len > max {
            return Err(refuse(http::StatusCode::PAYLOAD_TOO_LARGE));
        }
    }
    if incoming.is_end_stream() || declared == Some(0) {
        return Ok(Request::from_parts(parts, ClientBody::empty()));
    }
    let (body, state) = ClientBody::stream(incoming, edge.body.idle_timeout);
    parts.extensions.insert(state.clone());
    match (edge.body.max_size, declared) {
        // A chunked body under a size limit is read here, so that an
        // oversized one is refused before any upstream is contacted.
        (Some(max), None) => match Limited::new(body, max as usize).collect().await {
            Ok(collected) => Ok(Request::from_parts(
                parts,
                ClientBody::full(collected.to_bytes()),
            )),
            Err(e) if e.is::<LengthLimitError>() => {
                Err(refuse(http::StatusCode::PAYLOAD_TOO_LARGE))
            }
            Err(_) => Err(refuse(match state.fault() {
                Some(BodyFault::TimedOut) => http::StatusCode::REQUEST_TIMEOUT,
                _ => http::StatusCode::BAD_REQUEST,
            })),
        },
        _ => Ok(Request::from_parts(parts, body)),
    }
}

/// Serves the data plane on `listener` until `shutdown` flips to true.
pub async fn serve_data_plane(
    listener: TcpListener,
    plane: DataPlane,
    mut shutdown: watch::Receiver<bool>,
    graceful: Arc<GracefulShutdown>,
) {
    let plane = Arc::new(plane);
    let listen_addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(plane.header_timeout.min(plane.keepalive_timeout))
        .max_buf_size(limits::READ_BUFFER)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits::H2_MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(limits::H2_MAX_PENDING_RESETS)
        .max_header_list_size(limits::H2_MAX_HEADER_LIST);
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
        let Ok(permit) = plane.connections.clone().try_acquire_owned() else {
            // Over the connection cap: shed at once rather than queue.
            shed(stream);
            continue;
        };
        // The socket's own local address: the one the client dialled, which
        // for a wildcard listener is more than the listener's.
        let local = stream.local_addr().unwrap_or(listen_addr);
        serve_connection(
            stream,
            peer,
            local,
            plane.clone(),
            builder.clone(),
            &graceful,
            permit,
        );
    }
}

fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    plane: Arc<DataPlane>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    graceful: &GracefulShutdown,
    permit: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let send_timeout = plane.send_timeout;
    let (stream, framing) = FramingWatch::new(crate::io::SendTimeout::new(stream, send_timeout));
    let client = Arc::new(ClientConn {
        peer,
        local,
        framing,
        requests: AtomicU64::new(0),
    });
    let svc = hyper::service::service_fn(move |req| handle(plane.clone(), client.clone(), req));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    let conn = graceful.watch(conn.into_owned());
    tokio::spawn(async move {
        let _permit = permit;
        if let Err(e) = conn.await {
            tracing::debug!(%peer, error = %e, "client connection ended with an error");
        }
    });
}

/// Answers 503 and closes, without reading the request.
fn shed(stream: TcpStream) {
    const BUSY: &[u8] = b"HTTP/1.1 503 Service Temporarily Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let _ = stream.try_write(BUSY);
    tracing::warn!("connection limit reached; connection shed");
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
