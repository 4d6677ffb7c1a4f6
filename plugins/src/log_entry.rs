//! The entry APISIX's loggers send for one request (`log-util`'s full
//! log), or the entry a `log_format` describes.
//!
//! The full entry:
//!
//! ```json
//! {"request": {"url": "http://127.0.0.1:9080/hello?a=1", "uri": "/hello?a=1", "method": "GET",
//!              "headers": {...}, "querystring": {"a": "1"}, "size": 83},
//!  "response": {"status": 200, "headers": {...}, "size": 123},
//!  "server": {"hostname": "...", "version": "..."},
//!  "upstream": "127.0.0.1:1980", "service_id": "", "route_id": "1",
//!  "consumer": {"username": "jack"}, "client_ip": "127.0.0.1",
//!  "start_time": 1733250000123, "latency": 1.2, "upstream_latency": 1, "apisix_latency": 0.2}
//! ```
//!
//! A `log_format` (`{"host": "$host", "at": "$time_iso8601", "x": "text"}`)
//! gives the keys instead: a value starting with `$` is a variable (missing:
//! `null`), anything else is kept as it is; `route_id` and `service_id` are
//! added for routed requests.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use serde_json::{json, Map, Value};

use crate::ctx::Ctx;

/// The response body gathered for `include_resp_body`, in the request's
/// data.
#[derive(Default)]
pub struct ResponseBody(pub Vec<u8>);

/// A compiled `log_format`.
#[derive(Debug, Clone)]
pub struct LogFormat(Vec<(String, Field)>);

#[derive(Debug, Clone)]
enum Field {
    Var(String),
    Text(Value),
}

impl LogFormat {
    pub fn new(format: &Map<String, Value>) -> LogFormat {
        LogFormat(
            format
                .iter()
                .map(|(k, v)| {
                    let field = match v.as_str().and_then(|s| s.strip_prefix('$')) {
                        Some(var) => Field::Var(var.to_string()),
                        None => Field::Text(v.clone()),
                    };
                    (k.clone(), field)
                })
                .collect(),
        )
    }
}

/// This machine's name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`),
/// read once.
pub fn hostname() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_default()
    })
}

fn headers_json(headers: &HeaderMap) -> Value {
    let mut out = Map::new();
    for name in headers.keys() {
        let values: Vec<Value> = headers
            .get_all(name)
            .iter()
            .map(|v| Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let value = if values.len() == 1 {
            values.into_iter().next().unwrap_or(Value::Null)
        } else {
            Value::Array(values)
        };
        out.insert(name.as_str().to_string(), value);
    }
    Value::Object(out)
}

fn query_json(query: Option<&str>) -> Value {
    let mut out = Map::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = match pair.split_once('=') {
            Some((k, v)) => (k, Value::String(crate::vars::percent_decode(v))),
            None => (pair, Value::Bool(true)),
        };
        out.insert(crate::vars::percent_decode(k), v);
    }
    Value::Object(out)
}

/// The full entry of a finished request. `ctx.request` must have been
/// kept (a logger says so with `reads_request`).
pub fn full(ctx: &Ctx, include_resp_body: bool) -> Value {
    let finished = ctx.finished();
    let head = ctx.request.as_deref();
    let uri = head.map(|h| &h.uri);
    let request_uri = uri
        .and_then(|u| u.path_and_query())
        .map_or("/", |p| p.as_str());
    let host = ctx.host.as_deref().unwrap_or("");
    let url = format!(
        "{}://{host}:{}{request_uri}",
        ctx.conn.scheme,
        ctx.conn.local.port()
    );
    let started_wall = SystemTime::now()
        .checked_sub(finished.request)
        .unwrap_or(UNIX_EPOCH)
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let (latency, upstream_latency, apisix_latency) = finished.latencies_ms();
    let mut entry = json!({
        "request": {
            "url": url,
            "uri": request_uri,
            "method": head.map_or("", |h| h.method.as_str()),
            "headers": head.map_or(json!({}), |h| headers_json(&h.headers)),
            "querystring": query_json(uri.and_then(|u| u.query())),
            "size": ctx.request_length,
        },
        "response": {
            "status": ctx.status.map_or(0, |s| s.as_u16()),
            "headers": ctx.response_headers.as_deref().map_or(json!({}), headers_json),
            "size": ctx.header_bytes_sent + ctx.body_bytes_sent,
        },
        "server": {"hostname": hostname(), "version": env!("CARGO_PKG_VERSION")},
        "upstream": ctx.upstream.addr.as_ref().map(|a| a.as_str()),
        "service_id": match &ctx.route_id {
            Some(_) => ctx.service_id.as_deref().unwrap_or(""),
            None => host,
        },
        "route_id": ctx.route_id.as_deref(),
        "client_ip": crate::vars::ip_string(ctx.client_ip),
        "start_time": started_wall.as_millis() as u64,
        "latency": latency,
        "apisix_latency": apisix_latency,
    });
    if let Some(map) = entry.as_object_mut() {
        if let Some(up) = upstream_latency {
            map.insert("upstream_latency".into(), json!(up));
        }
        if let Some(name) = ctx.consumer_name() {
            map.insert("consumer".into(), json!({"username": name}));
        }
        if include_resp_body {
            if let Some(body) = ctx.data.get::<ResponseBody>() {
                if let Some(resp) = map.get_mut("response").and_then(Value::as_object_mut) {
                    resp.insert(
                        "body".into(),
                        Value::String(String::from_utf8_lossy(&body.0).into_owned()),
                    );
                }
            }
        }
        // APISIX leaves a missing upstream out.
        if map.get("upstream").is_some_and(Value::is_null) {
            map.remove("upstream");
        }
    }
    entry
}

/// The entry a `log_format` describes.
pub fn custom(ctx: &Ctx, format: &LogFormat) -> Value {
    let mut out = fields(ctx, format);
    if let Some(route) = ctx.route_id.as_deref() {
        out.insert("route_id".into(), json!(route));
        if let Some(service) = ctx.service_id.as_deref() {
            out.insert("service_id".into(), json!(service));
        }
    }
    Value::Object(out)
}

/// Just the keys `format` declares (`log_format_extra` adds these to the
/// full entry).
pub fn fields(ctx: &Ctx, format: &LogFormat) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, field) in &format.0 {
        let value = match field {
            Field::Text(v) => v.clone(),
            Field::Var(name) => match ctx.var(None, name) {
                Some(v) => Value::String(v.into_owned()),
                None => Value::Null,
            },
        };
        out.insert(key.clone(), value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn query_strings_as_apisix() {
        assert_eq!(
            query_json(Some("a=1&b&c=x%20y")),
            json!({"a": "1", "b": true, "c": "x y"})
        );
    }

    #[test]
    fn custom_format_reads_variables() {
        let mut ctx = testing::ctx("10.0.0.9");
        ctx.route_id = Some("r1".into());
        let format = LogFormat::new(
            json!({"client": "$remote_addr", "fixed": "text", "n": 1, "none": "$upstream_addr"})
                .as_object()
                .expect("object"),
        );
        assert_eq!(
            custom(&ctx, &format),
            json!({"client": "10.0.0.9", "fixed": "text", "n": 1, "none": null, "route_id": "r1"})
        );
    }
}
