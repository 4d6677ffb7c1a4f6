//! What the data plane accepts from a client, checked at the edge before any
//! plugin or upstream sees the request. The numbers follow nginx, which is
//! what APISIX users' clients are used to.
//!
//! | check | answer |
//! |---|---|
//! | request target longer than [`MAX_REQUEST_LINE`] | 414 |
//! | one header line longer than [`MAX_HEADER_LINE`] | 400 |
//! | whole head larger than [`MAX_HEAD`] | 400 |
//! | HTTP/1.1 without `Host` | 400 |
//! | both `Content-Length` and `Transfer-Encoding` (request smuggling) | 400, found on the raw bytes by [`crate::framing`] because hyper drops the length |
//! | a transfer coding other than `chunked` | 501 |
//! | body larger than `client_max_body_size` | 413 |
//!
//! Each of these answers closes the connection, as nginx does, so nothing
//! the client sent after the bad head is ever read as another request.
//! Differing duplicate `Content-Length` headers, bad chunk sizes and invalid
//! header names are refused with 400 by hyper's parser itself.

use std::time::Duration;

use http::{header, HeaderMap, Method, StatusCode, Version};

/// nginx's `large_client_header_buffers 4 8k`: longest request target.
pub const MAX_REQUEST_LINE: usize = 8 * 1024;
/// Longest single header line (name, `: ` and value).
pub const MAX_HEADER_LINE: usize = 8 * 1024;
/// Largest request head (4 x 8 KiB).
pub const MAX_HEAD: usize = 32 * 1024;
/// hyper's read buffer: room for a maximal head plus the start of a body.
pub const READ_BUFFER: usize = 64 * 1024;
/// `nginx_config.http.client_body_timeout` default: longest pause between
/// two reads of a request body.
pub const DEFAULT_CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// `nginx_config.http.send_timeout` default: longest a write to a client
/// may stay blocked.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// `nginx_config.event.worker_connections` default (APISIX's): client
/// connections served at once; more are answered 503 and closed.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10620;
/// HTTP/2: concurrent streams per connection.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 128;
/// HTTP/2: streams a client may reset before the connection is closed
/// (rapid-reset floods).
pub const H2_MAX_PENDING_RESETS: usize = 20;
/// HTTP/2: largest decoded header list (HPACK counts 32 bytes per field on
/// top of name and value); hyper's own default is 16 MiB. Larger heads get
/// 431 before they are held in memory.
pub const H2_MAX_HEADER_LIST: u32 = 64 * 1024;

/// Body limits of the data plane.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// `client_max_body_size`; `None`: unlimited (APISIX's default, 0).
    pub max_size: Option<u64>,
    /// `client_body_timeout`.
    pub idle_timeout: Duration,
}

/// Header fields nginx refuses to see twice in a request (400: "client
/// sent duplicate host header", "duplicate header line"): two Hosts could
/// route by one and be read by the upstream by the other.
const SINGLE_HEADERS: &[header::HeaderName] = &[
    header::HOST,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    header::CONTENT_LENGTH,
    header::CONTENT_RANGE,
    header::IF_RANGE,
    header::TRANSFER_ENCODING,
    header::EXPECT,
    header::AUTHORIZATION,
];

