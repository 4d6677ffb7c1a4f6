//! Graceful stop for client connections: every connection holds a
//! [`Watch`]; [`Drain::shutdown`] tells them all to finish the request in
//! hand and close, then waits until the last one has gone.
//!
//! Works with any connection that can be asked to stop after its current
//! request ([`Graceful`]), HTTP/1 with upgrades included.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;

use hyper::body::Incoming;
use hyper::service::HttpService;
use tokio::sync::watch;

/// The sending side, held by the gateway.
pub struct Drain {
    tx: watch::Sender<bool>,
    /// Set before the signal is sent (and when the drain is dropped): a
    /// connection reads it on every wake-up instead of polling the signal.
    stop: Arc<AtomicBool>,
}

/// One connection's view of the drain signal.
#[derive(Clone)]
pub struct Watch {
    rx: watch::Receiver<bool>,
    stop: Arc<AtomicBool>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain::new()
    }
}

impl Drain {
    pub fn new() -> Self {
        Drain {
            tx: watch::Sender::new(false),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A handle for one more connection; [`Drain::shutdown`] waits for it.
    pub fn watcher(&self) -> Watch {
        Watch {
            rx: self.tx.subscribe(),
            stop: self.stop.clone(),
        }
    }

    /// Signals every connection, then waits until all their watches are
    /// dropped. Returns at once when there are none.
    pub async fn shutdown(self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.tx.send(true);
        self.tx.closed().await;
    }
}

impl Drop for Drain {
    /// A drain that goes away stops its connections too (the signal resolves
    /// when its sender is dropped).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

impl Watch {
    /// Resolves once a stop was signalled (or the [`Drain`] is gone).
    ///
    /// The signal itself is polled once, which registers the task to be
    /// woken by it, and after that only on a wake-up that finds the stop flag
    /// set: polling it takes a lock, and a connection's task is woken several
    /// times per request.
    pub async fn signalled(&mut self) {
        self.signalled_while(|| true).await
    }

    /// Resolves once a stop was signalled, as [`Watch::signalled`] does, but
    /// waits on the signal only from the first poll that finds `idle()`
    /// true. A busy connection's task is woken by its own progress, and
    /// every wake-up looks at the stop flag; only an idle one, which nothing
    /// else would wake, needs the signal's wake-up. Waiting on it takes a
    /// lock to start and another to stop, which a connection that is never
    /// idle (one request, then close) is spared.
    pub async fn signalled_while(&mut self, idle: impl Fn() -> bool) {
        let stop = &self.stop;
        let wait = self.rx.wait_for(|stop| *stop);
        let mut wait = std::pin::pin!(wait);
        let mut waiting = false;
        std::future::poll_fn(move |cx| {
            if stop.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            // Waiting already, the signal wakes the task; busy, its own
            // progress does.
            if waiting || !idle() {
                return Poll::Pending;
            }
            waiting = true;
            wait.as_mut().poll(cx).map(|_| ())
        })
        .await
    }

    /// Whether a stop was signalled already.
    pub fn is_signalled(&self) -> bool {
        self.stop.load(Ordering::Acquire) || *self.rx.borrow()
    }

    /// Drives `conn` to its end; when a stop is signalled first, asks it to
    /// finish what it has in hand and keeps driving it until it does.
    pub async fn serve<C: Graceful>(mut self, conn: C) -> C::Output {
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            biased;
            out = conn.as_mut() => return out,
            () = self.signalled() => conn.as_mut().graceful_shutdown(),
        }
        conn.await
    }
}

/// A connection that can be told to stop after the request in hand.
pub trait Graceful: Future {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

/// A boxed connection: lets each protocol's connection be boxed on its
/// own, so a task is sized for the protocol it serves.
impl<C: Graceful + ?Sized> Graceful for Pin<Box<C>> {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        self.get_mut().as_mut().graceful_shutdown();
    }
}

/// A connection served through a borrow: its owner keeps it past the end
/// of the serving (to act on how it ended before the socket closes).
impl<C: Graceful + ?Sized> Graceful for Pin<&mut C> {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        self.get_mut().as_mut().graceful_shutdown();
    }
}

impl<I, S, B> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

impl<I, S, B> Graceful for hyper::server::conn::http1::Connection<I, S>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::Connection::graceful_shutdown(self);
    }
}

