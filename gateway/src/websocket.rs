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
/// upgraded connections until either side closes.
pub fn splice(
    client_side: OnUpgrade,
    mut upstream: Upgraded,
    upstream_headers: &HeaderMap,
) -> Response<ResponseBody> {
    tokio::spawn(async move {
        match client_side.await {
            Ok(client) => {
                let mut client = hyper_util::rt::TokioIo::new(client);
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    tracing::debug!(error = %e, "websocket connection ended");
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

    #[test]
    fn disabled_routes_leave_the_upgrade_alone() {
        let h = headers(&[("upgrade", "websocket"), ("connection", "upgrade")]);
        let mut ext = http::Extensions::new();
        assert!(take_client_upgrade(false, &h, &mut ext).is_none());
    }
}
