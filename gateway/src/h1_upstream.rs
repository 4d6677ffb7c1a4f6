//! HTTP/1.1 keep-alive connections to the nodes of `http` and `https`
//! upstreams, pooled per node as nginx's `keepalive` does.
//!
//! - A request takes the most recently used idle connection to its node
//!   that is ready for another request, or makes a new one (TCP within the
//!   `connect` timeout, then TLS for `https` with the node's or
//!   `upstream_host`'s name).
//! - A connection goes back to the pool once its answer has been read to
//!   the end ([`Lease`] rides along with the answer's body); an answer that
//!   is abandoned midway takes its connection down with it.
//! - `keepalive_pool.size` idle connections are kept per node, for
//!   `keepalive_pool.idle_timeout`; a connection is closed after it has
//!   carried `keepalive_pool.requests` requests. A sweeper drops idle ones
//!   that time out while nobody asks for them.
//! - A pooled connection the node closed just as a request was handed to it
//!   is detected by hyper before anything is written; the request then goes
//!   out once more on a new connection.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use tokio::time::Instant;

use crate::connector::{self, ConnectError};

use crate::body::ProxyBody;
use http_body_util::Either;

/// Which connections a request may use: same node, same TLS name. Built
/// once per node when the upstream is compiled; cheap to clone.
///
/// Taking and returning a connection looks the key up twice per request,
/// so its hash is computed once here: `Authority`'s own `Hash` and `Eq`
/// fold case byte by byte, which cost more than the rest of the lookup.
/// Keys come from compiled configuration, so they are compared as written.
#[derive(Debug, Clone)]
pub struct NodeKey {
    node: Authority,
    /// `Some(server name)` for TLS.
    tls: Option<Arc<str>>,
    /// The address connections come from, when not the gateway's own (a
    /// client's, under `tproxy.source: client`): pooled connections are
    /// reused for that client address only.
    source: Option<IpAddr>,
    hash: u64,
}

impl NodeKey {
    pub fn new(node: Authority, tls_name: Option<&str>) -> Self {
        let tls: Option<Arc<str>> = tls_name.map(Arc::from);
        Self::hashed(node, tls, None)
    }

    /// This node's key for connections from `source`.
    pub fn from_source(&self, source: IpAddr) -> Self {
        Self::hashed(self.node.clone(), self.tls.clone(), Some(source))
    }

    fn hashed(node: Authority, tls: Option<Arc<str>>, source: Option<IpAddr>) -> Self {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(node.as_str().as_bytes(), &mut h);
        std::hash::Hash::hash(&tls, &mut h);
        std::hash::Hash::hash(&source, &mut h);
        NodeKey {
            node,
            tls,
            source,
            hash: std::hash::Hasher::finish(&h),
        }
    }
}

impl PartialEq for NodeKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
            && self.node.as_str() == other.node.as_str()
            && self.tls == other.tls
            && self.source == other.source
    }
}

impl Eq for NodeKey {}

impl std::hash::Hash for NodeKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

struct Idle {
    sender: SendRequest<ProxyBody>,
    requests: u32,
    since: Instant,
    /// The worker whose runtime drives the connection (see `workers`):
    /// only it is lent the connection again.
    worker: u16,
}

/// The pool's settings and idle connections.
struct Shared {
    tls: Arc<ClientConfig>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    idle: Mutex<HashMap<NodeKey, Vec<Idle>>>,
}

/// Keep-alive HTTP/1.1 connections of one connect timeout, TLS setting and
/// pool shape.
#[derive(Clone)]
pub struct H1Pool(Arc<Shared>);

/// A pool held without keeping it alive.
pub struct WeakH1Pool(Weak<Shared>);

impl WeakH1Pool {
    pub fn upgrade(&self) -> Option<H1Pool> {
        self.0.upgrade().map(H1Pool)
    }
}

/// A connection lent to one request; give it back with [`Lease::release`]
/// (or let the answer's body do it) once the answer has been read.
pub struct Lease {
    pool: Weak<Shared>,
    key: NodeKey,
    sender: SendRequest<ProxyBody>,
    /// Requests this connection has carried, this one included.
    requests: u32,
    max_requests: u32,
}

