//! `gzip`: compresses responses for clients that accept it, as the body
//! streams through.
//!
//! Mirrors APISIX 3.18's plugin of the same name (priority 995; APISIX sets
//! nginx's gzip filter from header_filter, here the plugin compresses in
//! body_filter itself):
//!
//! ```json
//! {"types": ["text/html", "application/json"], "min_length": 20, "comp_level": 1,
//!  "http_version": 1.1, "vary": true}
//! ```
//!
//! The plugin's own checks, as APISIX's: the response has a `Content-Type`
//! whose media type (before `;`, case-sensitive) is one of `types` (default
//! `["text/html"]`; `"*"`: any); its `Content-Length`, when it has one, is at
//! least `min_length` (default 20); the request's HTTP version is at least
//! `http_version` (1.1 or 1.0, default 1.1). When they pass, `vary: true`
//! appends `Vary: Accept-Encoding`. Then nginx's: the status is 200, 403
//! or 404, the response is not already encoded, the request is not `HEAD`,
//! has no `Via` (`gzip_proxied off`) and its first `Accept-Encoding` takes
//! `gzip` (not `gzip;q=0`). A compressed response gets `Content-Encoding:
//! gzip`, loses `Content-Length` and `Accept-Ranges`, and its strong `ETag`
//! becomes weak (one without quotes is dropped).
//!
//! Compression is gzip (deflate at `comp_level`, 1..9, default 1), chunk by
//! chunk: a body of any length streams through in constant memory.
//! `buffers` is accepted for compatibility and has nothing to tune.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use bytes::Bytes;
use flate2::write::GzEncoder;
use flate2::Compression;
use http::header::{self, HeaderValue};
use http::{request, response, Method, StatusCode, Version};
use serde_json::{json, Value};

use crate::ctx::Ctx;
use crate::plugin::{CompileCx, Flow, Phases, Plugin, PluginSpec, SchemaType};
use crate::registry::cached;
use crate::schema::Schema;

pub const NAME: &str = "gzip";
pub const PRIORITY: i32 = 995;
pub const DEFAULT_MIN_LENGTH: u64 = 20;
pub const DEFAULT_COMP_LEVEL: u32 = 1;

fn build_schema() -> Schema {
    Schema::object()
        .prop(
            "types",
            Schema::Custom(
                |v| {
                    Schema::AnyOf(vec![
                        Schema::array(Schema::string().min(1).done()).min(1).done(),
                        Schema::string().enumerated(&["*"]).done(),
                    ])
                    .validate(v)
                },
                || {
                    json!({"anyOf": [
                        {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                        {"enum": ["*"]}
                    ], "default": ["text/html"]})
                },
            ),
        )
        .prop("min_length", Schema::integer().min(1.0).int())
        .prop("comp_level", Schema::integer().min(1.0).max(9.0).int())
        .prop(
            "http_version",
            Schema::Custom(
                |v| match v.as_f64() {
                    Some(n) if n == 1.1 || n == 1.0 => Ok(()),
                    _ => Err("matches none of the enum values".into()),
                },
                || json!({"enum": [1.1, 1.0], "default": 1.1}),
            ),
        )
        .prop(
            "buffers",
            Schema::object()
                .prop("number", Schema::integer().min(1.0).int())
                .prop("size", Schema::integer().min(1.0).int())
                .done(),
        )
        .prop("vary", Schema::Boolean)
        .done()
}

/// The configuration schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

/// The compiled plugin.
pub struct Gzip {
    /// `None`: every type.
    types: Option<Vec<String>>,
    min_length: u64,
    level: Compression,
    /// `http_version` 1.0: HTTP/1.0 requests too.
    allow_http10: bool,
    vary: bool,
}

pub fn compile(conf: &Value) -> Gzip {
    Gzip {
        types: conf.get("types").and_then(Value::as_array).map(|list| {
            list.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        }),
        min_length: conf
            .get("min_length")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_MIN_LENGTH),
        level: Compression::new(
            conf.get("comp_level")
                .and_then(Value::as_u64)
                .and_then(|l| u32::try_from(l).ok())
                .unwrap_or(DEFAULT_COMP_LEVEL)
                .clamp(1, 9),
        ),
        allow_http10: conf.get("http_version").and_then(Value::as_f64) == Some(1.0),
        vary: conf.get("vary").and_then(Value::as_bool).unwrap_or(false),
    }
}

/// What the request said, noted in rewrite for the response phases.
#[derive(Clone, Copy)]
struct GzipRequest {
    version: Version,
    /// `Accept-Encoding` takes gzip, no `Via`, not `HEAD`.
    nginx_would: bool,
}

/// The running compressor of one response.
#[derive(Clone)]
struct Encoder(Arc<Mutex<GzEncoder<Vec<u8>>>>);

