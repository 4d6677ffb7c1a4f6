//! WebSocket pass-through (`enable_websocket`): the client's upgrade is
//! asked of the upstream again (the header policy strips hop-by-hop
//! `Upgrade`/`Connection`), and once the upstream answers 101 the two
//! upgraded connections are spliced until either side closes.
//!
//! Failure modes: an upgrade that fails on either side after the 101 is
//! logged and both connections are dropped; the client has its 101 already.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use hyper::upgrade::OnUpgrade;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::h1_upstream::Upgraded;

use plugins::{full_body, ResponseBody};

/// The client side of an upgrade, when the route allows WebSocket
/// (`enabled`) and the request asks for one; taken out of `extensions` so
/// that only the proxy can complete it. `None` otherwise.
pub fn take_client_upgrade(
    enabled: bool,
    headers: &HeaderMap,
    extensions: &mut http::Extensions,
) -> Option<OnUpgrade> {
    if enabled && wants_websocket(headers) {
        extensions.remove::<OnUpgrade>()
    } else {
        None
    }
}

/// Asks the upstream for the upgrade the client asked for; goes after the
/// header policy, which removes both headers as hop-by-hop.
pub fn request_upgrade(headers: &mut HeaderMap) {
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// `Upgrade: websocket` with `Connection: upgrade`.
fn wants_websocket(headers: &HeaderMap) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has_token(header::UPGRADE, "websocket") && has_token(header::CONNECTION, "upgrade")
}

/// Answers 101 to the client and copies bytes both ways between the two
/// upgraded connections until either side closes, or until nothing has
/// gone either way for `idle` (the route's upstream `read` timeout, 60 s by
/// default: nginx's `proxy_read_timeout` ends a quiet WebSocket the same
/// way, so clients that keep one open send pings).
pub fn splice(
    client_side: OnUpgrade,
    upstream: Upgraded,
    upstream_headers: &HeaderMap,
    idle: Duration,
) -> Response<ResponseBody> {
    tokio::spawn(async move {
        match client_side.await {
            Ok(client) => {
                let client = hyper_util::rt::TokioIo::new(client);
                match tunnel(client, upstream, idle).await {
                    Ok(true) => {}
                    Ok(false) => tracing::debug!(?idle, "websocket connection closed: idle"),
                    Err(e) => tracing::debug!(error = %e, "websocket connection ended"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "websocket upgrade failed"),
        }
    });
    let mut out = Response::new(full_body(Bytes::new()));
    *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    for (name, value) in upstream_headers {
        if name != header::CONTENT_LENGTH && name != header::TRANSFER_ENCODING {
            out.headers_mut().append(name.clone(), value.clone());
        }
    }
    out
}

/// Copies both ways until both sides have closed (`Ok(true)`), or until no
/// byte has been read on either side for a whole `idle` (`Ok(false)`; both
/// are dropped). Progress is looked at once per `idle`, so a quiet tunnel
/// goes after one to two of it and busy ones pay no timer per read.
async fn tunnel<A, B>(client: A, upstream: B, idle: Duration) -> std::io::Result<bool>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let reads = AtomicU64::new(0);
    let mut client = Counted {
        io: client,
        reads: &reads,
    };
    let mut upstream = Counted {
        io: upstream,
        reads: &reads,
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    let mut copy = std::pin::pin!(copy);
    let mut seen = 0;
    loop {
        tokio::select! {
            done = copy.as_mut() => return done.map(|_| true),
            () = tokio::time::sleep(idle) => {
                let now = reads.load(Ordering::Relaxed);
                if now == seen {
                    return Ok(false);
                }
                seen = now;
            }
        }
    }
}

/// An I/O object that counts the reads that brought bytes.
struct Counted<'a, T> {
    io: T,
    reads: &'a AtomicU64,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.reads.fetch_add(1, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_static(value));
        }
        h
    }

    #[test]
    fn websocket_needs_both_tokens() {
        assert!(wants_websocket(&headers(&[
            ("upgrade", "WebSocket"),
            ("connection", "keep-alive, Upgrade"),
        ])));
        assert!(!wants_websocket(&headers(&[("upgrade", "websocket")])));
        assert!(!wants_websocket(&headers(&[("connection", "upgrade")])));
        assert!(!wants_websocket(&headers(&[
            ("upgrade", "h2c"),
            ("connection", "upgrade"),
        ])));
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_tunnel_is_closed_and_a_busy_one_kept() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let idle = Duration::from_secs(60);

        let (client, _client_far) = tokio::io::duplex(64);
        let (upstream, _upstream_far) = tokio::io::duplex(64);
        let started = tokio::time::Instant::now();
        assert!(!tunnel(client, upstream, idle).await.unwrap());
        let waited = started.elapsed();
        assert!(waited >= idle && waited <= 2 * idle, "{waited:?}");

        let (client, mut client_far) = tokio::io::duplex(64);
        let (upstream, mut upstream_far) = tokio::io::duplex(64);
        let spliced = tokio::spawn(tunnel(client, upstream, idle));
        for _ in 0..6 {
            tokio::time::sleep(idle / 2).await;
            client_far.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            upstream_far.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");
        }
        assert!(!spliced.is_finished(), "a tunnel in use was closed");
        drop(client_far);
        drop(upstream_far);
        assert!(spliced.await.unwrap().unwrap(), "both sides closed");
    }

    #[test]
    fn disabled_routes_leave_the_upgrade_alone() {
        let h = headers(&[("upgrade", "websocket"), ("connection", "upgrade")]);
        let mut ext = http::Extensions::new();
        assert!(take_client_upgrade(false, &h, &mut ext).is_none());
    }
}
