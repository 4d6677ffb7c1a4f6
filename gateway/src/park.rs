//! Idle HTTP/1 keep-alive connections give their buffers back.
//!
//! hyper keeps an 8 KiB read buffer, an 8 KiB write buffer and a cached
//! header map for as long as a connection lives. A client that keeps its
//! connection open between requests (browsers, mobile apps, long-polling
//! clients) would hold all of that while sending nothing. nginx frees its
//! header buffers once a keep-alive connection goes quiet; this does the
//! same: once a connection has been quiet for [`PARK_AFTER`], the server
//! takes the socket and the service back from hyper (`into_parts`), drops
//! the rest, waits for the socket to turn readable with no buffer at all,
//! and then starts a fresh hyper connection on it.
//!
//! "Quiet" is judged from what the connection did, recorded in
//! [`Activity`]: no request is being answered, every byte written was
//! flushed, hyper's last read found nothing, and no byte arrived since the
//! last response ended. A request that arrived in pieces is never parked
//! half-read for long: bytes hyper had read already come back from
//! `into_parts` and are served first ([`ClientIo::resume_with`]).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::framing::FramingScan;

/// How long a keep-alive connection stays quiet before its buffers are
/// released. Short enough that idle clients cost little, long enough that a
/// busy client's next request (well under a millisecond on a LAN) never
/// pays for a new hyper connection.
pub const PARK_AFTER: Duration = Duration::from_millis(250);

/// What one client connection did lately; shared by its I/O, its requests
/// and the task that drives it. HTTP/1 touches it from that one task only,
/// so plain relaxed loads and stores do (no read-modify-write on the hot
/// path but the request count).
#[derive(Debug, Default)]
pub struct Activity {
    /// Requests begun on this connection.
    begun: AtomicU64,
    /// Requests whose response has not ended yet.
    open: AtomicU32,
    /// hyper's last read found nothing to read.
    read_waiting: AtomicBool,
    /// A byte arrived after the last response ended.
    read_since_end: AtomicBool,
    /// Bytes were written and not flushed yet, or a write is blocked.
    write_open: AtomicBool,
    /// The connection answered before reading all it was sent: linger on
    /// close (see [`crate::linger`]).
    linger: AtomicBool,
    /// A response switched protocols: the socket now carries a tunnel,
    /// whose half-closes must reach the client.
    upgraded: AtomicBool,
    /// No request has begun yet (nginx's `reading` state; see
    /// [`crate::metrics`]).
    pub(crate) reading: AtomicBool,
    /// HTTP/2: response bodies that handed hyper a chunk it has not sent
    /// yet (it waits for the client's flow-control window), and how many
    /// such chunks have gone out since the connection began.
    awaiting_window: AtomicU32,
    chunks_sent: AtomicU64,
}

impl Activity {
    /// Marks a request as begun; the returned guard ends it when dropped.
    /// Also returns the request's 1-based index on the connection.
    pub fn begin(self: &Arc<Self>) -> (Exchange, u64) {
        let index = self.begun.fetch_add(1, Ordering::Relaxed) + 1;
        self.open.fetch_add(1, Ordering::Relaxed);
        crate::metrics::CONNECTIONS.request_begun(&self.reading);
        (
            Exchange {
                activity: self.clone(),
            },
            index,
        )
    }

    /// Asks for a lingering close when the connection ends.
    pub fn set_linger(&self) {
        self.linger.store(true, Ordering::Relaxed);
    }

    /// Whether the connection ends with a lingering close.
    pub fn lingers(&self) -> bool {
        self.linger.load(Ordering::Relaxed)
    }

    /// Notes a `101 Switching Protocols` answer.
    pub fn set_upgraded(&self) {
        self.upgraded.store(true, Ordering::Relaxed);
    }

    /// Whether the connection became a tunnel.
    pub fn is_upgraded(&self) -> bool {
        self.upgraded.load(Ordering::Relaxed)
    }

    /// Requests begun so far.
    pub fn begun(&self) -> u64 {
        self.begun.load(Ordering::Relaxed)
    }

    /// Requests (HTTP/2: streams) whose response has not ended yet.
    pub fn open(&self) -> u32 {
        self.open.load(Ordering::Relaxed)
    }

    /// Whether no request is being answered and every byte written has
    /// gone out: the connection waits for its next request head.
    pub fn is_between_requests(&self) -> bool {
        self.open.load(Ordering::Relaxed) == 0 && !self.write_open.load(Ordering::Relaxed)
    }

    /// HTTP/2 streams whose next chunk waits for the client's window.
    pub fn awaiting_window(&self) -> u32 {
        self.awaiting_window.load(Ordering::Relaxed)
    }

    /// HTTP/2 chunks sent after waiting their turn (see [`Tracked`]).
    pub fn chunks_sent(&self) -> u64 {
        self.chunks_sent.load(Ordering::Relaxed)
    }

    /// Whether the connection is between requests with nothing in flight.
    pub fn is_quiet(&self) -> bool {
        self.open.load(Ordering::Relaxed) == 0
            && self.read_waiting.load(Ordering::Relaxed)
            && !self.read_since_end.load(Ordering::Relaxed)
            && !self.write_open.load(Ordering::Relaxed)
    }
}

/// One request being answered. Dropped when the response body has been
/// handed over completely (or the request was abandoned).
#[derive(Debug)]
pub struct Exchange {
    activity: Arc<Activity>,
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.activity.open.fetch_sub(1, Ordering::Relaxed);
        self.activity.read_since_end.store(false, Ordering::Relaxed);
        crate::metrics::CONNECTIONS.request_ended();
    }
}

