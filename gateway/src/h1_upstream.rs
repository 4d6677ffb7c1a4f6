//! HTTP/1.1 keep-alive connections to the nodes of `http` and `https`
//! upstreams, pooled per node as nginx's `keepalive` does, and the
//! exchange of one request on them (the wire format is [`crate::h1_codec`]).
//!
//! - A request takes the most recently used idle connection to its node
//!   that is fit for another request, or makes a new one (TCP within the
//!   `connect` timeout, then TLS for `https` with the node's or
//!   `upstream_host`'s name).
//! - The request is written and the answer's head read by the request's
//!   own task: no task per connection and no channel between them. The
//!   task yields once before writing, so that the requests the runtime has
//!   ready go out in one batch, and steps back once more after the head is
//!   read, so that the answers do too (see `Outgoing::exchange`).
//! - A connection goes back to the pool once its answer has been read to
//!   the end (the answer's [`H1Body`] gives it back); an answer that is
//!   abandoned midway takes its connection down with it.
//! - `keepalive_pool.size` idle connections are kept per node and worker
//!   (nginx's `keepalive` counts per worker process too), for
//!   `keepalive_pool.idle_timeout`; a connection is closed after it has
//!   carried `keepalive_pool.requests` requests. A sweeper drops idle ones
//!   that time out or that the node closed while nobody asked for them.
//! - An idle connection the node has closed is seen before it is lent out
//!   (the reactor already knows); one the node closes just as the request
//!   goes out fails before any answer, and the request is then sent once
//!   more on a new connection if it may be sent twice (idempotent, body in
//!   memory), as nginx does.
//! - A node that answers and closes before it has taken a streamed body
//!   (a 413, say) has that answer passed on; the connection is not reused.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full};
use plugins::BoxError;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::body::{ClientBody, ProxyBody};
use crate::connector::{self, ConnectError, Stream};
use crate::h1_codec::{
    self, AnswerFraming, AnswerHead, ChunkedDecoder, Decoded, Invalid, RequestFraming,
};
use crate::headers::Forwarded;
use crate::phases::SendWatch;

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

/// Space reserved in a connection's read buffer before each read.
const READ_CHUNK: usize = 8 * 1024;
/// A body in memory up to this size goes out in one write with its head.
const INLINE_BODY: usize = 16 * 1024;
/// A connection's write buffer is kept for its next request up to this size.
const KEEP_WRITE_BUFFER: usize = 16 * 1024;

/// One connection to a node.
struct Conn {
    io: Box<dyn Stream>,
    /// Bytes read from the node and not used yet.
    rbuf: BytesMut,
    /// Kept between requests so that writing a head allocates nothing.
    wbuf: Vec<u8>,
}

impl Conn {
    fn new(io: Box<dyn Stream>) -> Self {
        Conn {
            io,
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
        }
    }

    /// Whether an idle connection is unfit for a request: the node closed
    /// or broke it, or sent something nobody asked for. No system call
    /// while nothing happened on it (the reactor's readiness tells).
    fn is_stale(&mut self) -> bool {
        if !self.rbuf.is_empty() {
            return true;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        !matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut buf),
            Poll::Pending
        )
    }
}

struct Idle {
    conn: Conn,
    requests: u32,
    since: Instant,
    /// The worker whose runtime's reactor the connection is registered
    /// with (see `workers`): only it is lent the connection again.
    worker: u16,
}

/// The idle connections to one node kept for one worker, oldest first.
#[derive(Default)]
struct NodeIdle(Mutex<Vec<Idle>>);

/// One worker's idle connections, node by node. Each worker has its own, on
/// cache lines of its own: taking a connection and giving it back touch
/// only memory of the worker's core (one shared map cost every request of
/// two workers a lock and reference counts bouncing between cores).
#[derive(Default)]
#[repr(align(128))]
struct WorkerIdle(Mutex<HashMap<NodeKey, Arc<NodeIdle>>>);

/// The pool's settings and idle connections.
struct Shared {
    tls: Arc<ClientConfig>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    /// By worker (see `workers::slot`); workers that share a slot tell
    /// their connections apart by the number each carries.
    idle: Box<[WorkerIdle]>,
}

