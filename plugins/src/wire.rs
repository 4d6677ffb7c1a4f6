//! How many bytes a request or response head takes on an HTTP/1.1
//! connection, for nginx's `$request_length` and `$bytes_sent`.
//!
//! The head is measured as a client or hyper writes it: one space after the
//! method and the target, `name: value` lines ending in CRLF, a blank line
//! at the end. A client that pads its header lines with extra whitespace
//! sent a few bytes more than counted here; everything else is exact.

use http::{header, request, response, HeaderMap};

fn header_lines(headers: &HeaderMap) -> u64 {
    headers
        .iter()
        .map(|(name, value)| (name.as_str().len() + 2 + value.len() + 2) as u64)
        .sum()
}

/// `$request_length`: the request line, the headers and the body its
/// `Content-Length` declares (a chunked body is not counted).
pub fn request_length(parts: &request::Parts) -> u64 {
    let target = match parts.uri.path_and_query() {
        Some(pq) if parts.uri.scheme().is_none() => pq.as_str().len(),
        Some(_) => parts.uri.to_string().len(),
        None => 1,
    };
    // "GET /path HTTP/1.1\r\n" ... "\r\n"
    let line = parts.method.as_str().len() + 1 + target + 1 + 8 + 2;
    // One pass finds `Content-Length` along the way: a hashed look-up costs
    // more than the walk over a request's few headers it would save.
    let mut lines = 0;
    let mut body = None;
    for (name, value) in &parts.headers {
        lines += (name.as_str().len() + 2 + value.len() + 2) as u64;
        if body.is_none() && name == header::CONTENT_LENGTH {
            body = Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0),
            );
        }
    }
    line as u64 + lines + 2 + body.unwrap_or(0)
}

/// The response head as the plugins left it: the status line and the
/// headers (those the connection adds itself, `Date` and framing, are not
/// counted).
pub fn response_head_length(parts: &response::Parts) -> u64 {
    // "HTTP/1.1 200 OK\r\n" ... "\r\n"
    let reason = parts.status.canonical_reason().map_or(0, str::len);
    (9 + 3 + 1 + reason + 2) as u64 + header_lines(&parts.headers) + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_head_and_declared_body() {
        let req = http::Request::post("/prom?a=1")
            .header("host", "example.com")
            .header("content-length", "5")
            .body(())
            .expect("request");
        let (parts, _) = req.into_parts();
        let raw = "POST /prom?a=1 HTTP/1.1\r\nhost: example.com\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(request_length(&parts), raw.len() as u64);
    }

    #[test]
    fn response_head() {
        let resp = http::Response::builder()
            .status(404)
            .header("content-type", "text/plain")
            .body(())
            .expect("response");
        let (parts, _) = resp.into_parts();
        let raw = "HTTP/1.1 404 Not Found\r\ncontent-type: text/plain\r\n\r\n";
        assert_eq!(response_head_length(&parts), raw.len() as u64);
    }
}
