//! A future as the `Result<_, Infallible>` a tower service answers with.
//!
//! `futures_util`'s `map(Ok)` would do the same, but its `Map` moves its
//! whole state out when the inner future finishes (to call the function it
//! holds), and the proxy's future is kilobytes: one copy of it per request
//! for nothing. This wrapper has nothing to take out.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

pin_project_lite::pin_project! {
    /// `inner`'s output as `Ok`.
    pub struct NeverFails<F> {
        #[pin]
        inner: F,
    }
}

impl<F> NeverFails<F> {
    pub fn new(inner: F) -> Self {
        NeverFails { inner }
    }
}

impl<F: Future> Future for NeverFails<F> {
    type Output = Result<F::Output, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx).map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_the_inner_output_as_ok() {
        let answered = NeverFails::new(async { 7 }).await;
        assert_eq!(answered, Ok(7));
    }
}