/// Checks a request head; the error is the status to answer with.
pub fn check_head(
    method: &Method,
    uri: &http::Uri,
    version: Version,
    headers: &HeaderMap,
) -> Result<(), StatusCode> {
    let target_len = uri.path_and_query().map_or(0, |p| p.as_str().len());
    if target_len > MAX_REQUEST_LINE {
        return Err(StatusCode::URI_TOO_LONG);
    }
    let mut head = method.as_str().len() + target_len + 12;
    let mut previous: Option<&header::HeaderName> = None;
    for (name, value) in headers {
        let line = name.as_str().len() + 2 + value.len();
        if line > MAX_HEADER_LINE {
            return Err(StatusCode::BAD_REQUEST);
        }
        // A map's values for one name come one after another.
        if previous == Some(name) && SINGLE_HEADERS.contains(name) {
            return Err(StatusCode::BAD_REQUEST);
        }
        previous = Some(name);
        head += line + 2;
    }
    if head > MAX_HEAD {
        return Err(StatusCode::BAD_REQUEST);
    }
    if version == Version::HTTP_11 && !headers.contains_key(header::HOST) {
        return Err(StatusCode::BAD_REQUEST);
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        if headers.contains_key(header::CONTENT_LENGTH) {
            return Err(StatusCode::BAD_REQUEST);
        }
        let only_chunked = headers.get_all(header::TRANSFER_ENCODING).iter().all(|v| {
            v.to_str()
                .is_ok_and(|s| s.trim().eq_ignore_ascii_case("chunked"))
        });
        if !only_chunked || headers.get_all(header::TRANSFER_ENCODING).iter().count() != 1 {
            return Err(StatusCode::NOT_IMPLEMENTED);
        }
    }
    Ok(())
}

/// Parses nginx size syntax: `0`, `1024`, `8k`, `1m`, `1g`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1024),
        (i, 'm' | 'M') => (&s[..i], 1024 * 1024),
        (i, 'g' | 'G') => (&s[..i], 1024 * 1024 * 1024),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(uri: &str, headers: &[(&str, &str)]) -> Result<(), StatusCode> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        check_head(&Method::POST, &uri.parse().unwrap(), Version::HTTP_11, &h)
    }

    #[test]
    fn nginx_limits() {
        assert_eq!(head("/ok", &[("host", "a")]), Ok(()));
        let long = format!("/{}", "a".repeat(MAX_REQUEST_LINE));
        assert_eq!(head(&long, &[("host", "a")]), Err(StatusCode::URI_TOO_LONG));
        let big = "v".repeat(MAX_HEADER_LINE);
        assert_eq!(
            head("/", &[("host", "a"), ("x-big", &big)]),
            Err(StatusCode::BAD_REQUEST)
        );
        let mid = "v".repeat(6000);
        let many: Vec<(&str, &str)> = vec![
            ("host", "a"),
            ("x-1", &mid),
            ("x-2", &mid),
            ("x-3", &mid),
            ("x-4", &mid),
            ("x-5", &mid),
            ("x-6", &mid),
        ];
        assert_eq!(head("/", &many), Err(StatusCode::BAD_REQUEST));
        assert_eq!(
            head("/", &[]),
            Err(StatusCode::BAD_REQUEST),
            "HTTP/1.1 needs Host"
        );
    }

    #[test]
    fn fields_nginx_refuses_twice() {
        for name in [
            "host",
            "content-length",
            "authorization",
            "if-none-match",
            "expect",
        ] {
            assert_eq!(
                head("/", &[("host", "a"), (name, "1"), (name, "1")]),
                Err(StatusCode::BAD_REQUEST),
                "{name}"
            );
        }
        assert_eq!(
            head(
                "/",
                &[
                    ("host", "a"),
                    ("accept", "a"),
                    ("accept", "b"),
                    ("cookie", "x=1"),
                    ("cookie", "y=2")
                ]
            ),
            Ok(()),
            "other fields may repeat"
        );
    }

    #[test]
    fn smuggling_shapes() {
        assert_eq!(
            head(
                "/",
                &[
                    ("host", "a"),
                    ("content-length", "4"),
                    ("transfer-encoding", "chunked")
                ]
            ),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            head(
                "/",
                &[("host", "a"), ("transfer-encoding", "gzip, chunked")]
            ),
            Err(StatusCode::NOT_IMPLEMENTED)
        );
        assert_eq!(
            head(
                "/",
                &[
                    ("host", "a"),
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked")
                ]
            ),
            Err(StatusCode::BAD_REQUEST),
            "a duplicate header line"
        );
        assert_eq!(
            head("/", &[("host", "a"), ("transfer-encoding", "Chunked")]),
            Ok(())
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("8k"), Some(8192));
        assert_eq!(parse_size("1m"), Some(1 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("99999999999999999999g"), None);
    }
}