/// Whether the first `Accept-Encoding` takes gzip, as nginx reads it.
fn accepts_gzip(value: &[u8]) -> bool {
    let text = String::from_utf8_lossy(value).to_ascii_lowercase();
    if text.len() < 4 {
        return false;
    }
    if text.starts_with("gzip,") {
        return true;
    }
    let mut from = 0;
    while let Some(at) = text[from..].find("gzip") {
        let start = from + at;
        let end = start + 4;
        from = end;
        let before_ok = start == 0 || matches!(text.as_bytes()[start - 1], b',' | b' ');
        if !before_ok {
            continue;
        }
        let rest = text[end..].trim_start_matches(' ');
        if rest.is_empty() || rest.starts_with(',') {
            return true;
        }
        if let Some(q) = rest.strip_prefix(";q=") {
            let q = q.split(',').next().unwrap_or("").trim();
            return q.parse::<f64>().is_ok_and(|v| v > 0.0);
        }
    }
    false
}

impl Gzip {
    fn type_allowed(&self, content_type: &str) -> bool {
        match &self.types {
            None => true,
            Some(list) => {
                let media = content_type.split(';').next().unwrap_or_default();
                list.iter().any(|t| t == "*" || t == media)
            }
        }
    }
}

/// nginx's `W/` for a strong ETag; `None` drops one without quotes.
fn weak_etag(value: &HeaderValue) -> Option<HeaderValue> {
    let bytes = value.as_bytes();
    if bytes.starts_with(b"W/") {
        return Some(value.clone());
    }
    if bytes.first() != Some(&b'"') {
        return None;
    }
    let mut weak = b"W/".to_vec();
    weak.extend_from_slice(bytes);
    HeaderValue::from_bytes(&weak).ok()
}

impl Plugin for Gzip {
    fn phases(&self) -> Phases {
        Phases::REWRITE | Phases::HEADER_FILTER | Phases::BODY_FILTER
    }

    fn rewrite(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        let accepts = req
            .headers
            .get(header::ACCEPT_ENCODING)
            .is_some_and(|v| accepts_gzip(v.as_bytes()));
        ctx.data.insert(GzipRequest {
            version: req.version,
            nginx_would: accepts
                && !req.headers.contains_key(header::VIA)
                && req.method != Method::HEAD,
        });
        Flow::Continue
    }

    fn header_filter(&self, ctx: &mut Ctx, resp: &mut response::Parts) {
        let Some(request) = ctx.data.get::<GzipRequest>().copied() else {
            return;
        };
        let Some(content_type) = resp
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        else {
            return;
        };
        if !self.type_allowed(content_type) {
            return;
        }
        let length = resp
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if length.is_some_and(|l| l < self.min_length) {
            return;
        }
        let version_ok = match request.version {
            Version::HTTP_09 => false,
            Version::HTTP_10 => self.allow_http10,
            _ => true,
        };
        if !version_ok {
            return;
        }
        if self.vary {
            resp.headers
                .append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
        }
        let status_ok = matches!(
            resp.status,
            StatusCode::OK | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND
        );
        let encoded = resp
            .headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| !v.is_empty());
        if !request.nginx_would || !status_ok || encoded {
            return;
        }
        resp.headers
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        resp.headers.remove(header::CONTENT_LENGTH);
        resp.headers.remove(header::ACCEPT_RANGES);
        if let Some(etag) = resp.headers.remove(header::ETAG) {
            if let Some(weak) = weak_etag(&etag) {
                resp.headers.insert(header::ETAG, weak);
            }
        }
        ctx.data.insert(Encoder(Arc::new(Mutex::new(GzEncoder::new(
            Vec::new(),
            self.level,
        )))));
    }

    fn body_filter(&self, ctx: &mut Ctx, chunk: &mut Bytes, end: bool) {
        let Some(Encoder(encoder)) = ctx.data.get::<Encoder>() else {
            return;
        };
        let mut encoder = encoder.lock().unwrap_or_else(PoisonError::into_inner);
        // Writing to a Vec cannot fail; a failure would only mean a broken
        // compressor, and the body then ends where it is.
        if !chunk.is_empty() && encoder.write_all(chunk).is_err() {
            tracing::error!(plugin = NAME, "compressing the response failed");
        }
        if end && encoder.try_finish().is_err() {
            tracing::error!(plugin = NAME, "finishing the compressed response failed");
        }
        *chunk = Bytes::from(std::mem::take(encoder.get_mut()));
    }
}

/// The registry entry.
pub struct GzipSpec;