impl Shared {
    /// The calling worker's idle list for `key`, made when missing.
    fn node_idle(&self, key: &NodeKey) -> Arc<NodeIdle> {
        let slot = crate::workers::slot(self.idle.len());
        let mut nodes = self.idle[slot].0.lock().unwrap_or_else(|p| p.into_inner());
        match nodes.get(key) {
            Some(node) => node.clone(),
            None => nodes.entry(key.clone()).or_default().clone(),
        }
    }
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

/// A connection lent to one request, given back by [`Lease::release`] once
/// its answer has been read to the end.
///
/// It holds its node's idle list rather than the pool: when the pool has
/// gone (no compiled route uses it any more), the list is the lease's
/// alone, and the connection given back to it closes with the lease.
struct Lease {
    node: Arc<NodeIdle>,
    max_idle: usize,
    conn: Conn,
    /// Requests this connection has carried, this one included.
    requests: u32,
    max_requests: u32,
}

impl Lease {
    /// Returns the connection to the pool, unless it has carried its share
    /// or holds bytes past the answer; then it is dropped, which closes it.
    fn release(mut self) {
        if self.requests >= self.max_requests || !self.conn.rbuf.is_empty() || self.max_idle == 0 {
            return;
        }
        if self.conn.wbuf.capacity() > KEEP_WRITE_BUFFER {
            self.conn.wbuf = Vec::new();
        }
        let mut list = self.node.0.lock().unwrap_or_else(|p| p.into_inner());
        if list.len() >= self.max_idle {
            list.retain_mut(|e| !e.conn.is_stale());
        }
        if list.len() >= self.max_idle {
            // Full: the longest idle one makes room.
            list.remove(0);
        }
        list.push(Idle {
            conn: self.conn,
            requests: self.requests,
            since: plugins::clock::now(),
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
            idle: (0..crate::workers::slots())
                .map(|_| WorkerIdle::default())
                .collect(),
        });
        let runtime = runtime
            .cloned()
            .or_else(|| tokio::runtime::Handle::try_current().ok());
        if let Some(rt) = runtime {
            rt.spawn(sweep(Arc::downgrade(&shared)));
        }
        H1Pool(shared)
    }

    /// Sends `req` to the node of `key` (with TLS when it names a server),
    /// on a pooled connection or a new one, and reads the answer's head.
    /// `on_connection(true)` is called when the request has a connection,
    /// `(false)` when it has to connect again. The error says whether
    /// connecting failed. The connection goes back to the pool when the
    /// answer's body has been read to its end.
    ///
    /// A function returning an `async move` block, so that the request is
    /// held once in the future (an `async fn` keeps its arguments twice).
    #[allow(clippy::manual_async_fn)]
    pub fn send<'a>(
        &'a self,
        key: &'a NodeKey,
        max_requests: u32,
        req: H1Request<'a>,
        on_connection: impl Fn(bool) + Send + 'a,
    ) -> impl std::future::Future<Output = Result<Response<H1Body>, SendFailure>> + Send + 'a {
        async move {
            let mut out = Outgoing::new(req);
            let node = self.0.node_idle(key);
            if let Some(mut lease) = self.take_idle(&node, max_requests) {
                on_connection(true);
                match out.exchange(&mut lease.conn).await {
                    Ok(head) => return out.answer(lease, head),
                    // The node closed the pooled connection before answering
                    // (as it may at the end of its keep-alive time): a request
                    // that may go out twice and is whole in memory is sent
                    // again on a new connection, as nginx does.
                    Err(H1Error::Closed) if out.resendable() => on_connection(false),
                    Err(e) => return Err(SendFailure::Request(e)),
                }
            }
            // Boxed: connecting is the rare path, and its state would otherwise
            // make every proxied request's future (and each copy of it) larger.
            let mut lease = Box::pin(self.connect(key, node, max_requests))
                .await
                .map_err(SendFailure::Connect)?;
            on_connection(true);
            match out.exchange(&mut lease.conn).await {
                Ok(head) => out.answer(lease, head),
                Err(e) => Err(SendFailure::Request(e)),
            }
        }
    }

    /// The newest idle connection of `node` that is fit for a request;
    /// stale, timed-out and served-out ones met on the way are dropped.
    fn take_idle(&self, node: &Arc<NodeIdle>, max_requests: u32) -> Option<Lease> {
        let mut list = node.0.lock().unwrap_or_else(|p| p.into_inner());
        let worker = crate::workers::current();
        let now = plugins::clock::now();
        let mut i = list.len();
        while i > 0 {
            i -= 1;
            let entry = &mut list[i];
            if entry.worker != worker {
                continue;
            }
            let stale = now.saturating_duration_since(entry.since) >= self.0.idle_timeout
                || entry.requests >= max_requests
                || entry.conn.is_stale();
            // `remove`, not `swap_remove`: the list stays oldest-first.
            let entry = list.remove(i);
            if stale {
                continue;
            }
            return Some(Lease {
                node: node.clone(),
                max_idle: self.0.max_idle,
                conn: entry.conn,
                requests: entry.requests + 1,
                max_requests,
            });
        }
        None
    }

    /// A new connection to the node of `key`, lent at once; it goes back to
    /// `node` afterwards.
    async fn connect(
        &self,
        key: &NodeKey,
        node: Arc<NodeIdle>,
        max_requests: u32,
    ) -> Result<Lease, ConnectError> {
        let shared = &self.0;
        let timeout = shared.connect_timeout;
        let tls = key.tls.as_deref().map(|name| (&shared.tls, name));
        let io = tokio::time::timeout(timeout, connector::dial(&key.node, tls, key.source))
            .await
            .map_err(|_| ConnectError::TimedOut(timeout))??;
        Ok(Lease {
            node,
            max_idle: shared.max_idle,
            conn: Conn::new(io),
            requests: 1,
            max_requests,
        })
    }
}

