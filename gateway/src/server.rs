//! Listeners: the data plane (hyper, HTTP/1.1 and h2c) and the Admin API
//! (axum), with graceful shutdown.
//!
//! Each data-plane request loads the live snapshot once, is tagged with the
//! client address ([`ClientIp`]: the TCP peer, or what a trusted proxy says
//! when `nginx_config.http.real_ip_from` names the peer) and runs through the
//! snapshot's service. The `Server` header of every answer is the gateway's.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request, Response};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

use plugins::{ClientIp, ConnInfo, ResponseBody};

use crate::body::{BodyFault, ClientBody};
use arc_swap::ArcSwap;

use crate::config::RealIp;
use crate::drain::Drain;
use crate::error::Error;
use crate::error_page::{error_page, with_close};
use crate::framing::{FramingScan, Verdict};
use crate::head_wait::HeadWait;
use crate::io::Prefixed;
use crate::limits::{self, BodyLimits};
use crate::linger::Lingering;
use crate::metrics::{ConnGuard, CONNECTIONS};
use crate::park::{Activity, ClientIo, Tracked, PARK_AFTER};
use crate::snapshot::SharedSnapshot;
use crate::tls_edge::{TlsEdge, TlsInfo};

/// Settings of the data-plane listeners.
#[derive(Clone)]
pub struct DataPlane {
    pub live: SharedSnapshot,
    pub server_header: HeaderValue,
    /// What a config reload (SIGHUP) may change without a restart.
    pub edge: Arc<ArcSwap<Edge>>,
    /// `client_header_timeout`: time to send a request head.
    pub header_timeout: Duration,
    /// `keepalive_timeout`: the wait for the next request head is timed as
    /// one ([`HeadWait`], or hyper's timer over TLS), so the shorter of the
    /// two bounds both.
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
    /// HTTP/1 only: which request, if any, carried ambiguous framing.
    framing: Option<Arc<Verdict>>,
    /// Requests begun and answered, and what the I/O did lately.
    activity: Arc<Activity>,
    /// HTTPS: what the handshake settled.
    tls: Option<TlsInfo>,
    /// Accepted on a transparent listener.
    transparent: bool,
}

impl ClientConn {
    /// Wraps an HTTP/1 stream so its framing is followed (see
    /// [`crate::framing`]) and its I/O counted for this connection.
    fn framed<S>(&mut self, stream: S) -> ClientIo<S> {
        let verdict = Arc::new(Verdict::default());
        self.framing = Some(verdict.clone());
        ClientIo::new(stream, self.activity.clone(), FramingScan::new(verdict))
    }
}

/// One request on a client connection. A function returning an `async
/// move` block, as the proxy's steps are: an `async fn` keeps its arguments
/// twice, and hyper moves this future into place for every request, so what
/// it holds across its waits is kept small (the snapshot's boxed future, not
/// the request beside it).
#[allow(clippy::manual_async_fn)]
fn handle(
    plane: Arc<DataPlane>,
    conn: Arc<ClientConn>,
    req: Request<Incoming>,
) -> impl Future<Output = Result<Response<Tracked<ResponseBody>>, Infallible>> + Send {
    async move {
        // HTTP/1 serves a connection's requests in order, so the index names
        // the request the framing scan saw.
        let (exchange, index) = conn.activity.begin();
        let h2 = req.version() == http::Version::HTTP_2;
        let admitted = if conn.framing.as_ref().is_some_and(|f| f.is_ambiguous(index)) {
            // Both Content-Length and Transfer-Encoding: refused unread.
            Admitted::Refused(refuse(http::StatusCode::BAD_REQUEST))
        } else if conn
            .tls
            .as_ref()
            .is_some_and(|tls| !client_cert_admits(&plane, tls, &req))
        {
            Admitted::Refused(refuse(http::StatusCode::BAD_REQUEST))
        } else {
            admit(&plane, &conn, req)
        };
        let admitted = match admitted {
            Admitted::Ready(req) => Ok(req),
            Admitted::ReadWhole(whole) => Box::pin(whole.read()).await,
            Admitted::Refused(refusal) => Err(refusal),
        };
        // The snapshot is not held while the request runs: its future owns
        // what it needs.
        let dispatched = admitted.map(|req| plane.live.load().service.serve(req));
        let mut resp = match dispatched {
            Ok(dispatched) => dispatched.await,
            Err(refusal) => {
                // Answered before the body was read: let the answer arrive.
                conn.activity.set_linger();
                refusal
            }
        };
        if h2 {
            // HPACK keeps what it indexes: nothing of an upstream's buffer.
            crate::headers::own_values(resp.headers_mut());
        } else if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            conn.activity.set_upgraded();
        }
        resp.headers_mut()
            .insert(http::header::SERVER, plane.server_header.clone());
        Ok(resp.map(|body| Tracked::new(body, exchange, h2)))
    }
}

