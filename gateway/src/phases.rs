//! The upstream `timeout` of APISIX, phase by phase, as nginx applies it:
//!
//! - `connect`: establishing the connection (the connector enforces it);
//! - `send`: the longest the upstream may leave the request unaccepted —
//!   a body frame handed over and not taken up, or the head not written;
//! - `read`: the longest wait for the answer once the whole request is
//!   sent (and, in [`crate::body::IdleTimeout`], between two reads of its body).
//!   A request whose body was complete from the start counts from the moment
//!   it is given a connection, new or pooled ([`Progress::mark_connected`],
//!   called by the connection pools).
//!
//! So an upload may take as long as the client needs, as long as neither
//! side stalls; a client that pauses is bounded by `client_body_timeout`
//! instead, which is not the upstream's fault.
//!
//! [`SendWatch`] wraps a streamed request body and records its progress;
//! [`within_phases`] runs the exchange and fails it at the first phase
//! deadline that passes. The deadline is looked at again only when a timer
//! fires, at most every `min(send, read)`, so a long upload costs one timer
//! per period, not one per frame.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use admin_api::model::Timeout;

/// Connect/send/read timeout when neither route nor upstream sets one
/// (nginx's `proxy_*_timeout` default, which APISIX keeps).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest timeout honoured; larger configured values are capped to it.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Per-phase timeouts, seconds converted once.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub send: Duration,
    pub read: Duration,
}

impl Timeouts {
    pub fn from_conf(t: Option<&Timeout>) -> Option<Self> {
        let secs =
            |v: f64| Duration::try_from_secs_f64(v).map_or(MAX_TIMEOUT, |d| d.min(MAX_TIMEOUT));
        t.map(|t| Timeouts {
            connect: secs(t.connect),
            send: secs(t.send),
            read: secs(t.read),
        })
    }

    /// How long to wait for a response head: connecting plus reading.
    pub fn response_head(&self) -> Duration {
        self.connect.saturating_add(self.read)
    }

    pub const DEFAULT: Timeouts = Timeouts {
        connect: DEFAULT_TIMEOUT,
        send: DEFAULT_TIMEOUT,
        read: DEFAULT_TIMEOUT,
    };
}

/// Stage values kept in the low bits of [`Progress::stage`].
const NOT_STARTED: u64 = 0;
/// A frame was handed over; hyper has not asked for the next one.
const HANDED_OVER: u64 = 1;
/// hyper asked for more and the client has not sent it yet.
const AWAITING_CLIENT: u64 = 2;
/// The whole body has been handed over.
const DONE: u64 = 3;
/// The request was complete before it was sent (buffered or empty body).
const COMPLETE_FROM_START: u64 = 4;
/// Bits of [`Progress::stage`] that hold the stage.
const STAGE_BITS: u32 = 3;

/// How far a request body has got; shared by [`SendWatch`] and
/// [`within_phases`].
#[derive(Debug)]
pub struct Progress {
    origin: Instant,
    /// The stage (low [`STAGE_BITS`] bits) and when it began, in
    /// microseconds since `origin` (the rest): one word, so that a reader
    /// never pairs a new stage with an old time.
    stage: AtomicU64,
    /// When a connection was assigned (new or pooled), in microseconds
    /// since `origin`, plus one; 0 while still waiting for one.
    connected: AtomicU64,
}

impl Progress {
    fn new(done: bool) -> Self {
        Progress {
            origin: plugins::clock::now(),
            stage: AtomicU64::new(if done {
                COMPLETE_FROM_START
            } else {
                NOT_STARTED
            }),
            connected: AtomicU64::new(0),
        }
    }

    fn micros(&self) -> u64 {
        self.origin.elapsed().as_micros().min(u64::MAX as u128 - 1) as u64
    }

    /// The request has a connection: connecting is over (`true`), or it
    /// has to connect again (`false`).
    pub fn mark_connected(&self, connected: bool) {
        let at = if connected { self.micros() + 1 } else { 0 };
        self.connected.store(at, Ordering::Relaxed);
    }

    /// Progress of a request whose body is already complete (buffered or
    /// empty): only `connect` and `read` apply.
    pub fn complete() -> Self {
        Progress::new(true)
    }

    fn set(&self, stage: u64) {
        let since = self.micros().min(u64::MAX >> STAGE_BITS);
        self.stage
            .store(since << STAGE_BITS | stage, Ordering::Relaxed);
    }