pin_project_lite::pin_project! {
    /// A response body that ends its [`Exchange`] when hyper drops it,
    /// which hyper does as soon as the last frame has been taken.
    ///
    /// On HTTP/2 it also says when a chunk it handed over waits for the
    /// client's flow-control window: hyper takes the next chunk only once
    /// the last one is sent, so from a chunk handed over until the next
    /// poll the stream waits on the client ([`Activity::awaiting_window`]).
    /// A client that opens no window never makes a socket write block, so
    /// `send_timeout` is kept by watching these (see `serve_http2`).
    pub struct Tracked<B> {
        #[pin]
        inner: B,
        exchange: Option<Exchange>,
        h2: bool,
        handed: Option<Handed>,
    }
}

impl<B> Tracked<B> {
    pub fn new(inner: B, exchange: Exchange, h2: bool) -> Self {
        Tracked {
            inner,
            exchange: Some(exchange),
            h2,
            handed: None,
        }
    }
}

/// An HTTP/2 chunk handed to hyper and not sent yet: counted in
/// [`Activity::awaiting_window`] while it lives.
#[derive(Debug)]
pub struct Handed(Arc<Activity>);

impl Handed {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.awaiting_window.fetch_add(1, Ordering::Relaxed);
        Handed(activity.clone())
    }

    /// The chunk went out: hyper asks for the next one.
    fn sent(self) {
        self.0.chunks_sent.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Handed {
    fn drop(&mut self) {
        self.0.awaiting_window.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        if let Some(handed) = this.handed.take() {
            handed.sent();
        }
        let mut polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &mut polled {
            if let Some(trailers) = frame.trailers_mut() {
                // As the head's values (see `handle`): trailers go through
                // HPACK too (gRPC's on every answer).
                crate::headers::own_values(trailers);
            } else if *this.h2 && frame.data_ref().is_some_and(|d| d.has_remaining()) {
                if let Some(exchange) = this.exchange.as_ref() {
                    *this.handed = Some(Handed::new(&exchange.activity));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An HTTP/1 client connection's I/O as hyper sees it: records reads and
/// writes in [`Activity`], follows the request framing on every byte read
/// from the socket ([`FramingScan`]), and serves bytes taken back from a
/// parked connection before reading the socket again.
pub struct ClientIo<S> {
    inner: S,
    activity: Arc<Activity>,
    scan: FramingScan,
    resumed: Bytes,
}

impl<S> ClientIo<S> {
    pub fn new(inner: S, activity: Arc<Activity>, scan: FramingScan) -> Self {
        ClientIo {
            inner,
            activity,
            scan,
            resumed: Bytes::new(),
        }
    }

    /// Bytes a parked hyper connection had read but not used: served by
    /// the next reads, before the socket.
    pub fn resume_with(&mut self, bytes: Bytes) {
        self.resumed = bytes;
    }

    /// Bytes read from the socket before the connection was framed (the
    /// protocol sniff): scanned now, served by the next reads.
    pub fn start_with(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.activity.read_since_end.store(true, Ordering::Relaxed);
            self.scan.feed(&bytes);
        }
        self.resumed = bytes;
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.resumed.is_empty() {
            // Scanned already, when they first came from the socket.
            crate::io::replay(&mut this.resumed, buf);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        let activity = &this.activity;
        match &poll {
            Poll::Pending => activity.read_waiting.store(true, Ordering::Relaxed),
            Poll::Ready(_) => {
                activity.read_waiting.store(false, Ordering::Relaxed);
                if buf.filled().len() > before {
                    activity.read_since_end.store(true, Ordering::Relaxed);
                    this.scan.feed(&buf.filled()[before..]);
                }
            }
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClientIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.activity.write_open.store(true, Ordering::Relaxed);
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.activity.write_open.store(true, Ordering::Relaxed);
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = poll {
            this.activity.write_open.store(false, Ordering::Relaxed);
        }
        poll
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn quiet_only_between_requests_with_io_settled() {
        let activity = Arc::new(Activity::default());
        let set = |flag: &AtomicBool, on: bool| flag.store(on, Ordering::Relaxed);
        set(&activity.read_waiting, true);
        assert!(activity.is_quiet());
        let (exchange, index) = activity.begin();
        assert_eq!(index, 1);
        assert!(!activity.is_quiet(), "a request is being answered");
        set(&activity.read_since_end, true);
        drop(exchange);
        assert!(
            activity.is_quiet(),
            "the response ending resets what was read"
        );
        set(&activity.write_open, true);
        assert!(!activity.is_quiet(), "unflushed bytes");
        set(&activity.write_open, false);
        set(&activity.read_since_end, true);
        assert!(!activity.is_quiet(), "the next request has begun to arrive");
        set(&activity.read_since_end, false);
        set(&activity.read_waiting, false);
        assert!(!activity.is_quiet(), "hyper has not found the socket empty");
        assert_eq!(activity.begin().1, 2);
    }

    #[tokio::test]
    async fn resumed_bytes_come_first_and_io_is_recorded() {
        let (client, server) = tokio::io::duplex(64);
        let activity = Arc::new(Activity::default());
        let mut io = ClientIo::new(server, activity.clone(), FramingScan::default());
        io.resume_with(Bytes::from_static(b"GET / HT"));
        let mut client = client;
        client.write_all(b"TP/1.1\r\n").await.expect("write");
        let mut got = [0u8; 16];
        let mut n = 0;
        while n < 16 {
            n += io.read(&mut got[n..]).await.expect("read");
        }
        assert_eq!(&got, b"GET / HTTP/1.1\r\n");
        assert!(activity.read_since_end.load(Ordering::Relaxed));
        io.write_all(b"HTTP/1.1 200 OK\r\n").await.expect("write");
        assert!(!activity.is_quiet());
        io.flush().await.expect("flush");
        assert!(!activity.write_open.load(Ordering::Relaxed));
    }
}