/// APISIX's client-certificate checks on a request over HTTPS (a refusal
/// is a 400): on a connection whose ssl object exempts some paths from
/// mutual TLS, other paths need a verified certificate; and a request may
/// not name, in its Host, a server whose ssl object checks client
/// certificates when its handshake was for another name (that would skip
/// the check).
fn client_cert_admits(plane: &DataPlane, tls: &TlsInfo, req: &Request<Incoming>) -> bool {
    if let Some(policy) = &tls.mtls {
        if !policy.admits(req.uri().path(), &tls.verify) {
            tracing::debug!(verify = %tls.vars.client_verify, "client certificate required for this path");
            return false;
        }
    }
    let host = req.uri().host().or_else(|| {
        req.headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    let Some(host) = host.map(crate::router::normalize_host) else {
        return true;
    };
    let host = crate::tls_edge::sni::normalize(&host);
    if tls.vars.server_name.as_deref() == Some(host.as_ref()) {
        return true;
    }
    let snapshot = plane.live.load();
    match snapshot.certs.find(&host) {
        Some(other) if other.mtls.is_some() => {
            tracing::debug!(%host, sni = ?tls.vars.server_name, "host needs a client certificate verified for its own name");
            false
        }
        _ => true,
    }
}

fn refuse(status: http::StatusCode) -> Response<ResponseBody> {
    with_close(error_page(status, None))
}

/// What [`admit`] made of a request.
enum Admitted {
    /// Ready for the chain.
    Ready(Request<ClientBody>),
    /// Refused at the edge, before its body was read.
    Refused(Response<ResponseBody>),
    /// A chunked body under a size limit, read whole before any upstream is
    /// contacted so that an oversized one is refused first.
    ReadWhole(ReadWhole),
}

/// A request whose chunked body must be read whole, up to `max` bytes.
struct ReadWhole {
    parts: http::request::Parts,
    body: ClientBody,
    max: usize,
    state: Arc<crate::body::BodyState>,
}

impl ReadWhole {
    /// The request with its body in memory; 413 beyond `max`, 408 when the
    /// client stalled, 400 when the body was broken.
    async fn read(self) -> Result<Request<ClientBody>, Response<ResponseBody>> {
        let ReadWhole {
            parts,
            body,
            max,
            state,
        } = self;
        match crate::body::read_whole(body, max).await {
            Ok(bytes) => Ok(Request::from_parts(parts, ClientBody::full(bytes))),
            Err(crate::body::ReadWholeError::TooLarge) => {
                Err(refuse(http::StatusCode::PAYLOAD_TOO_LARGE))
            }
            Err(crate::body::ReadWholeError::Broken) => Err(refuse(match state.fault() {
                Some(BodyFault::TimedOut) => http::StatusCode::REQUEST_TIMEOUT,
                _ => http::StatusCode::BAD_REQUEST,
            })),
        }
    }
}

/// Edge checks (see [`crate::limits`]) and the request as the chain sees it:
/// client address, connection facts, body wrapped for timeouts. Nothing
/// here waits; the one case that must read first is [`Admitted::ReadWhole`].
fn admit(plane: &DataPlane, conn: &ClientConn, req: Request<Incoming>) -> Admitted {
    let (peer, local) = (conn.peer, conn.local);
    let (mut parts, incoming) = req.into_parts();
    if let Err(status) =
        limits::check_head(&parts.method, &parts.uri, parts.version, &parts.headers)
    {
        return Admitted::Refused(refuse(status));
    }
    let edge = plane.edge.load();
    let ip = client_ip(peer.ip(), &parts.headers, edge.real_ip.as_ref());
    parts.extensions.insert(ClientIp(ip));
    parts.extensions.insert(ConnInfo {
        peer,
        local: SocketAddr::new(plugins::vars::canonical(local.ip()), local.port()),
        scheme: if conn.tls.is_some() { "https" } else { "http" },
        tls: conn.tls.as_ref().map(|t| t.vars.clone()),
        transparent: conn.transparent,
        forwarded_trusted: edge
            .trusted_addresses
            .as_ref()
            .is_some_and(|set| set.contains(peer.ip())),
    });
    let declared = incoming.size_hint().exact();
    if let (Some(max), Some(len)) = (edge.body.max_size, declared) {
        if len > max {
            return Admitted::Refused(refuse(http::StatusCode::PAYLOAD_TOO_LARGE));
        }
    }
    if incoming.is_end_stream() || declared == Some(0) {
        return Admitted::Ready(Request::from_parts(parts, ClientBody::empty()));
    }
    let (body, state) = ClientBody::stream(incoming, edge.body.idle_timeout);
    parts.extensions.insert(state.clone());
    match (edge.body.max_size, declared) {
        (Some(max), None) => Admitted::ReadWhole(ReadWhole {
            parts,
            body,
            max: usize::try_from(max).unwrap_or(usize::MAX),
            state,
        }),
        _ => Admitted::Ready(Request::from_parts(parts, body)),
    }
}

/// The two protocols a plain-text client connection may speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (h2c): the client opened with the preface.
    H2c,
}

/// How every HTTP/2 connection starts (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Tells the protocol from the first bytes a client sent. `None` while they
/// are a strict prefix too short to tell ("P", "PR").
fn protocol_of(first: &[u8]) -> Option<Protocol> {
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] != H2_PREFACE[..n] {
        Some(Protocol::Http1)
    } else if n >= 3 {
        // "PRI" is no HTTP/1 method anyone sends; h2 checks the rest.
        Some(Protocol::H2c)
    } else {
        None
    }
}