impl<I, S, B, E> Graceful for hyper::server::conn::http2::Connection<I, S, E>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Context;
    use std::time::Duration;

    /// A connection pending until asked to stop, then ready on the next
    /// poll. `busy`: it asks to be polled again each time (a connection with
    /// work in hand); otherwise it waits to be woken by somebody else.
    #[derive(Default)]
    struct Fake {
        busy: bool,
        asked: Arc<AtomicBool>,
        polls: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Future for Fake {
        type Output = &'static str;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<&'static str> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.asked.load(Ordering::SeqCst) {
                return Poll::Ready("finished");
            }
            if self.busy {
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        }
    }

    impl Graceful for Fake {
        fn graceful_shutdown(self: Pin<&mut Self>) {
            self.asked.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn shutdown_asks_each_connection_and_waits_for_it() {
        let drain = Drain::new();
        let asked = Arc::new(AtomicBool::new(false));
        let conn = tokio::spawn(drain.watcher().serve(Fake {
            busy: true,
            asked: asked.clone(),
            ..Fake::default()
        }));
        tokio::time::timeout(Duration::from_secs(5), drain.shutdown())
            .await
            .expect("drain finished");
        assert!(asked.load(Ordering::SeqCst));
        assert_eq!(conn.await.expect("task"), "finished");
    }

    #[tokio::test]
    async fn a_parked_connection_is_woken_by_the_shutdown() {
        let drain = Drain::new();
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let conn = tokio::spawn(drain.watcher().serve(Fake {
            polls: polls.clone(),
            ..Fake::default()
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled once, then parked");
        tokio::time::timeout(Duration::from_secs(5), drain.shutdown())
            .await
            .expect("drain finished");
        assert_eq!(conn.await.expect("task"), "finished");
    }

    #[tokio::test]
    async fn a_dropped_drain_stops_its_connections() {
        let drain = Drain::new();
        let asked = Arc::new(AtomicBool::new(false));
        let conn = tokio::spawn(drain.watcher().serve(Fake {
            asked: asked.clone(),
            ..Fake::default()
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(drain);
        let out = tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("stopped");
        assert_eq!(out.expect("task"), "finished");
        assert!(asked.load(Ordering::SeqCst));
    }

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A waker and the count of its wake-ups.
    fn counting_waker() -> (Arc<Count>, std::task::Waker) {
        let woken = Arc::new(Count::default());
        (woken.clone(), std::task::Waker::from(woken))
    }

    /// Polls `drain`'s shutdown once: the stop is signalled, and the
    /// shutdown then waits for the watches.
    fn signal(drain: Drain) {
        let mut shutdown = std::pin::pin!(drain.shutdown());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(shutdown.as_mut().poll(&mut cx).is_pending());
    }

    #[test]
    fn a_busy_connection_does_not_wait_on_the_signal_but_sees_it_when_polled() {
        let drain = Drain::new();
        let mut watch = drain.watcher();
        let (woken, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let mut stopped = std::pin::pin!(watch.signalled_while(|| false));
        assert!(stopped.as_mut().poll(&mut cx).is_pending());
        signal(drain);
        assert_eq!(
            woken.0.load(Ordering::SeqCst),
            0,
            "nothing waited on the signal"
        );
        assert!(
            stopped.as_mut().poll(&mut cx).is_ready(),
            "its next wake-up sees the stop"
        );
    }

    #[test]
    fn an_idle_connection_is_woken_by_the_signal() {
        let drain = Drain::new();
        let mut watch = drain.watcher();
        let (woken, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let idle = std::cell::Cell::new(false);
        let mut stopped = std::pin::pin!(watch.signalled_while(|| idle.get()));
        assert!(stopped.as_mut().poll(&mut cx).is_pending());
        idle.set(true);
        assert!(stopped.as_mut().poll(&mut cx).is_pending());
        signal(drain);
        assert!(woken.0.load(Ordering::SeqCst) > 0, "woken by the signal");
        assert!(stopped.as_mut().poll(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn shutdown_with_no_connections_returns_at_once() {
        let drain = Drain::new();
        let watch = drain.watcher();
        assert!(!watch.is_signalled());
        drop(watch);
        tokio::time::timeout(Duration::from_secs(1), drain.shutdown())
            .await
            .expect("nothing to wait for");
    }
}