    /// The deadline of the current phase, or `None` while the client is
    /// the one keeping the request waiting.
    fn deadline(&self, t: &Timeouts) -> Option<Instant> {
        let word = self.stage.load(Ordering::Relaxed);
        let stage = word & ((1 << STAGE_BITS) - 1);
        let since = self.origin + Duration::from_micros(word >> STAGE_BITS);
        let connected = match self.connected.load(Ordering::Relaxed) {
            0 => None,
            n => Some(self.origin + Duration::from_micros(n - 1)),
        };
        match (stage, connected) {
            // Connecting (bounded by the connector), then writing the head.
            (NOT_STARTED, None) => Some(self.origin + t.connect.saturating_add(t.send)),
            (NOT_STARTED, Some(at)) => Some(at + t.send),
            (HANDED_OVER, _) => Some(since + t.send),
            (AWAITING_CLIENT, _) => None,
            (DONE, _) => Some(since + t.read),
            // Complete from the start: connecting, then the answer.
            (_, None) => Some(self.origin + t.response_head()),
            (_, Some(at)) => Some(at + t.read),
        }
    }
}

/// One try's [`Progress`]: its own when the body is already complete (no
/// allocation for the usual request), shared with a [`SendWatch`] when the
/// body streams.
pub enum TryProgress {
    Own(Progress),
    Shared(Arc<Progress>),
}

impl std::ops::Deref for TryProgress {
    type Target = Progress;

    fn deref(&self) -> &Progress {
        match self {
            TryProgress::Own(p) => p,
            TryProgress::Shared(p) => p,
        }
    }
}

/// A request body that reports its progress to a [`Progress`].
pub struct SendWatch<B> {
    inner: B,
    progress: Arc<Progress>,
}

impl<B: Body> SendWatch<B> {
    pub fn new(inner: B) -> (Self, Arc<Progress>) {
        let progress = Arc::new(Progress::new(inner.is_end_stream()));
        (
            SendWatch {
                inner,
                progress: progress.clone(),
            },
            progress,
        )
    }
}

impl<B: Body + Unpin> Body for SendWatch<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        match &poll {
            Poll::Pending => this.progress.set(AWAITING_CLIENT),
            Poll::Ready(Some(Ok(_))) if !this.inner.is_end_stream() => {
                this.progress.set(HANDED_OVER);
            }
            Poll::Ready(_) => this.progress.set(DONE),
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

/// Shortest interval between two looks at the phase deadline.
const MIN_STEP: Duration = Duration::from_millis(1);

/// The exchange took longer than one of its phases allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseTimeout;

/// Runs `exchange`, failing it once the current phase's deadline passes.
/// `connected` resolves (true) once the request has been given a
/// connection, new or pooled: from then on `connect` no longer counts (a
/// pool may instead call [`Progress::mark_connected`] itself).
///
/// A hand-written future rather than an `async fn`: the exchange is the
/// largest part of every proxied request's state, and an `async fn` would
/// hold it twice (its argument and its pinned copy), which every caller up
/// the chain then carries and copies.
pub fn within_phases<'a, F: Future, C: Future<Output = bool>>(
    exchange: F,
    connected: C,
    progress: &'a Progress,
    timeouts: &'a Timeouts,
) -> WithinPhases<'a, F, C> {
    // A phase that starts at time c ends no earlier than c + `step`, so
    // looking again at least every `step` never notices a deadline late,
    // even one that moved earlier than the one being slept towards. The
    // floor keeps sub-millisecond timeouts from turning this into a spin.
    let step = timeouts.send.min(timeouts.read).max(MIN_STEP);
    WithinPhases {
        exchange,
        connected,
        timer: tokio::time::sleep_until(next_look(plugins::clock::now(), progress, timeouts, step)),
        connecting: true,
        step,
        progress,
        timeouts,
    }
}

/// When to look at the phase deadline next, `now` being now.
fn next_look(now: Instant, progress: &Progress, timeouts: &Timeouts, step: Duration) -> Instant {
    let next = now + step;
    progress
        .deadline(timeouts)
        .map_or(next, |deadline| deadline.min(next))
}

pin_project_lite::pin_project! {
    /// The future of [`within_phases`].
    pub struct WithinPhases<'a, F, C> {
        #[pin]
        exchange: F,
        #[pin]
        connected: C,
        #[pin]
        timer: tokio::time::Sleep,
        connecting: bool,
        step: Duration,
        progress: &'a Progress,
        timeouts: &'a Timeouts,
    }
}