/// The most the first read of a connection takes: a request head of
/// ordinary size arrives whole in one read.
const FIRST_READ: usize = 4096;

/// What a connection's first read found, before any wait.
enum Early {
    /// The protocol, told from the bytes read.
    Told(Protocol, Bytes),
    /// The client closed, or its socket failed.
    Gone,
    /// Nothing yet, or too few bytes to tell (kept here): wait for more.
    Wait(BytesMut),
}

/// Reads what the client has already sent, without waiting: usually its
/// whole request, which it sends right behind the handshake. Only when
/// nothing is there yet does [`sniff`] wait, with a timer for the wait (the
/// read has registered the task for the socket's readiness). A client that
/// has sent nothing is left holding no buffer.
///
/// The read goes through the runtime, not straight to the socket: a short
/// read tells the runtime the socket is drained, which spares hyper's next
/// read a system call. A plain function of the poll's context, so that the
/// connection's task keeps no state for it.
fn read_early(stream: &mut TcpStream, cx: &mut Context<'_>) -> Early {
    let mut first = BytesMut::with_capacity(FIRST_READ);
    match tokio_util::io::poll_read_buf(Pin::new(stream), cx, &mut first) {
        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Early::Gone,
        Poll::Ready(Ok(_)) => match protocol_of(&first) {
            Some(protocol) => Early::Told(protocol, first.freeze()),
            None => Early::Wait(first),
        },
        Poll::Pending => Early::Wait(BytesMut::new()),
    }
}

/// Waits for the client's first bytes (after those in `first`), reads them
/// and tells the protocol they open. The bytes are handed to the protocol's
/// connection rather than peeked at: a peek would cost each connection a
/// second read of the same bytes. `None`: the client closed or failed first.
async fn sniff(stream: &mut TcpStream, mut first: BytesMut) -> Option<(Protocol, Bytes)> {
    use tokio::io::AsyncReadExt;
    loop {
        stream.readable().await.ok()?;
        // Allocated once bytes are there: a client that connects and says
        // nothing holds no buffer.
        if first.capacity() == 0 {
            first.reserve(FIRST_READ);
        }
        // `read_buf`, not `try_read_buf`: a short read tells the runtime the
        // socket is drained, which spares hyper's next read a system call.
        match stream.read_buf(&mut first).await {
            Ok(0) | Err(_) => return None,
            // A client that split its first three bytes ("P", "PR") is read
            // on until they tell.
            Ok(_) => {
                if let Some(protocol) = protocol_of(&first) {
                    return Some((protocol, first.freeze()));
                }
            }
        }
    }
}

