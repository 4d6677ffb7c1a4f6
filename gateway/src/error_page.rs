//! The gateway's own answers: the nginx-style HTML page APISIX clients see
//! for 4xx/5xx that no upstream produced, and the `X-APISIX-Upstream-Status`
//! header listing the tries behind an answer.

use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use plugins::ResponseBody;

/// Every try's status, as nginx's `$upstream_status` (`502, 200`).
pub const X_APISIX_UPSTREAM_STATUS: HeaderName =
    HeaderName::from_static("x-apisix-upstream-status");

/// `502, 200`: the value of [`X_APISIX_UPSTREAM_STATUS`] for `statuses`;
/// `None` only if the text were not a valid header value.
pub fn status_list(statuses: &[u16]) -> Option<HeaderValue> {
    let text = statuses
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    HeaderValue::from_str(&text).ok()
}

/// The gateway's own error page for `status` (nginx-style HTML, which is what
/// APISIX clients see for 502/504), with `X-APISIX-Upstream-Status` listing
/// the tries when upstreams were contacted.
pub fn error_page(status: StatusCode, upstream_statuses: Option<&[u16]>) -> Response<ResponseBody> {
    let mut resp = plugins::html_page(status);
    if let Some(v) = upstream_statuses.and_then(status_list) {
        resp.headers_mut().insert(X_APISIX_UPSTREAM_STATUS, v);
    }
    resp
}

/// Marks a response as the last on its connection (nginx closes after 400,
/// 408, 413, 414 and 501).
pub fn with_close(mut resp: Response<ResponseBody>) -> Response<ResponseBody> {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_pages() {
        let r = error_page(StatusCode::GATEWAY_TIMEOUT, Some(&[504]));
        assert_eq!(r.status(), 504);
        assert_eq!(r.headers()["x-apisix-upstream-status"], "504");
        let r = error_page(StatusCode::BAD_GATEWAY, Some(&[502, 502]));
        assert_eq!(r.headers()["x-apisix-upstream-status"], "502, 502");
        let r = error_page(StatusCode::BAD_GATEWAY, None);
        assert!(!r.headers().contains_key("x-apisix-upstream-status"));
    }
}
