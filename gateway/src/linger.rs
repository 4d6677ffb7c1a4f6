//! nginx's lingering close: after answering a request early (413, 400,
//! 431 before its body was read) the connection is closed for writing and
//! what the client still sends is read and thrown away, for a bounded time,
//! before the socket is closed.
//!
//! Closing a socket with unread bytes in it makes the kernel send a reset,
//! and a reset can destroy the answer before the client read it: a client
//! still uploading a 2 MiB body would see a broken pipe instead of the
//! 413. Reading on until the client stops (or gives up) lets the answer
//! arrive.
//!
//! Bounds, nginx's defaults: each wait for more bytes ends after
//! [`LINGERING_TIMEOUT`], the whole linger after [`LINGERING_TIME`]. The
//! lingering socket no longer counts against `worker_connections`; at most
//! [`MAX_LINGERING`] linger at once (past that a socket is closed at once,
//! as if it had nothing unread), and what they read goes into one buffer per
//! thread, so a lingering socket holds its task and nothing more.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::park::Activity;

/// nginx `lingering_timeout`: the longest wait for more bytes.
pub const LINGERING_TIMEOUT: Duration = Duration::from_secs(5);
/// nginx `lingering_time`: the longest linger in all.
pub const LINGERING_TIME: Duration = Duration::from_secs(30);
/// Sockets lingering at once in the process, at most: a client that makes
/// the gateway answer early over and over cannot pile them up.
pub const MAX_LINGERING: usize = 4096;

static LINGERING: AtomicUsize = AtomicUsize::new(0);

/// A client socket that lingers when dropped if its connection asked for
/// it ([`Activity::linger`]).
///
/// It also sets `TCP_NODELAY`, on Linux when a second write comes, as nginx
/// sets it when a connection goes on after its first answer: there the
/// first write cannot be held back by Nagle's algorithm (Linux holds a small
/// segment only while an earlier small one is unacknowledged), so a
/// connection that closes after one answer is spared the system call.
/// Elsewhere the classic algorithm could hold the tail of a first write
/// that spans segments, so it is set before the first.
pub struct Lingering {
    stream: Option<TcpStream>,
    activity: Arc<Activity>,
    /// Write calls so far, counted up to [`NODELAY_AT_WRITE`].
    writes: u8,
}

/// The write call before which `TCP_NODELAY` is set (see [`Lingering`]).
const NODELAY_AT_WRITE: u8 = if cfg!(target_os = "linux") { 2 } else { 1 };

impl Lingering {
    pub fn new(stream: TcpStream, activity: Arc<Activity>) -> Self {
        Lingering {
            stream: Some(stream),
            activity,
            writes: 0,
        }
    }

    /// The socket to write to, with `TCP_NODELAY` set from the
    /// [`NODELAY_AT_WRITE`]th write on.
    fn writer(&mut self) -> io::Result<&mut TcpStream> {
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
        if self.writes < NODELAY_AT_WRITE {
            self.writes += 1;
            if self.writes == NODELAY_AT_WRITE {
                let _ = stream.set_nodelay(true);
            }
        }
        Ok(stream)
    }

    /// The socket (`None` only while being dropped).
    pub fn get_ref(&self) -> Option<&TcpStream> {
        self.stream.as_ref()
    }

    fn stream(&mut self) -> io::Result<&mut TcpStream> {
        self.stream
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        if !self.activity.lingers() {
            return;
        }
        if LINGERING.fetch_add(1, Ordering::Relaxed) >= MAX_LINGERING {
            LINGERING.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    linger(stream).await;
                    LINGERING.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Err(_) => {
                LINGERING.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// Sends FIN, then reads and discards until the client closes, stops
/// sending for [`LINGERING_TIMEOUT`], or [`LINGERING_TIME`] is over.
async fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let until = tokio::time::Instant::now() + LINGERING_TIME;
    loop {
        let wait = until
            .saturating_duration_since(tokio::time::Instant::now())
            .min(LINGERING_TIMEOUT);
        match tokio::time::timeout(wait, stream.readable()).await {
            Ok(Ok(())) => match discard(&stream) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return,
            },
            _ => return,
        }
    }
}

/// Reads what `stream` has into the thread's discard buffer.
fn discard(stream: &TcpStream) -> io::Result<usize> {
    thread_local! {
        static SINK: std::cell::RefCell<Box<[u8]>> =
            std::cell::RefCell::new(vec![0u8; 16 * 1024].into_boxed_slice());
    }
    SINK.with(|sink| match sink.try_borrow_mut() {
        Ok(mut sink) => stream.try_read(&mut sink),
        // Not reentrant, but a borrow must not panic.
        Err(_) => stream.try_read(&mut [0u8; 512]),
    })
}

impl AsyncRead for Lingering {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().stream() {
            Ok(s) => Pin::new(s).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().writer() {
            Ok(s) => Pin::new(s).poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().writer() {
            Ok(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stream() {
            Ok(s) => Pin::new(s).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// A real `shutdown` only for a tunnel (a WebSocket's half-close must
    /// reach the client while the other direction goes on). Otherwise the
    /// connection is ending and is dropped next: closing the socket sends
    /// the same FIN (and a lingering close sends its own shutdown first),
    /// so the system call would buy nothing, as nginx closes without one.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.activity.is_upgraded() {
            return Poll::Ready(Ok(()));
        }
        match this.stream() {
            Ok(s) => Pin::new(s).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}