/// The hyper connection builders, set up once per listener.
struct Protocols {
    /// Plain HTTP/1, whose wait for heads [`HeadWait`] times.
    http1: hyper::server::conn::http1::Builder,
    /// HTTP/1 over TLS, whose wait for heads hyper times.
    http1_tls: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

impl Protocols {
    fn new(plane: &DataPlane) -> Self {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        // The wait for request heads is timed by `HeadWait`, not by hyper
        // (whose timer costs an allocation and a timer-wheel entry per
        // request); without a timer hyper times nothing.
        http1
            .header_read_timeout(None)
            .max_buf_size(limits::READ_BUFFER)
            .keep_alive(true);
        let mut http1_tls = http1.clone();
        http1_tls
            .timer(TokioTimer::new())
            .header_read_timeout(plane.header_timeout.min(plane.keepalive_timeout));
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits::H2_MAX_CONCURRENT_STREAMS)
            .max_pending_accept_reset_streams(limits::H2_MAX_PENDING_RESETS)
            .max_header_list_size(limits::H2_MAX_HEADER_LIST);
        Protocols {
            http1,
            http1_tls,
            http2,
        }
    }
}

/// The next client of `listener` (`TCP_NODELAY` comes with its second
/// write: see [`Lingering`]); `None` once `stop` resolves (see
/// [`stop_signal`]). Accept failures (out of file descriptors and the like)
/// are logged and retried after a short pause instead of spinning.
async fn next_client(
    listener: &TcpListener,
    mut stop: Pin<&mut impl Future<Output = ()>>,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        // The stop first: a listener that always has a client waiting still
        // stops.
        let accepted = std::future::poll_fn(|cx| match stop.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => listener.poll_accept(cx).map(Some),
        })
        .await?;
        match accepted {
            Ok(client) => return Some(client),
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Resolves when `shutdown` changes (or its sender is gone): a listener's
/// stop, awaited across all its accepts. A `changed()` made afresh for each
/// accept would add a waiter to the channel and take it off again (a lock
/// each time), and a waiting `changed()` takes that lock whenever it is
/// polled; this one waits once and, after that, looks at the channel's
/// version (one atomic load) before it polls the wait.
async fn stop_signal(mut shutdown: watch::Receiver<bool>) {
    let probe = shutdown.clone();
    let changed = shutdown.changed();
    let mut changed = std::pin::pin!(changed);
    let mut waiting = false;
    std::future::poll_fn(move |cx| {
        if waiting && matches!(probe.has_changed(), Ok(false)) {
            return Poll::Pending;
        }
        waiting = true;
        changed.as_mut().poll(cx).map(|_| ())
    })
    .await
}

/// Where the socket was dialled: its own local address, which for a
/// wildcard listener says more than the listener's.
fn local_of(stream: &TcpStream, listener: &TcpListener) -> SocketAddr {
    stream
        .local_addr()
        .or_else(|_| listener.local_addr())
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// Serves the data plane on `listener` until `shutdown` flips to true.
///
/// `transparent`: the listener is a TProxy one (see [`crate::tproxy`]).
pub async fn serve_data_plane(
    listener: TcpListener,
    transparent: bool,
    plane: DataPlane,
    shutdown: watch::Receiver<bool>,
    drain: Arc<Drain>,
) {
    let protocols = Arc::new(Protocols::new(&plane));
    let plane = Arc::new(plane);
    let mut stop = std::pin::pin!(stop_signal(shutdown));
    while let Some((stream, peer)) = next_client(&listener, stop.as_mut()).await {
        CONNECTIONS.accepted();
        let Ok(permit) = plane.connections.clone().try_acquire_owned() else {
            // Over the connection cap: shed at once rather than queue.
            shed(stream);
            continue;
        };
        let local = local_of(&stream, &listener);
        let activity: Arc<Activity> = Arc::default();
        let counted = CONNECTIONS.handled(activity.clone());
        let client = ClientConn {
            peer,
            local,
            framing: None,
            activity,
            tls: None,
            transparent,
        };
        tokio::spawn(plugins::clock::Fresh::new(serve_connection(
            stream,
            client,
            plane.clone(),
            protocols.clone(),
            drain.watcher(),
            (permit, counted),
        )));
    }
}

/// One client connection from accept to close.
///
/// Nothing is allocated for the protocol until the client has sent its
/// first bytes, and a client that sends none within `client_header_timeout`
/// of the accept is closed, as nginx does. Each protocol's connection is
/// boxed on its own, so the task of an HTTP/1 client does not carry the
/// size of an HTTP/2 one.
///
/// Written as a function returning an `async move` block: an `async fn`
/// keeps a second copy of its arguments in the task.
#[allow(clippy::manual_async_fn)]
fn serve_connection(
    mut stream: TcpStream,
    mut client: ClientConn,
    plane: Arc<DataPlane>,
    protocols: Arc<Protocols>,
    mut drain: crate::drain::Watch,
    permit: (OwnedSemaphorePermit, ConnGuard),
) -> impl Future<Output = ()> + Send {
    async move {
        let _permit = &permit;
        let peer = client.peer;
        let early = std::future::poll_fn(|cx| Poll::Ready(read_early(&mut stream, cx))).await;
        let sniffed = match early {
            Early::Told(protocol, first) => Some((protocol, first)),
            Early::Gone => None,
            Early::Wait(first) => {
                // Boxed, as every stage that holds more than a parked
                // connection needs: a task is as large as its largest stage
                // for as long as it lives.
                Box::pin(async {
                    tokio::select! {
                        // The client's bytes first: the drain signal is then
                        // never waited on.
                        biased;
                        sniffed = tokio::time::timeout(plane.header_timeout, sniff(&mut stream, first)) => match sniffed {
                            Ok(protocol) => protocol,
                            Err(_) => {
                                tracing::debug!(%peer, "client sent nothing within client_header_timeout");
                                None
                            }
                        },
                        _ = drain.signalled() => None,
                    }
                })
                .await
            }
        };
        let Some((protocol, first)) = sniffed else {
            return;
        };
        let stream = crate::io::SendTimeout::new(
            Lingering::new(stream, client.activity.clone()),
            plane.send_timeout,
        );
        let ended = match protocol {
            Protocol::Http1 => {
                let mut io = client.framed(stream);
                io.start_with(first);
                let activity = client.activity.clone();
                let service = service_of(plane.clone(), client);
                // Boxed as well: the task is copied whole when it is spawned
                // and when it finishes, so it is kept to what every stage
                // needs (about 300 bytes; HTTP/1's state is 900).
                Box::pin(serve_http1(
                    io, service, activity, &plane, &protocols, drain,
                ))
                .await
            }
            Protocol::H2c => {
                let activity = client.activity.clone();
                let service = service_of(plane.clone(), client);
                Box::pin(serve_http2(
                    protocols
                        .http2
                        .serve_connection(TokioIo::new(Prefixed::new(first, stream)), service),
                    &activity,
                    &plane,
                    drain,
                ))
                .await
            }
        };
        if let Err(e) = ended {
            tracing::debug!(%peer, error = %e, "client connection ended with an error");
        }
    }
}

/// How long an HTTP/2 connection closed for being idle has to send its
/// GOAWAY: a client that reads nothing is not waited for.
const H2_IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Serves an HTTP/2 connection until it ends, a stop is signalled (then
/// until its open streams have ended), or it is idle (see [`h2_idle`]).
async fn serve_http2<C>(
    conn: C,
    activity: &Activity,
    plane: &DataPlane,
    mut drain: crate::drain::Watch,
) -> Result<(), hyper::Error>
where
    C: crate::drain::Graceful<Output = Result<(), hyper::Error>>,
{
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        biased;
        out = conn.as_mut() => return out,
        () = drain.signalled() => {
            conn.as_mut().graceful_shutdown();
            return conn.await;
        }
        () = h2_idle(activity, plane.header_timeout, plane.keepalive_timeout) => {
            conn.as_mut().graceful_shutdown();
        }
        () = h2_stalled(activity, plane.send_timeout) => {
            // nginx's send_timeout: the connection goes, streams and all
            // (their upstream connections with them).
            tracing::debug!("HTTP/2 client opened no window for send_timeout: closed");
            return Ok(());
        }
    }
    tokio::time::timeout(H2_IDLE_CLOSE_GRACE, conn)
        .await
        .unwrap_or(Ok(()))
}

/// Resolves once an HTTP/2 connection has begun no stream within
/// `client_header_timeout` of its start, or has had none open for
/// `keepalive_timeout` since: nginx times the preface and the idle
/// connection of HTTP/2 with these two. A stream that stays open (a long
/// poll, a server-sent event stream) keeps the connection. Looked at once
/// per period, so an idle connection goes after one to two periods; a timer
/// per stream would cost every request.
async fn h2_idle(activity: &Activity, header_timeout: Duration, keepalive: Duration) {
    // A zero keepalive_timeout (keep-alive off) closes at the first quiet look.
    const FLOOR: Duration = Duration::from_millis(100);
    let mut seen = 0;
    let mut period = header_timeout.max(FLOOR);
    loop {
        tokio::time::sleep(period).await;
        let begun = activity.begun();
        if begun == seen && activity.open() == 0 {
            return;
        }
        seen = begun;
        period = keepalive.max(FLOOR);
    }
}

/// Resolves once an HTTP/2 connection has had a response chunk waiting for
/// the client's flow-control window for a whole `send_timeout` with no
/// chunk of any stream sent meanwhile: a client that stops reading by not
/// opening windows, which never blocks a socket write (what `send_timeout`
/// times on HTTP/1). Looked at once per period, as [`h2_idle`]; a client
/// that keeps reading one stream keeps the connection.
async fn h2_stalled(activity: &Activity, send_timeout: Duration) {
    let period = send_timeout.max(Duration::from_millis(100));
    let mut sent = activity.chunks_sent();
    let mut waiting = false;
    loop {
        tokio::time::sleep(period).await;
        let now_sent = activity.chunks_sent();
        let now_waiting = activity.awaiting_window() > 0;
        if waiting && now_waiting && now_sent == sent {
            return;
        }
        sent = now_sent;
        waiting = now_waiting;
    }
}

type Http1Io = ClientIo<crate::io::SendTimeout<Lingering>>;

/// How a stretch of an HTTP/1 connection ended.
enum Stretch {
    /// The connection is over (closed, upgraded, failed or drained).
    Ended(Result<(), hyper::Error>),
    /// It has been quiet for [`PARK_AFTER`]: time to release its buffers.
    Quiet,
}

/// Serves an HTTP/1 connection, parking it while it is idle between
/// requests (see [`crate::park`]): a parked connection holds its socket and
/// its service, not hyper's buffers. The wait for the next request is
/// bounded by the smaller of `client_header_timeout` and
/// `keepalive_timeout`, parked or not (a parked connection may get up to one
/// quiet period, 250 ms, beyond it: the park is noticed that late).
#[allow(clippy::manual_async_fn)] // see serve_connection
fn serve_http1<'a, S>(
    mut io: Http1Io,
    mut service: S,
    activity: Arc<Activity>,
    plane: &'a DataPlane,
    protocols: &'a Protocols,
    mut drain: crate::drain::Watch,
) -> impl Future<Output = Result<(), hyper::Error>> + Send + 'a
where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Tracked<ResponseBody>>,
            Error = Infallible,
        > + Unpin
        + Send
        + 'a,
    S::Future: Send + 'static,
{
    async move {
        let idle_limit = plane.header_timeout.min(plane.keepalive_timeout);
        let mut quiet_timer = std::pin::pin!(tokio::time::sleep(PARK_AFTER));
        let head_timer = std::pin::pin!(tokio::time::sleep(idle_limit));
        let mut head_wait = HeadWait::new(head_timer, idle_limit);
        loop {
            // Everything hyper held dies with this block, before the wait.
            let resumed = {
                // One expression: a named unboxed connection would keep its
                // room in this task across the await below.
                let mut conn = Box::new(
                    protocols
                        .http1
                        .serve_connection(TokioIo::new(io), service)
                        .with_upgrades(),
                );
                let driven = Box::pin(drive_http1(
                    &mut conn,
                    &activity,
                    quiet_timer.as_mut(),
                    &mut head_wait,
                    &mut drain,
                ))
                .await;
                match driven {
                    Stretch::Ended(result) => {
                        if result.is_err() {
                            // hyper may have answered a bad head (400, 431)
                            // with more of the request unread.
                            activity.set_linger();
                        }
                        return result;
                    }
                    Stretch::Quiet => {}
                }
                // Upgraded connections never come back here: they are not quiet.
                let Some(parts) = conn.into_parts() else {
                    return Ok(());
                };
                io = parts.io.into_inner();
                service = parts.service;
                // An empty `read_buf` still pins hyper's whole read buffer.
                if parts.read_buf.is_empty() {
                    false
                } else {
                    io.resume_with(parts.read_buf);
                    true
                }
            };
            if resumed {
                // Part of the next request had arrived: go on serving it.
                continue;
            }
            tracing::trace!("keep-alive connection parked");
            let wait = idle_limit.saturating_sub(PARK_AFTER);
            quiet_timer.as_mut().reset(plugins::clock::now() + wait);
            let Some(socket) = io.get_ref().get_ref().get_ref() else {
                return Ok(());
            };
            tokio::select! {
                readable = socket.readable() => if readable.is_err() { return Ok(()) },
                // keepalive_timeout is over: close.
                _ = quiet_timer.as_mut() => return Ok(()),
                _ = drain.signalled() => return Ok(()),
            }
        }
    }
}

type Http1Conn<S> = hyper::server::conn::http1::UpgradeableConnection<TokioIo<Http1Io>, S>;

/// Drives `conn` until it ends, or until it has been quiet for
/// [`PARK_AFTER`]. A drain signal makes it finish the request in hand and
/// close; a draining connection is never parked.
async fn drive_http1<S>(
    conn: &mut Box<Http1Conn<S>>,
    activity: &Activity,
    mut quiet_timer: std::pin::Pin<&mut tokio::time::Sleep>,
    head_wait: &mut HeadWait<'_>,
    drain: &mut crate::drain::Watch,
) -> Stretch
where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Tracked<ResponseBody>>,
            Error = Infallible,
        > + Unpin,
{
    let mut draining = drain.is_signalled();
    if draining {
        std::pin::Pin::new(&mut **conn).graceful_shutdown();
    }
    // The request count when the quiet timer was last armed. The timer is
    // not re-armed per request (a clock read and a timer update each): when
    // it fires after requests came and went, it is armed once more, so a
    // connection parks between one and two quiet periods after its last
    // request.
    let mut armed_for = None;
    head_wait.restart();
    loop {
        let drive = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = std::pin::Pin::new(&mut **conn).poll(cx) {
                return Poll::Ready(Stretch::Ended(result));
            }
            if head_wait.poll_expired(activity, cx).is_ready() {
                tracing::debug!(
                    "no request head within client_header_timeout/keepalive_timeout: closed"
                );
                return Poll::Ready(Stretch::Ended(Ok(())));
            }
            if draining || !activity.is_quiet() {
                return Poll::Pending;
            }
            let begun = activity.begun();
            loop {
                if let Some(at) = armed_for {
                    if quiet_timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    if at == begun {
                        return Poll::Ready(Stretch::Quiet);
                    }
                }
                quiet_timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + PARK_AFTER);
                armed_for = Some(begun);
            }
        });
        tokio::select! {
            biased;
            stretch = drive => return stretch,
            // Waited on only while the connection is quiet: see
            // `signalled_while`.
            _ = drain.signalled_while(|| activity.is_quiet()), if !draining => {
                draining = true;
                std::pin::Pin::new(&mut **conn).graceful_shutdown();
            }
        }
    }
}