impl PluginSpec for GzipSpec {
    fn name(&self) -> &'static str {
        NAME
    }

    fn priority(&self) -> i32 {
        PRIORITY
    }

    fn schema(&self) -> &'static Schema {
        schema()
    }

    fn check(&self, conf: &Value, _target: SchemaType) -> Result<(), String> {
        schema().validate(conf)
    }

    fn compile(&self, conf: &Value, _cx: &CompileCx<'_>) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(compile(conf)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use std::io::Read;

    #[test]
    fn schema_as_apisix() {
        let r = |c: Value| testing::refusal(NAME, &c);
        assert_eq!(
            r(json!({"min_length": 0})),
            "property \"min_length\" validation failed: expected 0 to be at least 1"
        );
        assert_eq!(
            r(json!({"comp_level": 10})),
            "property \"comp_level\" validation failed: expected 10 to be at most 9"
        );
        assert_eq!(
            r(json!({"buffers": {"number": 0}})),
            "property \"buffers\" validation failed: property \"number\" validation failed: expected 0 to be at least 1"
        );
        assert_eq!(
            r(json!({"vary": 0})),
            "property \"vary\" validation failed: wrong type: expected boolean, got number"
        );
        assert_eq!(
            r(json!({"http_version": 2})),
            "property \"http_version\" validation failed: matches none of the enum values"
        );
        assert!(r(json!({"types": []})).contains("types"));
        assert!(schema()
            .validate(&json!({"types": "*", "http_version": 1.0}))
            .is_ok());
    }

    #[test]
    fn accept_encoding_as_nginx_reads_it() {
        for yes in [
            "gzip",
            "gzip, deflate",
            "deflate, gzip",
            "br;q=1, gzip;q=0.5",
            "GZIP",
        ] {
            assert!(accepts_gzip(yes.as_bytes()), "{yes}");
        }
        for no in ["", "br", "gzip;q=0", "x-gzip", "*", "deflate"] {
            assert!(!accepts_gzip(no.as_bytes()), "{no}");
        }
    }

    fn run(
        conf: Value,
        req_headers: &[(&str, &str)],
        resp_headers: &[(&str, &str)],
        body: &[u8],
    ) -> (response::Parts, Vec<u8>) {
        let plugin = compile(&conf);
        let mut ctx = testing::ctx("127.0.0.1");
        let (mut req, _) = testing::request("127.0.0.1", "/", req_headers).into_parts();
        assert!(matches!(plugin.rewrite(&mut ctx, &mut req), Flow::Continue));
        let mut builder = http::Response::builder().status(200);
        for (k, v) in resp_headers {
            builder = builder.header(*k, *v);
        }
        let (mut parts, ()) = builder.body(()).unwrap().into_parts();
        plugin.header_filter(&mut ctx, &mut parts);
        let mut out = Vec::new();
        // In three chunks, then the end.
        for part in body.chunks(body.len().div_ceil(3).max(1)) {
            let mut chunk = Bytes::copy_from_slice(part);
            plugin.body_filter(&mut ctx, &mut chunk, false);
            out.extend_from_slice(&chunk);
        }
        let mut tail = Bytes::new();
        plugin.body_filter(&mut ctx, &mut tail, true);
        out.extend_from_slice(&tail);
        (parts, out)
    }

    #[test]
    fn compresses_in_a_stream_and_fixes_the_headers() {
        let body = "0123".repeat(1024);
        let (parts, out) = run(
            json!({"vary": true}),
            &[("accept-encoding", "gzip")],
            &[
                ("content-type", "text/html"),
                ("content-length", "4096"),
                ("etag", "\"abc\""),
                ("accept-ranges", "bytes"),
                ("vary", "upstream"),
            ],
            body.as_bytes(),
        );
        assert_eq!(parts.headers["content-encoding"], "gzip");
        assert!(!parts.headers.contains_key("content-length"));
        assert!(!parts.headers.contains_key("accept-ranges"));
        assert_eq!(parts.headers["etag"], "W/\"abc\"");
        let vary: Vec<_> = parts.headers.get_all("vary").iter().collect();
        assert_eq!(vary, ["upstream", "Accept-Encoding"]);
        let mut plain = String::new();
        flate2::read::GzDecoder::new(&out[..])
            .read_to_string(&mut plain)
            .unwrap();
        assert_eq!(plain, body);
        assert!(out.len() < 200, "{}", out.len());
    }

    #[test]
    fn leaves_what_it_should_not_compress() {
        let html = [("content-type", "text/html"), ("content-length", "20")];
        let gz = [("accept-encoding", "gzip")];
        type Headers<'a> = &'a [(&'a str, &'a str)];
        let cases: [(Value, Headers, Headers); 5] = [
            (json!({"min_length": 21}), &gz, &html),
            (json!({"types": ["text/plain"]}), &gz, &html),
            (json!({}), &[], &html),
            (
                json!({}),
                &[("accept-encoding", "gzip"), ("via", "1.1 proxy")],
                &html,
            ),
            (
                json!({}),
                &gz,
                &[("content-type", "text/html"), ("content-encoding", "br")],
            ),
        ];
        for (conf, req, resp) in cases {
            let (parts, out) = run(conf.clone(), req, resp, b"01234567890123456789");
            assert_ne!(
                parts.headers.get("content-encoding").map(|v| v.as_bytes()),
                Some(&b"gzip"[..]),
                "{conf} {req:?} {resp:?}"
            );
            assert_eq!(out, b"01234567890123456789");
        }
        // A type with parameters matches on its media type; "*" takes any.
        let (parts, _) = run(
            json!({"types": ["text/plain"]}),
            &gz,
            &[("content-type", "text/plain; charset=UTF-8")],
            b"x",
        );
        assert_eq!(parts.headers["content-encoding"], "gzip");
        let (parts, _) = run(
            json!({"types": "*"}),
            &gz,
            &[("content-type", "video/3gpp")],
            b"x",
        );
        assert_eq!(parts.headers["content-encoding"], "gzip");
    }
}