/// Why a request got no (usable) answer on its connection.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    /// Closed or reset by the node before any byte of an answer came.
    #[error("upstream closed the connection before answering")]
    Closed,
    #[error("upstream closed the connection in the middle of its answer")]
    Incomplete,
    #[error("upstream connection: {0}")]
    Io(std::io::Error),
    #[error("upstream answer: {0}")]
    Invalid(#[from] Invalid),
    #[error("request body: {0}")]
    Body(BoxError),
    #[error("request body does not match its Content-Length")]
    BodyLength,
}

impl H1Error {
    /// An I/O error before any answer: the node going away is `Closed`.
    fn before_answer(e: std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        match e.kind() {
            BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof => H1Error::Closed,
            _ => H1Error::Io(e),
        }
    }
}

/// Why a try got no answer.
#[derive(Debug)]
pub enum SendFailure {
    /// No connection could be made.
    Connect(ConnectError),
    /// The request failed on its connection.
    Request(H1Error),
    /// The node's answer head arrived but cannot be passed on (its framing
    /// is ambiguous). The request's headers held the answer's and are gone:
    /// the request is not tried again (nginx does not pass a request to the
    /// next node for an invalid answer either, by default).
    Answer(H1Error),
}

/// A request for a node, as [`H1Pool::send`] takes it.
///
/// Its headers are borrowed, not moved: they stay with the caller for a
/// retry on another node. Once a final answer head has arrived no retry
/// follows, and the answer's headers are read into their map (see
/// [`h1_codec::parse_answer_head`]); the caller's map is left empty then.
pub struct H1Request<'a> {
    pub method: Method,
    /// In origin form; the host goes in the `Host` header.
    pub target: PathAndQuery,
    pub headers: &'a mut HeaderMap,
    /// Written after `headers`.
    pub forwarded: &'a Forwarded,
    pub body: ProxyBody,
}

/// A request on its way out: encoded once, so that a resend writes the same
/// bytes again.
struct Outgoing<'a> {
    method: Method,
    target: PathAndQuery,
    /// The request's headers; the map a final answer's headers are read
    /// into.
    headers: &'a mut HeaderMap,
    forwarded: &'a Forwarded,
    /// How the body goes out, known once the head is encoded.
    framing: RequestFraming,
    body: OutBody,
    /// The head (and a small in-memory body), once encoded.
    wire: Vec<u8>,
    /// The node answered before it took the whole request.
    cut_short: bool,
}

enum OutBody {
    /// In memory, larger than [`INLINE_BODY`] (a smaller one is in `wire`).
    Full(Bytes),
    Inline,
    Stream(SendWatch<ClientBody>),
    /// A streamed body already sent (it cannot be sent again).
    Sent,
}

