//! How long an HTTP/1 connection may wait for its next request head
//! (`client_header_timeout`, and `keepalive_timeout` between requests).
//!
//! hyper can time that wait itself, but it arms a fresh timer for every
//! request: allocated, put into the runtime's timer wheel when the head is
//! awaited and taken out again when it has arrived, about a thousand
//! instructions and an allocation per request. [`HeadWait`] instead looks
//! at the connection's [`Activity`] once every [`STEPS`]th of the limit,
//! with one timer per connection that is re-armed only when it fires. A
//! wait is cut off at the first check that finds it has lasted a whole
//! limit: between the limit and one step more after it began. It never
//! ends early.
//!
//! The timer is first armed when the connection is first seen waiting, not
//! when it is accepted: a client whose request came with its connection
//! (the usual case) is answered before it ever waits, and one that closes
//! after that answer never puts a timer into the runtime's wheel at all.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::park::Activity;

/// Checks per limit: a wait ends at most an eighth of the limit late.
pub const STEPS: u32 = 8;

/// The shortest step, so that a tiny limit does not spin the timer.
const MIN_STEP: Duration = Duration::from_millis(5);

/// The wait for request heads on one connection; see the module docs.
pub struct HeadWait<'a> {
    timer: Pin<&'a mut Sleep>,
    step: Duration,
    /// The timer has been polled since it was last set, so it will wake
    /// the connection's task when it fires.
    registered: bool,
    /// The request count at the last check.
    seen: u64,
    /// The connection was waiting for a head at the last check.
    was_waiting: bool,
    /// Whole steps the current wait is known to have lasted.
    covered: u32,
    /// The timer has been set since the last [`HeadWait::restart`]; until
    /// then no wait has been seen and nothing needs timing.
    armed: bool,
}

impl<'a> HeadWait<'a> {
    /// A wait bounded by `limit`, checked with `timer`. Call
    /// [`HeadWait::restart`] before polling.
    pub fn new(timer: Pin<&'a mut Sleep>, limit: Duration) -> Self {
        HeadWait {
            timer,
            step: (limit / STEPS).max(MIN_STEP),
            registered: false,
            seen: 0,
            was_waiting: false,
            covered: 0,
            armed: false,
        }
    }

    /// Starts over for a connection that may be waiting for a head (a new
    /// one, or one just taken back from parking). The count starts at the
    /// first [`HeadWait::poll_expired`] that finds the connection waiting.
    pub fn restart(&mut self) {
        self.armed = false;
    }

    fn arm(&mut self) {
        self.timer.as_mut().reset(Instant::now() + self.step);
        self.registered = false;
        self.armed = true;
    }

    /// Ready once the connection has waited a whole limit for a request
    /// head. Cheap while no step has passed: the timer is polled only to
    /// register the task's waker after it is set, not at every wake-up.
    ///
    /// Until the connection is first seen waiting, this sets no timer: it
    /// must be polled again whenever the connection's state may have
    /// changed, as the connection's own task does after each poll of it.
    pub fn poll_expired(&mut self, activity: &Activity, cx: &mut Context<'_>) -> Poll<()> {
        if !self.armed {
            if !activity.is_between_requests() {
                return Poll::Pending;
            }
            // The wait is counted from here, never from earlier: it may
            // end late by the time since it began, never early.
            self.seen = activity.begun();
            self.was_waiting = true;
            self.covered = 0;
            self.arm();
        }
        loop {
            if !self.registered {
                self.registered = true;
                if self.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            } else if !self.timer.is_elapsed() {
                return Poll::Pending;
            }
            let waiting = activity.is_between_requests();
            let begun = activity.begun();
            if waiting && self.was_waiting && begun == self.seen {
                self.covered += 1;
            } else {
                // A wait that began since the last check may be up to a
                // step old already; it is counted from here, never early.
                self.covered = 0;
            }
            self.was_waiting = waiting;
            self.seen = begun;
            if self.covered >= STEPS {
                return Poll::Ready(());
            }
            self.arm();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::sync::Arc;

    /// Polls `wait` until it expires; returns how long that took.
    async fn expires(wait: &mut HeadWait<'_>, activity: &Activity) -> Duration {
        let start = Instant::now();
        poll_fn(|cx| wait.poll_expired(activity, cx)).await;
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_expires_after_the_limit_and_not_before() {
        let activity = Activity::default();
        let timer = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
        let mut wait = HeadWait::new(timer, Duration::from_secs(8));
        wait.restart();
        assert_eq!(expires(&mut wait, &activity).await, Duration::from_secs(8));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_start_the_count_again_and_open_ones_stop_it() {
        let activity = Arc::new(Activity::default());
        let timer = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
        let mut wait = HeadWait::new(timer, Duration::from_secs(8));
        wait.restart();
        let checking = async {
            let start = Instant::now();
            poll_fn(|cx| wait.poll_expired(&activity, cx)).await;
            start.elapsed()
        };
        let traffic = async {
            // A request at 2.5 s that is answered at 20.5 s: the wait for
            // the next head begins then, and is known from the check at 21 s.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let (exchange, _) = activity.begin();
            tokio::time::sleep(Duration::from_secs(18)).await;
            drop(exchange);
        };
        let (lasted, ()) = tokio::join!(checking, traffic);
        assert_eq!(lasted, Duration::from_secs(21 + 8));
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_timed_until_the_connection_is_first_seen_waiting() {
        let activity = Arc::new(Activity::default());
        let timer = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
        let mut wait = HeadWait::new(timer, Duration::from_secs(8));
        wait.restart();
        // The request came with the connection and takes 20 s to answer.
        let (exchange, _) = activity.begin();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(wait.poll_expired(&activity, &mut cx).is_pending());
        assert!(!wait.armed, "a timer was set for a connection not waiting");
        tokio::time::sleep(Duration::from_secs(20)).await;
        drop(exchange);
        // Polled again once the answer is out: the wait counts from there.
        assert_eq!(expires(&mut wait, &activity).await, Duration::from_secs(8));
    }

    #[tokio::test(start_paused = true)]
    async fn a_tiny_limit_steps_no_faster_than_the_minimum() {
        let activity = Activity::default();
        let timer = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
        let mut wait = HeadWait::new(timer, Duration::ZERO);
        wait.restart();
        assert_eq!(expires(&mut wait, &activity).await, MIN_STEP * STEPS);
    }
}