impl<F: Future, C: Future<Output = bool>> Future for WithinPhases<'_, F, C> {
    type Output = Result<F::Output, PhaseTimeout>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(out) = this.exchange.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        if *this.connecting {
            if let Poll::Ready(has) = this.connected.poll(cx) {
                *this.connecting = false;
                if has {
                    this.progress.mark_connected(true);
                }
                // The phase changed: so may the deadline.
                let wake = next_look(
                    plugins::clock::now(),
                    this.progress,
                    this.timeouts,
                    *this.step,
                );
                this.timer.as_mut().reset(wake);
            }
        }
        while this.timer.as_mut().poll(cx).is_ready() {
            // A fresh reading, not the poll's: this loop must see time pass.
            let now = Instant::now();
            let deadline = this.progress.deadline(this.timeouts);
            if deadline.is_some_and(|d| d <= now) {
                return Poll::Ready(Err(PhaseTimeout));
            }
            let wake = next_look(now, this.progress, this.timeouts, *this.step);
            this.timer.as_mut().reset(wake);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, StreamBody};

    fn timeouts(connect: u64, send: u64, read: u64) -> Timeouts {
        Timeouts {
            connect: Duration::from_millis(connect),
            send: Duration::from_millis(send),
            read: Duration::from_millis(read),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn body_less_request_waits_connect_plus_read() {
        let p = Progress::complete();
        let t = timeouts(100, 50, 200);
        let slow = tokio::time::sleep(Duration::from_millis(290));
        assert!(within_phases(slow, std::future::pending(), &p, &t)
            .await
            .is_ok());
        let slower = tokio::time::sleep(Duration::from_millis(310));
        let p = Progress::complete();
        assert_eq!(
            within_phases(slower, std::future::pending(), &p, &t).await,
            Err(PhaseTimeout)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_upload_outlives_every_single_timeout() {
        // A client body that yields a frame every 40 ms for 1 s, with
        // connect, send and read of 100 ms each: never a stall.
        let frames = futures_util::stream::unfold(0u32, |n| async move {
            if n == 25 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
            Some((
                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"x"))),
                n + 1,
            ))
        });
        let (body, progress) = SendWatch::new(StreamBody::new(Box::pin(frames)));
        let t = timeouts(100, 100, 100);
        let exchange = async move { body.collect().await.map(|b| b.to_bytes().len()) };
        let sent = within_phases(exchange, std::future::pending(), &progress, &t).await;
        assert!(matches!(sent, Ok(Ok(25))), "{sent:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_that_stops_taking_the_body_times_out_after_send() {
        let (mut body, progress) = SendWatch::new(StreamBody::new(futures_util::stream::iter(
            [Ok::<_, std::convert::Infallible>(Frame::data(
                Bytes::from_static(b"a"),
            ))]
            .into_iter()
            .chain(std::iter::repeat_with(|| {
                Ok(Frame::data(Bytes::from_static(b"b")))
            })),
        )));
        let t = timeouts(1000, 100, 5000);
        let started = Instant::now();
        // Takes one frame, then never asks again: the upstream is full.
        let exchange = async move {
            let _ = body.frame().await;
            std::future::pending::<()>().await
        };
        assert_eq!(
            within_phases(exchange, std::future::pending(), &progress, &t).await,
            Err(PhaseTimeout)
        );
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(100) && waited < Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_body_the_answer_has_read_to_arrive() {
        let (mut body, progress) = SendWatch::new(Full::new(Bytes::from_static(b"abc")));
        let t = timeouts(1000, 1000, 100);
        let started = Instant::now();
        let exchange = async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = body.frame().await;
            std::future::pending::<()>().await
        };
        assert_eq!(
            within_phases(exchange, std::future::pending(), &progress, &t).await,
            Err(PhaseTimeout)
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(150) && waited < Duration::from_millis(300),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn once_connected_only_read_bounds_the_answer() {
        let p = Progress::complete();
        let t = timeouts(1000, 1000, 100);
        let started = Instant::now();
        let connected = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            true
        };
        let never = std::future::pending::<()>();
        assert_eq!(
            within_phases(never, connected, &p, &t).await,
            Err(PhaseTimeout)
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_millis(450),
            "{waited:?}"
        );
    }
}