impl<'a> Outgoing<'a> {
    fn new(req: H1Request<'a>) -> Self {
        let body = match req.body {
            Either::Left(full) => OutBody::Full(full_bytes(full)),
            Either::Right(stream) => OutBody::Stream(stream),
        };
        Outgoing {
            method: req.method,
            target: req.target,
            headers: req.headers,
            forwarded: req.forwarded,
            framing: RequestFraming::None,
            body,
            wire: Vec::new(),
            cut_short: false,
        }
    }

    fn resendable(&self) -> bool {
        self.method.is_idempotent() && matches!(self.body, OutBody::Full(_) | OutBody::Inline)
    }

    /// The request's bytes, encoded into the connection's spare buffer the
    /// first time.
    fn encode(&mut self, conn: &mut Conn) {
        if !self.wire.is_empty() {
            return;
        }
        self.wire = std::mem::take(&mut conn.wbuf);
        self.wire.clear();
        let exact = match &self.body {
            OutBody::Full(b) => Some(b.len() as u64),
            _ => None,
        };
        self.framing = h1_codec::request_framing(&self.method, self.headers, exact);
        h1_codec::encode_request_head(
            &mut self.wire,
            &self.method,
            self.target.as_str(),
            self.headers,
            self.forwarded.iter(),
            self.framing,
        );
        if let OutBody::Full(b) = &self.body {
            if b.len() <= INLINE_BODY {
                self.wire.extend_from_slice(b);
                self.body = OutBody::Inline;
            }
        }
    }

    /// Writes the request on `conn` and reads the answer's head.
    async fn exchange(&mut self, conn: &mut Conn) -> Result<AnswerHead, H1Error> {
        self.encode(conn);
        // The other connections the runtime has ready go first, so that
        // requests to a node leave together: each write to a node that
        // sleeps wakes it, and the waker pays for the wake-up in kernel
        // time (measured: the node woke 0.21 times per request without
        // this, 0.12 with it, as with the task per connection before).
        tokio::task::yield_now().await;
        conn.io
            .write_all(&self.wire)
            .await
            .map_err(H1Error::before_answer)?;
        match &mut self.body {
            OutBody::Full(b) => conn.io.write_all(b).await.map_err(H1Error::before_answer)?,
            OutBody::Stream(_) => {
                let OutBody::Stream(body) = std::mem::replace(&mut self.body, OutBody::Sent) else {
                    return Err(H1Error::BodyLength);
                };
                match write_stream(&mut conn.io, body, self.framing).await {
                    Ok(()) => {}
                    // A node may answer (413, say) and close before taking
                    // the whole body: its answer is passed on, and the
                    // connection, its request unfinished, is not reused.
                    Err(H1Error::Closed) => {
                        self.cut_short = true;
                        return read_head(conn, self.headers)
                            .await
                            .map_err(|_| H1Error::Closed);
                    }
                    Err(e) => return Err(e),
                }
            }
            OutBody::Inline | OutBody::Sent => {}
        }
        conn.io.flush().await.map_err(H1Error::before_answer)?;
        let head = read_head(conn, self.headers).await;
        // The same on the way back: the other answers whose heads are in
        // go first, so that the answers to clients leave together and a
        // client that sleeps is woken once for several (measured: the load
        // generator woke 0.13-0.15 times per request without this, 0.08-0.10
        // with it).
        requeue().await;
        head
    }

    /// The answer to hand back: its head, and a body that reads the rest
    /// from the connection.
    fn answer(self, mut lease: Lease, head: AnswerHead) -> Result<Response<H1Body>, SendFailure> {
        let mut wire = self.wire;
        wire.clear();
        lease.conn.wbuf = wire;
        let upgraded = head.status == StatusCode::SWITCHING_PROTOCOLS;
        let (framing, reusable) = if upgraded {
            (AnswerFraming::UntilClose, false)
        } else {
            let (framing, reusable) = h1_codec::answer_framing(self.method == Method::HEAD, &head)
                .map_err(|e| SendFailure::Answer(e.into()))?;
            (framing, reusable && !self.cut_short)
        };
        let mut resp = Response::new(());
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        *resp.headers_mut() = head.headers;
        if let Some(reason) = head.reason {
            if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason) {
                resp.extensions_mut().insert(reason);
            }
        }
        let body = if upgraded {
            H1Body {
                lease: Some(lease),
                reading: Reading::Upgrade,
                reusable: false,
                failed: None,
            }
        } else {
            H1Body::new(lease, framing, reusable)
        };
        Ok(resp.map(|()| body))
    }
}

