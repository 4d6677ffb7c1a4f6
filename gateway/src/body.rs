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

/// Why [`read_whole`] gave up.
#[derive(Debug)]
pub enum ReadWholeError {
    /// More than the limit.
    TooLarge,
    /// The body failed (see the stream's [`BodyState`] for why).
    Broken,
}

/// Reads `body` whole into one buffer of at most `max` bytes (413's case
/// beyond). Each frame is copied and let go at once: a frame's bytes share
/// the buffer they were read into, which holds more than the payload (an
/// HTTP/2 DATA frame may carry 255 bytes of padding per byte of data, and
/// its flow control gives the padding back), so keeping the frames as
/// they came would hold what the client sent, not what the limit counts.
pub async fn read_whole<B>(body: B, max: usize) -> Result<Bytes, ReadWholeError>
where
    B: Body<Data = Bytes>,
{
    use bytes::Buf;
    use http_body_util::BodyExt;
    let hint = usize::try_from(body.size_hint().lower()).unwrap_or(max);
    let mut out = bytes::BytesMut::with_capacity(hint.min(max).min(64 << 10));
    let mut body = std::pin::pin!(body);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ReadWholeError::Broken)?;
        if let Ok(mut data) = frame.into_data() {
            if out.len() + data.remaining() > max {
                return Err(ReadWholeError::TooLarge);
            }
            while data.has_remaining() {
                let chunk = data.chunk();
                out.extend_from_slice(chunk);
                let n = chunk.len();
                data.advance(n);
            }
        }
    }
    Ok(out.freeze())
}

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
///
/// The timer is made the first time the body has to wait, and moved on from
/// a frame only when it waits again: a body that is already there (most
/// answers, read whole with their head) costs no timer and no clock read.
pub struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// A frame came since the timer was set: it starts over at the next wait.
    moved: bool,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            timer: None,
            moved: false,
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
                this.moved = true;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let idle = this.idle;
                let timer = match &mut this.timer {
                    Some(timer) => {
                        if std::mem::take(&mut this.moved) {
                            timer.as_mut().reset(plugins::clock::now() + idle);
                        }
                        timer
                    }
                    None => {
                        this.moved = false;
                        this.timer.insert(Box::pin(sleep(idle)))
                    }
                };
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(Idle(idle))))),
                    Poll::Pending => Poll::Pending,
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::convert::Infallible;

    /// A body whose frames come `gaps` apart.
    fn paced(gaps: Vec<u64>) -> impl Body<Data = Bytes, Error = Infallible> + Unpin {
        let frames = futures_util::stream::unfold(gaps.into_iter(), |mut gaps| async move {
            let gap = gaps.next()?;
            tokio::time::sleep(Duration::from_millis(gap)).await;
            Some((Ok(Frame::data(Bytes::from_static(b"x"))), gaps))
        });
        StreamBody::new(Box::pin(frames))
    }

    #[tokio::test]
    async fn read_whole_keeps_the_data_not_the_frames_buffers() {
        // 300 one-byte frames, each a slice of a 256-byte "read buffer".
        let wire = Bytes::from(vec![7u8; 300 * 256]);
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = (0..300)
            .map(|i| Ok(Frame::data(wire.slice(i * 256..i * 256 + 1))))
            .collect();
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let data = read_whole(body, 1000).await.unwrap();
        assert_eq!(data.len(), 300);
        assert!(data.iter().all(|b| *b == 7));
        assert!(wire.is_unique(), "the data still holds the frames' buffer");

        let frames: Vec<Result<Frame<Bytes>, Infallible>> = (0..3)
            .map(|_| Ok(Frame::data(Bytes::from_static(b"abcd"))))
            .collect();
        let body = StreamBody::new(futures_util::stream::iter(frames));
        assert!(matches!(
            read_whole(body, 11).await,
            Err(ReadWholeError::TooLarge)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn frames_closer_than_the_timeout_never_fail() {
        let body = IdleTimeout::new(paced(vec![90; 30]), Duration::from_millis(100));
        let all = body.collect().await.map(|b| b.to_bytes().len());
        assert_eq!(all.ok(), Some(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_gap_longer_than_the_timeout_fails_after_the_timeout() {
        let mut body = IdleTimeout::new(paced(vec![0, 50, 500]), Duration::from_millis(100));
        let started = tokio::time::Instant::now();
        assert!(body.frame().await.is_some_and(|f| f.is_ok()));
        assert!(body.frame().await.is_some_and(|f| f.is_ok()));
        let failed = body.frame().await;
        assert!(matches!(failed, Some(Err(e)) if e.is::<Idle>()));
        // The third frame's wait began at 50 ms: it failed 100 ms later.
        assert_eq!(started.elapsed(), Duration::from_millis(150));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_is_already_there_sets_no_timer() {
        let mut body = IdleTimeout::new(
            Full::new(Bytes::from_static(b"abc")),
            Duration::from_millis(100),
        );
        assert!(body.frame().await.is_some_and(|f| f.is_ok()));
        assert!(body.frame().await.is_none());
        assert!(body.timer.is_none());
    }
}
