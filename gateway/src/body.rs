//! Request bodies as the gateway carries them: already read, or streamed
//! from the client with nginx's `client_body_timeout` between reads and a
//! record of why the stream failed, so that a broken client body becomes the
//! client's fault (400/408) and not the upstream's (502); and the body the
//! gateway sends upstream ([`ProxyBody`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::time::{sleep, Sleep};

use plugins::ctx::RequestBodyCapture;
use plugins::BoxError;

use crate::phases::SendWatch;

/// The body sent upstream: buffered (replayable, so a retry can resend it)
/// or streamed from the client with its progress watched for the `send`
/// and `read` timeouts.
pub type ProxyBody = Either<Full<Bytes>, SendWatch<ClientBody>>;

/// How a streamed client body ended badly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    /// Malformed framing (bad chunk size) or the client went away.
    Broken,
    /// No data for `client_body_timeout`.
    TimedOut,
}

/// Shared between the body and whoever forwards it.
#[derive(Debug, Default)]
pub struct BodyState(AtomicU8);

impl BodyState {
    fn set(&self, fault: BodyFault) {
        let v = match fault {
            BodyFault::Broken => 1,
            BodyFault::TimedOut => 2,
        };
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn fault(&self) -> Option<BodyFault> {
        match self.0.load(Ordering::Relaxed) {
            1 => Some(BodyFault::Broken),
            2 => Some(BodyFault::TimedOut),
            _ => None,
        }
    }
}

/// Any body that fails when no frame arrives for `idle` (nginx's
/// `proxy_read_timeout` and `client_body_timeout` are both "between two
/// successive reads", not for the whole body).
pub struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            timer: Box::pin(sleep(idle)),
        }
    }
}

/// Why an [`IdleTimeout`] body failed.
#[derive(Debug, thiserror::Error)]
#[error("no data for {0:?}")]
pub struct Idle(pub Duration);

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let deadline = tokio::time::Instant::now() + this.idle;
                this.timer.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(Idle(this.idle))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client's request body.
pub enum ClientBody {
    /// Read completely at the edge (empty bodies too).
    Full(Option<Bytes>),
    Stream(Box<Streaming>),
}

/// A body still arriving from the client.
pub struct Streaming {
    inner: IdleTimeout<Incoming>,
    state: Arc<BodyState>,
    /// Where a logger wants the first bytes copied (`include_req_body`).
    tap: Option<Arc<RequestBodyCapture>>,
}

impl ClientBody {
    pub fn full(bytes: Bytes) -> Self {
        ClientBody::Full(Some(bytes))
    }

    pub fn empty() -> Self {
        ClientBody::Full(None)
    }

    /// Streams `inner`, failing after `idle` without data.
    pub fn stream(inner: Incoming, idle: Duration) -> (Self, Arc<BodyState>) {
        let state = Arc::new(BodyState::default());
        let body = ClientBody::Stream(Box::new(Streaming {
            inner: IdleTimeout::new(inner, idle),
            state: state.clone(),
            tap: None,
        }));
        (body, state)
    }

    /// Copies the body's first bytes into `capture` as they go by (all at
    /// once for a body read at the edge).
    pub fn tap(&mut self, capture: Arc<RequestBodyCapture>) {
        match self {
            ClientBody::Full(b) => capture.push(b.as_deref().unwrap_or_default()),
            ClientBody::Stream(s) => s.tap = Some(capture),
        }
    }

    /// The whole body when it was read at the edge.
    pub fn buffered(&self) -> Option<Bytes> {
        match self {
            ClientBody::Full(b) => Some(b.clone().unwrap_or_default()),
            ClientBody::Stream(_) => None,
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Full(b) => Poll::Ready(
                b.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            ClientBody::Stream(s) => {
                let s = s.as_mut();
                match Pin::new(&mut s.inner).poll_frame(cx) {
                    Poll::Ready(Some(Err(e))) => {
                        let fault = if e.is::<Idle>() {
                            BodyFault::TimedOut
                        } else {
                            BodyFault::Broken
                        };
                        s.state.set(fault);
                        Poll::Ready(Some(Err(e)))
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        if let (Some(tap), Some(data)) = (&s.tap, frame.data_ref()) {
                            if tap.wants_more() {
                                tap.push(data);
                            } else {
                                s.tap = None;
                            }
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    other => other,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Full(b) => b.as_ref().is_none_or(Bytes::is_empty),
            ClientBody::Stream(s) => s.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ClientBody::Stream(s) => s.inner.size_hint(),
        }
    }
}