/// Lets the tasks the runtime already has ready run first: this task goes
/// to the back of the run queue, without the wait for the I/O driver that
/// `tokio::task::yield_now` adds.
fn requeue() -> impl Future<Output = ()> {
    let mut queued = false;
    std::future::poll_fn(move |cx| {
        if queued {
            return Poll::Ready(());
        }
        queued = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
}

/// The data of a body already in memory.
fn full_bytes(mut full: Full<Bytes>) -> Bytes {
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(&mut full).poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    }
}

/// Streams a client's body to the node, by `framing`; trailers are not
/// passed on.
async fn write_stream(
    io: &mut Box<dyn Stream>,
    mut body: SendWatch<ClientBody>,
    framing: RequestFraming,
) -> Result<(), H1Error> {
    let mut left = match framing {
        RequestFraming::Length(n) => Some(n),
        RequestFraming::None | RequestFraming::Chunked => None,
    };
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(H1Error::Body)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        match &mut left {
            Some(n) => {
                *n = n
                    .checked_sub(data.len() as u64)
                    .ok_or(H1Error::BodyLength)?;
                io.write_all(&data).await.map_err(H1Error::before_answer)?;
            }
            None => {
                let mut line = [0; 18];
                let line = h1_codec::chunk_size_line(data.len(), &mut line);
                let mut chunk = Buf::chain(Buf::chain(line, data), &b"\r\n"[..]);
                io.write_all_buf(&mut chunk)
                    .await
                    .map_err(H1Error::before_answer)?;
            }
        }
    }
    match left {
        Some(0) => Ok(()),
        Some(_) => Err(H1Error::BodyLength),
        None => io
            .write_all(h1_codec::LAST_CHUNK)
            .await
            .map_err(H1Error::before_answer),
    }
}

/// Reads until a final answer head (informational ones are skipped, except
/// `101 Switching Protocols`), its headers into `spare`'s allocation (see
/// [`h1_codec::parse_answer_head`]).
async fn read_head(conn: &mut Conn, spare: &mut HeaderMap) -> Result<AnswerHead, H1Error> {
    let mut answered = false;
    loop {
        if !conn.rbuf.is_empty() {
            // `spare` holds the request's headers, kept for a retry until a
            // final answer: an informational head is read into a map of its
            // own. (A complete head's status code starts at byte 9,
            // after "HTTP/1.x ".)
            let mut own = HeaderMap::new();
            let into = if conn.rbuf.get(9) == Some(&b'1') {
                &mut own
            } else {
                &mut *spare
            };
            if let Some(head) = h1_codec::parse_answer_head(&mut conn.rbuf, into)? {
                if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS
                {
                    continue;
                }
                return Ok(head);
            }
        }
        conn.rbuf.reserve(READ_CHUNK);
        let read = conn.io.read_buf(&mut conn.rbuf).await;
        match read {
            Ok(0) if answered => return Err(H1Error::Incomplete),
            Ok(0) => return Err(H1Error::Closed),
            Ok(_) => answered = true,
            Err(e) if answered => return Err(H1Error::Io(e)),
            Err(e) => return Err(H1Error::before_answer(e)),
        }
    }
}

/// An answer's body, read from its connection as the client takes it. The
/// connection goes back to the pool at the body's end (when the node
/// framed it so that it can carry another request); a body dropped before
/// its end, or failed, closes it.
pub struct H1Body {
    lease: Option<Lease>,
    reading: Reading,
    reusable: bool,
    /// A failure met just after data was handed out, reported at the next
    /// poll: hyper aborts the client's connection at a body error without
    /// flushing, and the client should get the data that did come first.
    failed: Option<H1Error>,
}

enum Reading {
    /// Read whole with the head; the connection is already released.
    Ready(Option<Bytes>),
    /// This many bytes still to come.
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    /// A `101` answer: the connection now belongs to the upgrade.
    Upgrade,
}

