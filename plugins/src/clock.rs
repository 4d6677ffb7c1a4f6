//! One clock read per task poll, as nginx reads its clock once per event
//! loop turn.
//!
//! A proxied request asks for the time in several places within the same
//! poll (the context's start, the upstream phase deadlines, the pooled
//! connection's idle check, the try's start, ...), and each
//! `clock_gettime` costs about 25 ns. Inside a [`Fresh`] poll, [`now`]
//! reads the clock the first time and hands out that reading afterwards;
//! everything that runs in one poll runs within microseconds, well below
//! the millisecond resolution of the timers and logs that use it.
//! Outside a [`Fresh`] poll (other tasks, blocking threads, tests),
//! [`now`] reads the clock every time.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::Instant;

/// Where this thread is: outside any [`Fresh`] poll, or inside one with the
/// reading taken so far.
#[derive(Clone, Copy)]
enum Scope {
    Outside,
    Inside(Option<Instant>),
}

thread_local! {
    static SCOPE: Cell<Scope> = const { Cell::new(Scope::Outside) };
}

/// The time: the reading already taken in this [`Fresh`] poll, or a new one.
/// A `tokio::time::Instant`, so that tests with a paused clock see their
/// clock.
pub fn now() -> Instant {
    SCOPE.with(|scope| match scope.get() {
        Scope::Inside(Some(taken)) => taken,
        Scope::Inside(None) => {
            let taken = Instant::now();
            scope.set(Scope::Inside(Some(taken)));
            taken
        }
        Scope::Outside => Instant::now(),
    })
}

/// [`now`] as a `std::time::Instant`, for times measured with `elapsed()`.
/// Outside a [`Fresh`] poll it is `std::time::Instant::now()`, so that a
/// test that pauses tokio's clock still measures real time with it.
pub fn std_now() -> std::time::Instant {
    SCOPE.with(|scope| match scope.get() {
        Scope::Outside => std::time::Instant::now(),
        Scope::Inside(_) => now().into_std(),
    })
}

pin_project_lite::pin_project! {
    /// Polls `inner` with [`now`] answering from one reading per poll.
    pub struct Fresh<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Fresh<F> {
    pub fn new(inner: F) -> Self {
        Fresh { inner }
    }
}

/// Puts the thread back as it was when the poll ends, unwinding included.
struct Restore(Scope);

impl Drop for Restore {
    fn drop(&mut self) {
        SCOPE.with(|scope| scope.set(self.0));
    }
}

impl<F: Future> Future for Fresh<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _restore = Restore(SCOPE.with(|scope| scope.replace(Scope::Inside(None))));
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn one_reading_per_poll_and_a_new_one_next_poll() {
        let seen = Fresh::new(async {
            let first = now();
            // `advance` yields: what follows runs in a later poll.
            tokio::time::advance(Duration::from_millis(5)).await;
            let second = now();
            let third = now();
            (first, second, third)
        })
        .await;
        assert_eq!(seen.1, seen.2, "the same poll, the same reading");
        assert!(seen.1 - seen.0 >= Duration::from_millis(5));
    }

    #[test]
    fn outside_a_fresh_poll_every_call_reads_the_clock() {
        let a = now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(now() - a >= Duration::from_millis(2));
    }

    #[test]
    fn the_scope_ends_with_the_poll() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut fresh = std::pin::pin!(Fresh::new(async {
            let a = now();
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(now(), a);
        }));
        assert!(fresh.as_mut().poll(&mut cx).is_ready());
        let b = now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(now() > b);
    }
}