/// The per-request service of one connection.
fn service_of(
    plane: Arc<DataPlane>,
    client: ClientConn,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Tracked<ResponseBody>>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
       + Unpin {
    let client = Arc::new(client);
    hyper::service::service_fn(move |req| handle(plane.clone(), client.clone(), req))
}

/// Serves HTTPS on `listener` until `shutdown` flips to true: the same
/// service, limits and connection cap as the plain listener, behind a TLS
/// handshake (see [`crate::tls_edge`]); ALPN picks HTTP/2 or HTTP/1.1.
pub async fn serve_tls(
    listener: TcpListener,
    plane: DataPlane,
    edge: Arc<TlsEdge>,
    shutdown: watch::Receiver<bool>,
    drain: Arc<Drain>,
) {
    let protocols = Arc::new(Protocols::new(&plane));
    let plane = Arc::new(plane);
    let mut stop = std::pin::pin!(stop_signal(shutdown));
    while let Some((stream, peer)) = next_client(&listener, stop.as_mut()).await {
        CONNECTIONS.accepted();
        let Ok(permit) = plane.connections.clone().try_acquire_owned() else {
            // Over the cap: closed before any handshake work.
            if let Some(held) = SHED_LOG.allow() {
                tracing::warn!(
                    more_since_last_line = held,
                    "connection limit reached; HTTPS connection shed"
                );
            }
            continue;
        };
        let local = local_of(&stream, &listener);
        tokio::spawn(plugins::clock::Fresh::new(serve_tls_connection(
            stream,
            peer,
            local,
            plane.clone(),
            edge.clone(),
            protocols.clone(),
            drain.watcher(),
            permit,
        )));
    }
}

/// One HTTPS connection: handshake (bounded by `client_header_timeout`),
/// then HTTP/2 or HTTP/1.1 as ALPN settled.
#[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
fn serve_tls_connection(
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    plane: Arc<DataPlane>,
    edge: Arc<TlsEdge>,
    protocols: Arc<Protocols>,
    mut drain: crate::drain::Watch,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send {
    async move {
        let _permit = &permit;
        let activity = Arc::new(Activity::default());
        let _counted = CONNECTIONS.handled(activity.clone());
        let stream = Lingering::new(stream, activity.clone());
        let handshake = Box::pin(async {
            tokio::select! {
                done = edge.accept(stream, &plane.live) => Some(done),
                _ = drain.signalled() => None,
            }
        })
        .await;
        let (tls, info) = match handshake {
            Some(Ok(done)) => done,
            Some(Err(e)) => {
                if let Some(held) = HANDSHAKE_LOG.allow() {
                    tracing::info!(%peer, error = %e, more_since_last_line = held, "TLS handshake failed");
                }
                return;
            }
            None => return,
        };
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let mut client = ClientConn {
            peer,
            local,
            framing: None,
            activity,
            tls: Some(info),
            transparent: false,
        };
        let stream = crate::io::SendTimeout::new(tls, plane.send_timeout);
        let linger_after = client.activity.clone();
        // Each connection is boxed and kept until the linger flag is set
        // after an error (hyper may have answered a bad head with more of
        // the request unread): dropping it closes the socket.
        let ended = if h2 {
            let service = service_of(plane.clone(), client);
            let mut conn = Box::pin(
                protocols
                    .http2
                    .serve_connection(TokioIo::new(stream), service),
            );
            let ended = serve_http2(conn.as_mut(), &linger_after, &plane, drain).await;
            if ended.is_err() {
                linger_after.set_linger();
            }
            ended
        } else {
            let io = client.framed(stream);
            let service = service_of(plane, client);
            let mut conn = Box::pin(
                protocols
                    .http1_tls
                    .serve_connection(TokioIo::new(io), service)
                    .with_upgrades(),
            );
            let ended = drain.serve(conn.as_mut()).await;
            if ended.is_err() {
                linger_after.set_linger();
            }
            ended
        };
        if let Err(e) = ended {
            tracing::debug!(%peer, error = %e, "HTTPS connection ended with an error");
        }
    }
}

/// Answers 503 and closes, without reading the request.
fn shed(stream: TcpStream) {
    const BUSY: &[u8] = b"HTTP/1.1 503 Service Temporarily Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let _ = stream.try_write(BUSY);
    if let Some(held) = SHED_LOG.allow() {
        tracing::warn!(
            more_since_last_line = held,
            "connection limit reached; connection shed"
        );
    }
}

/// Shed connections are logged at most once a second.
static SHED_LOG: crate::error_log::Throttle = crate::error_log::Throttle::new();

/// Failed TLS handshakes (a client's doing) are logged at most once a
/// second.
static HANDSHAKE_LOG: crate::error_log::Throttle = crate::error_log::Throttle::new();

/// Serves the Admin API until `shutdown` flips to true; connections then
/// finish their request in hand (see [`Drain`]).
///
/// Every Admin API connection closes lingering (see [`crate::linger`]): an
/// answer given before a body was read (413, 401) reaches the client.
pub async fn serve_admin(
    listener: TcpListener,
    app: axum::Router,
    shutdown: watch::Receiver<bool>,
    drain: Arc<Drain>,
) {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(crate::config::DEFAULT_CLIENT_HEADER_TIMEOUT);
    let mut stop = std::pin::pin!(stop_signal(shutdown));
    while let Some((stream, peer)) = next_client(&listener, stop.as_mut()).await {
        let activity = Arc::new(Activity::default());
        activity.set_linger();
        let io = TokioIo::new(Lingering::new(stream, activity));
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            app.clone().oneshot(req)
        });
        let conn = http1.serve_connection(io, service);
        let watch = drain.watcher();
        tokio::spawn(async move {
            if let Err(e) = watch.serve(conn).await {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugins::cidr::IpSet;

    fn rip(recursive: bool) -> RealIp {
        RealIp {
            trusted: IpSet::from_entries(&["10.0.0.0/8"]).unwrap(),
            trusted_nets: vec!["10.0.0.0/8".parse().unwrap()],
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