impl Lease {
    /// Returns the connection to the pool, unless it has carried its share
    /// or is closed; then it is dropped, which closes it.
    pub fn release(self) {
        if self.requests >= self.max_requests || self.sender.is_closed() {
            return;
        }
        let Some(shared) = self.pool.upgrade() else {
            return;
        };
        if shared.max_idle == 0 {
            return;
        }
        let mut idle = shared.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(self.key).or_default();
        if list.len() >= shared.max_idle {
            list.retain(|e| !e.sender.is_closed());
        }
        if list.len() >= shared.max_idle {
            // Full: the longest idle one makes room.
            list.remove(0);
        }
        list.push(Idle {
            sender: self.sender,
            requests: self.requests,
            since: Instant::now(),
            worker: crate::workers::current(),
        });
    }
}

impl H1Pool {
    pub fn downgrade(&self) -> WeakH1Pool {
        WeakH1Pool(Arc::downgrade(&self.0))
    }

    /// Whether both handles are the same pool.
    pub fn same_pool(&self, other: &H1Pool) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// A pool verifying TLS with `tls`, which must offer ALPN `http/1.1`
    /// or nothing; its idle sweeper runs on `runtime` (or the current one).
    pub fn new(
        tls: ClientConfig,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
        runtime: Option<&tokio::runtime::Handle>,
    ) -> Self {
        let shared = Arc::new(Shared {
            tls: Arc::new(tls),
            connect_timeout,
            idle_timeout,
            max_idle,
            idle: Mutex::new(HashMap::new()),
        });
        let runtime = runtime
            .cloned()
            .or_else(|| tokio::runtime::Handle::try_current().ok());
        if let Some(rt) = runtime {
            rt.spawn(sweep(Arc::downgrade(&shared)));
        }
        H1Pool(shared)
    }

    /// Sends `req` to the node of `key` (with TLS when it names a server), on a pooled
    /// connection or a new one. `on_connection(true)` is called when the
    /// request has a connection, `(false)` when it has to connect again.
    /// The error says whether connecting failed. The lease goes with the
    /// answer; release it once its body is read.
    ///
    /// A function returning an `async move` block, so that the request is
    /// held once in the future (an `async fn` keeps its arguments twice).
    #[allow(clippy::manual_async_fn)]
    pub fn send<'a>(
        &'a self,
        key: &'a NodeKey,
        max_requests: u32,
        mut req: Request<ProxyBody>,
        on_connection: impl Fn(bool) + Send + 'a,
    ) -> impl std::future::Future<Output = Result<(Response<Incoming>, Lease), SendFailure>> + Send + 'a
    {
        async move {
            if let Some((mut lease, idle_for)) = self.take_idle(key, max_requests) {
                on_connection(true);
                // A connection idle for a while may be closed by the node just
                // as the request goes out; keep a copy of a request that can
                // safely go out twice (as nginx resends on a cached connection).
                let spare = if idle_for >= RESEND_AFTER_IDLE {
                    resendable_copy(&req)
                } else {
                    None
                };
                match lease.sender.try_send_request(req).await {
                    Ok(resp) => return Ok((resp, lease)),
                    Err(mut e) => match (e.take_message(), spare) {
                        // Closed by the node before the request was written:
                        // safe to send again on a new connection, which is
                        // connecting time again.
                        (Some(unsent), _) => {
                            on_connection(false);
                            req = unsent;
                        }
                        (None, Some(copy)) if closed_by_node(e.error()) => {
                            on_connection(false);
                            req = copy;
                        }
                        (None, _) => return Err(SendFailure::Request(e.into_error())),
                    },
                }
            }
            // Boxed: connecting is the rare path, and its state would otherwise
            // make every proxied request's future (and each copy of it) larger.
            let mut lease = Box::pin(self.connect(key.clone(), max_requests))
                .await
                .map_err(SendFailure::Connect)?;
            on_connection(true);
            let resp = lease
                .sender
                .send_request(req)
                .await
                .map_err(SendFailure::Request)?;
            Ok((resp, lease))
        }
    }

    /// The newest idle connection to `key` that is ready, and how long it
    /// was idle; closed, timed-out and served-out ones met on the way are
    /// dropped.
    fn take_idle(&self, key: &NodeKey, max_requests: u32) -> Option<(Lease, Duration)> {
        let shared = &self.0;
        let mut idle = shared.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        let worker = crate::workers::current();
        let now = Instant::now();
        let mut i = list.len();
        while i > 0 {
            i -= 1;
            let entry = &list[i];
            let stale = entry.sender.is_closed()
                || now.saturating_duration_since(entry.since) >= shared.idle_timeout
                || entry.requests >= max_requests;
            // `remove`, not `swap_remove`: the list stays oldest-first.
            if stale {
                list.remove(i);
                continue;
            }
            if entry.worker == worker && entry.sender.is_ready() {
                let entry = list.remove(i);
                let lease = Lease {
                    pool: Arc::downgrade(shared),
                    key: key.clone(),
                    sender: entry.sender,
                    requests: entry.requests + 1,
                    max_requests,
                };
                return Some((lease, now.saturating_duration_since(entry.since)));
            }
        }
        None
    }

    async fn connect(&self, key: NodeKey, max_requests: u32) -> Result<Lease, ConnectError> {
        let shared = &self.0;
        let timeout = shared.connect_timeout;
        let sender = tokio::time::timeout(timeout, self.handshake(&key))
            .await
            .map_err(|_| ConnectError::TimedOut(timeout))??;
        Ok(Lease {
            pool: Arc::downgrade(shared),
            key,
            sender,
            requests: 1,
            max_requests,
        })
    }

    async fn handshake(&self, key: &NodeKey) -> Result<SendRequest<ProxyBody>, ConnectError> {
        let tls = key.tls.as_deref().map(|name| (&self.0.tls, name));
        let io = connector::dial(&key.node, tls, key.source).await?;
        let (sender, conn) = http1::Builder::new().handshake(TokioIo::new(io)).await?;
        tokio::spawn(drive(key.node.clone(), conn.with_upgrades()));
        Ok(sender)
    }
}