impl H1Body {
    fn new(mut lease: Lease, framing: AnswerFraming, reusable: bool) -> Self {
        let reading = match framing {
            AnswerFraming::Empty => Reading::Ready(None),
            AnswerFraming::Length(n) if lease.conn.rbuf.len() as u64 >= n => {
                // `n` fits in the buffer, so in usize.
                Reading::Ready(Some(lease.conn.rbuf.split_to(n as usize).freeze()))
            }
            AnswerFraming::Length(n) => Reading::Length(n),
            AnswerFraming::Chunked => Reading::Chunked(ChunkedDecoder::default()),
            AnswerFraming::UntilClose => Reading::UntilClose,
        };
        let mut body = H1Body {
            lease: Some(lease),
            reading,
            reusable,
            failed: None,
        };
        if let Reading::Ready(_) = body.reading {
            body.release();
        }
        body
    }

    /// The answer is read: the connection may serve another request.
    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            if self.reusable {
                lease.release();
            }
        }
    }

    /// Reports `e` at the next poll, which comes at once.
    fn fail(
        &mut self,
        e: H1Error,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        self.failed = Some(e);
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// The connection of a `101` answer, for the upgraded protocol.
    pub fn into_upgraded(mut self) -> Option<Upgraded> {
        if !matches!(self.reading, Reading::Upgrade) {
            return None;
        }
        let conn = self.lease.take()?.conn;
        Some(Upgraded {
            io: conn.io,
            read: conn.rbuf,
        })
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            let Some(lease) = &mut this.lease else {
                return match &mut this.reading {
                    Reading::Ready(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
                    _ => Poll::Ready(None),
                };
            };
            let rbuf = &mut lease.conn.rbuf;
            match &mut this.reading {
                Reading::Length(left) if !rbuf.is_empty() => {
                    let take = usize::try_from(*left).unwrap_or(usize::MAX).min(rbuf.len());
                    let data = rbuf.split_to(take).freeze();
                    *left -= take as u64;
                    if *left == 0 {
                        this.reading = Reading::Ready(None);
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Reading::Chunked(decoder) if !rbuf.is_empty() || decoder.is_done() => {
                    match decoder.decode(rbuf) {
                        Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                        Ok(Decoded::Trailers(trailers)) => {
                            this.reading = Reading::Ready(None);
                            this.release();
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                        }
                        Ok(Decoded::End) => {
                            this.reading = Reading::Ready(None);
                            this.release();
                            return Poll::Ready(None);
                        }
                        Ok(Decoded::More) => {}
                        Err(e) => {
                            this.lease = None;
                            this.reading = Reading::Ready(None);
                            return this.fail(e.into(), cx);
                        }
                    }
                }
                Reading::UntilClose if !rbuf.is_empty() => {
                    let data = rbuf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Reading::Upgrade | Reading::Ready(_) => return Poll::Ready(None),
                _ => {}
            }
            rbuf.reserve(READ_CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(&mut lease.conn.io), cx, rbuf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    let ended = matches!(this.reading, Reading::UntilClose);
                    this.lease = None;
                    this.reading = Reading::Ready(None);
                    if ended {
                        return Poll::Ready(None);
                    }
                    return this.fail(H1Error::Incomplete, cx);
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.lease = None;
                    this.reading = Reading::Ready(None);
                    return this.fail(H1Error::Io(e), cx);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.reading {
            Reading::Ready(data) => data.is_none(),
            Reading::Length(n) => *n == 0,
            _ => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.reading {
            Reading::Ready(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Reading::Length(n) => SizeHint::with_exact(*n),
            _ => SizeHint::default(),
        }
    }
}

/// The node's side of an upgraded connection: what it sent after its `101`
/// first, then the connection itself.
pub struct Upgraded {
    io: Box<dyn Stream>,
    read: BytesMut,
}

impl AsyncRead for Upgraded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Drops idle connections that have timed out or gone stale, until the
/// pool is gone.
async fn sweep(pool: Weak<Shared>) {
    loop {
        let period = match pool.upgrade() {
            Some(shared) => {
                for slot in shared.idle.iter() {
                    let mut nodes = slot.0.lock().unwrap_or_else(|p| p.into_inner());
                    nodes.retain(|_, node| {
                        let mut list = node.0.lock().unwrap_or_else(|p| p.into_inner());
                        list.retain_mut(|e| {
                            e.since.elapsed() < shared.idle_timeout && !e.conn.is_stale()
                        });
                        // A node's empty list goes, unless a lease holds it
                        // and will give a connection back to it.
                        !list.is_empty() || Arc::strong_count(node) > 1
                    });
                }
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
    use http::Request;
    use http_body_util::{BodyExt, Either, Full};
    use hyper_util::rt::TokioIo;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An HTTP/1.1 server (hyper's) counting its connections.
    async fn node() -> (Authority, Arc<AtomicUsize>) {
        tcp_node(|s| async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                    b"ok",
                ))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        })
        .await
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

    /// `req` sent to `key` through `pool`, its headers held here.
    async fn send_request(
        pool: &H1Pool,
        key: &NodeKey,
        max_requests: u32,
        req: Request<ProxyBody>,
    ) -> Result<Response<H1Body>, SendFailure> {
        let (parts, body) = req.into_parts();
        let mut headers = parts.headers;
        let req = H1Request {
            method: parts.method,
            target: parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
            headers: &mut headers,
            forwarded: &Forwarded::default(),
            body,
        };
        pool.send(key, max_requests, req, |_| {}).await
    }

    async fn exchange(pool: &H1Pool, node: &Authority, max_requests: u32) {
        let resp = send_request(
            pool,
            &NodeKey::new(node.clone(), None),
            max_requests,
            request(node),
        )
        .await
        .unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
    }

    #[tokio::test]
    async fn a_worker_is_lent_only_the_connections_it_opened() {
        let (node, conns) = node().await;
        let p = pool(Duration::from_secs(60));
        for (worker, opened) in [(1, 1), (2, 2), (1, 2), (2, 2)] {
            crate::workers::pretend(worker);
            exchange(&p, &node, 1000).await;
            assert_eq!(conns.load(Ordering::SeqCst), opened, "worker {worker}");
        }
        crate::workers::pretend(0);
        assert_eq!(idle_count(&p), 2, "one idle connection per worker");
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

    /// A node whose connections are each served by `serve`; it counts them.
    async fn tcp_node<F, Fut>(serve: F) -> (Authority, Arc<AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + Copy + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let counter = conns.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(s));
            }
        });
        (addr.to_string().parse().unwrap(), conns)
    }

    /// A node that answers every request of a connection with `answer`.
    async fn raw_node(answer: &'static [u8]) -> (Authority, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tcp_node(move |mut s| async move {
            let mut buf = [0u8; 4096];
            while s.read(&mut buf).await.unwrap_or(0) > 0 {
                if s.write_all(answer).await.is_err() {
                    return;
                }
            }
        })
        .await
    }

    async fn send(p: &H1Pool, node: &Authority) -> Response<H1Body> {
        send_request(p, &NodeKey::new(node.clone(), None), 1000, request(node))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn an_answer_dropped_midway_closes_its_connection() {
        let (node, conns) = raw_node(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf.").await;
        let p = pool(Duration::from_secs(60));
        let mut body = send(&p, &node).await.into_body();
        assert_eq!(body.size_hint().exact(), Some(10));
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"half.");
        drop(body);
        assert_eq!(idle_count(&p), 0);
        let _ = send(&p, &node).await;
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_answer_read_with_its_head_frees_its_connection_at_once() {
        let (node, conns) = raw_node(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        let p = pool(Duration::from_secs(60));
        let resp = send(&p, &node).await;
        assert_eq!(idle_count(&p), 1, "released before the body is taken");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        let _ = send(&p, &node).await;
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn chunked_answers_end_with_their_trailers_and_free_the_connection() {
        let (node, conns) = raw_node(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\nx-sum: 3\r\n\r\n",
        )
        .await;
        let p = pool(Duration::from_secs(60));
        for _ in 0..3 {
            let collected = send(&p, &node).await.into_body().collect().await.unwrap();
            assert_eq!(collected.trailers().unwrap()["x-sum"], "3");
            assert_eq!(&collected.to_bytes()[..], b"abc");
            assert_eq!(idle_count(&p), 1);
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn answers_until_close_are_read_to_the_end_and_not_pooled() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node: Authority = l.local_addr().unwrap().to_string().parse().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nuntil ").await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = s.write_all(b"closed").await;
            }
        });
        let p = pool(Duration::from_secs(60));
        let body = send(&p, &node).await.into_body().collect().await.unwrap();
        assert_eq!(&body.to_bytes()[..], b"until closed");
        assert_eq!(idle_count(&p), 0);
    }

    #[tokio::test]
    async fn informational_answers_are_skipped_and_bad_ones_fail() {
        let (node, _) =
            raw_node(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n").await;
        let p = pool(Duration::from_secs(60));
        assert_eq!(send(&p, &node).await.status(), StatusCode::NO_CONTENT);
        let (node, _) = raw_node(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").await;
        let failure =
            send_request(&p, &NodeKey::new(node.clone(), None), 1000, request(&node)).await;
        assert!(matches!(
            failure,
            Err(SendFailure::Answer(H1Error::Invalid(
                Invalid::ContentLength
            )))
        ));
    }

    #[tokio::test]
    async fn streamed_bodies_go_chunked_or_by_their_length() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node: Authority = l.local_addr().unwrap().to_string().parse().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = s.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        if seen.ends_with(b"0\r\n\r\n") || seen.ends_with(b"hello") {
                            let _ = tx.send(String::from_utf8_lossy(&seen).into_owned());
                            seen.clear();
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                                .await;
                        }
                    }
                });
            }
        });
        let p = pool(Duration::from_secs(60));
        for length in [None, Some("5")] {
            let client = ClientBody::full(Bytes::from_static(b"hello"));
            let (watched, _) = SendWatch::new(client);
            let mut req = Request::post(format!("http://{node}/up"))
                .body(Either::Right(watched))
                .unwrap();
            if let Some(len) = length {
                req.headers_mut()
                    .insert(http::header::CONTENT_LENGTH, len.parse().unwrap());
            }
            let resp = send_request(&p, &NodeKey::new(node.clone(), None), 1000, req)
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let wire = rx.recv().await.unwrap();
            match length {
                None => assert!(
                    wire.ends_with("transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
                    "{wire}"
                ),
                Some(_) => assert!(wire.ends_with("content-length: 5\r\n\r\nhello"), "{wire}"),
            }
        }
    }

    #[tokio::test]
    async fn a_refused_node_is_a_connect_failure() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let node: Authority = l.local_addr().unwrap().to_string().parse().unwrap();
        drop(l);
        let p = pool(Duration::from_secs(60));
        let failure = send_request(&p, &NodeKey::new(node.clone(), None), 10, request(&node)).await;
        assert!(matches!(
            failure,
            Err(SendFailure::Connect(ConnectError::Io(_)))
        ));
    }

    fn idle_count(p: &H1Pool) -> usize {
        p.0.idle
            .iter()
            .map(|slot| {
                let nodes = slot.0.lock().unwrap();
                nodes
                    .values()
                    .map(|n| n.0.lock().unwrap().len())
                    .sum::<usize>()
            })
            .sum()
    }

    /// A node that answers the first request of each connection and, for
    /// any later one, reads it and hangs up without answering.
    async fn one_shot_node() -> (Authority, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tcp_node(|mut s| async move {
            let mut buf = [0u8; 4096];
            if s.read(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
            let _ = s.read(&mut buf).await;
        })
        .await
    }

    #[tokio::test]
    async fn a_get_cut_off_on_a_pooled_connection_is_sent_again() {
        let (node, conns) = one_shot_node().await;
        let p = pool(Duration::from_secs(60));
        exchange(&p, &node, 1000).await;
        exchange(&p, &node, 1000).await;
        assert_eq!(
            conns.load(Ordering::SeqCst),
            2,
            "sent again on a new connection"
        );

        // A POST is not sent twice.
        let post = Request::post(format!("http://{node}/"))
            .body(Either::Left(Full::new(Bytes::from_static(b"once"))))
            .unwrap();
        let failure = send_request(&p, &NodeKey::new(node.clone(), None), 1000, post).await;
        assert!(matches!(
            failure,
            Err(SendFailure::Request(H1Error::Closed))
        ));
    }
}