/// An answer's body that gives its connection back to the pool when it
/// ends; dropped or failed early, it closes the connection instead.
pub struct Leased<B> {
    inner: B,
    lease: Option<Lease>,
}

impl<B> Leased<B> {
    pub fn new(inner: B, lease: Lease) -> Self {
        Leased {
            inner,
            lease: Some(lease),
        }
    }
}

impl<B: Body + Unpin> Body for Leased<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        let ended = match &poll {
            Poll::Ready(None) => true,
            // hyper stops polling after trailers: they end the answer too.
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers() || this.inner.is_end_stream(),
            Poll::Ready(Some(Err(_))) => {
                this.lease = None;
                false
            }
            Poll::Pending => false,
        };
        if ended {
            if let Some(lease) = this.lease.take() {
                lease.release();
            }
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Idle time after which a reused connection's request is kept for a
/// resend, should the node turn out to have closed the connection.
pub const RESEND_AFTER_IDLE: Duration = Duration::from_secs(1);

/// A copy of `req` if it may be sent twice: an idempotent method and a body
/// already in memory.
fn resendable_copy(req: &Request<ProxyBody>) -> Option<Request<ProxyBody>> {
    let Either::Left(body) = req.body() else {
        return None;
    };
    if !req.method().is_idempotent() {
        return None;
    }
    let mut copy = Request::new(Either::Left(body.clone()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// The node closed or reset the connection before any answer came.
fn closed_by_node(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            );
        }
        source = err.source();
    }
    false
}

/// Why a try got no answer.
#[derive(Debug)]
pub enum SendFailure {
    /// No connection could be made.
    Connect(ConnectError),
    /// The request failed on its connection.
    Request(hyper::Error),
}

/// Drives one connection until it ends.
async fn drive<F: std::future::Future<Output = Result<(), hyper::Error>>>(
    node: Authority,
    conn: F,
) {
    if let Err(e) = conn.await {
        tracing::debug!(%node, error = %e, "upstream connection ended");
    }
}

/// Drops idle connections that have timed out, until the pool is gone.
async fn sweep(pool: Weak<Shared>) {
    loop {
        let period = match pool.upgrade() {
            Some(shared) => {
                let mut idle = shared.idle.lock().unwrap_or_else(|p| p.into_inner());
                idle.retain(|_, list| {
                    list.retain(|e| {
                        !e.sender.is_closed() && e.since.elapsed() < shared.idle_timeout
                    });
                    !list.is_empty()
                });
                // A quarter of the timeout: nothing outlives it by more.
                (shared.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(15))
            }
            None => return,
        };
        tokio::time::sleep(period).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Either, Full};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An HTTP/1.1 server counting its connections.
    async fn node() -> (Authority, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let counter = conns.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr.to_string().parse().unwrap(), conns)
    }

    fn pool(idle_timeout: Duration) -> H1Pool {
        let tls = crate::tls::client_config(Arc::new(rustls::RootCertStore::empty()), true, None);
        H1Pool::new(tls, Duration::from_secs(1), idle_timeout, 4, None)
    }

    fn request(node: &Authority) -> Request<ProxyBody> {
        Request::get(format!("http://{node}/"))
            .body(Either::Left(Full::new(Bytes::new())))
            .unwrap()
    }

    async fn exchange(pool: &H1Pool, node: &Authority, max_requests: u32) {
        let (resp, lease) = pool
            .send(
                &NodeKey::new(node.clone(), None),
                max_requests,
                request(node),
                |_| {},
            )
            .await
            .unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        lease.release();
        // The connection turns ready once hyper has seen the body's end.
        tokio::task::yield_now().await;
    }

    #[tokio::test]
    async fn connections_are_reused_and_retired_after_max_requests() {
        let (node, conns) = node().await;
        let p = pool(Duration::from_secs(60));
        for _ in 0..6 {
            exchange(&p, &node, 1000).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1, "one kept-alive connection");
        let (node, conns) = self::node().await;
        for _ in 0..6 {
            exchange(&p, &node, 2).await;
        }
        assert_eq!(
            conns.load(Ordering::SeqCst),
            3,
            "a new one every 2 requests"
        );
    }

    #[tokio::test]
    async fn idle_connections_time_out() {
        let (node, conns) = node().await;
        let p = pool(Duration::from_millis(100));
        exchange(&p, &node, 1000).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
        exchange(&p, &node, 1000).await;
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_unreleased_lease_is_not_reused() {
        let (node, conns) = node().await;
        let p = pool(Duration::from_secs(60));
        let (_resp, lease) = p
            .send(
                &NodeKey::new(node.clone(), None),
                1000,
                request(&node),
                |_| {},
            )
            .await
            .unwrap();
        drop(lease);
        exchange(&p, &node, 1000).await;
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_node_is_a_connect_failure() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let node: Authority = l.local_addr().unwrap().to_string().parse().unwrap();
        drop(l);
        let failure = pool(Duration::from_secs(60))
            .send(
                &NodeKey::new(node.clone(), None),
                10,
                request(&node),
                |_| {},
            )
            .await;
        assert!(matches!(
            failure,
            Err(SendFailure::Connect(ConnectError::Io(_)))
        ));
    }

    fn idle_count(p: &H1Pool) -> usize {
        p.0.idle.lock().unwrap().values().map(Vec::len).sum()
    }

    /// A body ending in trailers gives its connection back: hyper stops
    /// polling after the trailers, so they count as the end.
    #[tokio::test]
    async fn a_body_ending_in_trailers_releases_its_connection() {
        let (node, _) = node().await;
        let p = pool(Duration::from_secs(60));
        let (resp, lease) = p
            .send(
                &NodeKey::new(node.clone(), None),
                1000,
                request(&node),
                |_| {},
            )
            .await
            .unwrap();
        let _ = resp.into_body().collect().await;
        let frames = futures_util::stream::iter([
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"x"))),
            Ok(Frame::trailers(http::HeaderMap::new())),
        ]);
        let mut body = Leased::new(http_body_util::StreamBody::new(frames), lease);
        assert!(body.frame().await.is_some());
        assert_eq!(idle_count(&p), 0);
        assert!(body.frame().await.is_some(), "the trailers");
        assert_eq!(idle_count(&p), 1);
    }

    /// A node that answers the first request of each connection and, for
    /// any later one, reads it and hangs up without answering.
    async fn one_shot_node() -> (Authority, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let counter = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    if s.read(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                    let _ = s.read(&mut buf).await;
                });
            }
        });
        (addr.to_string().parse().unwrap(), conns)
    }

    #[tokio::test]
    async fn a_get_cut_off_on_a_long_idle_connection_is_sent_again() {
        let (node, conns) = one_shot_node().await;
        let p = pool(Duration::from_secs(60));
        exchange(&p, &node, 1000).await;
        tokio::time::sleep(RESEND_AFTER_IDLE + Duration::from_millis(100)).await;
        exchange(&p, &node, 1000).await;
        assert_eq!(
            conns.load(Ordering::SeqCst),
            2,
            "sent again on a new connection"
        );

        // A POST is not sent twice.
        tokio::time::sleep(RESEND_AFTER_IDLE + Duration::from_millis(100)).await;
        let post = Request::post(format!("http://{node}/"))
            .body(Either::Left(Full::new(Bytes::from_static(b"once"))))
            .unwrap();
        let failure = p
            .send(&NodeKey::new(node.clone(), None), 1000, post, |_| {})
            .await;
        assert!(matches!(failure, Err(SendFailure::Request(_))));
    }
}
