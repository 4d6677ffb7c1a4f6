//! `http-logger`: sends each request's log entry to an HTTP collector, in
//! batches.
//!
//! Mirrors APISIX 3.18's plugin (priority 410, body_filter and log
//! phases):
//!
//! ```json
//! {"uri": "http://127.0.0.1:8080/logs", "auth_header": "Bearer x", "timeout": 3,
//!  "concat_method": "json", "batch_max_size": 1000, "inactive_timeout": 5,
//!  "buffer_duration": 60, "max_retry_count": 0, "retry_delay": 1}
//! ```
//!
//! - The entry is APISIX's full log, or `log_format` (the plugin's, else
//!   `plugin_metadata/http-logger`'s); see [`crate::log_entry`]. An
//!   unrouted request logs `route_id` `no-matched`.
//! - A batch is one `POST` with `Content-Type: application/json` (an
//!   array, or one object when `batch_max_size` is 1) or, with
//!   `concat_method: new_line`, `text/plain` with one object per line;
//!   `Authorization: auth_header` when set. A status of 400 or more, a
//!   refused connection or `timeout` seconds without an answer fail the
//!   batch (see [`crate::batch`] for retries and bounds).
//! - `include_resp_body` adds the response body (up to
//!   `max_resp_body_bytes`), when `include_resp_body_expr` holds;
//!   `include_req_body` the request body (up to `max_req_body_bytes`,
//!   copied as it streams to the upstream), when `include_req_body_expr`
//!   holds at the end of the request.
//! - `https://` collectors are reached over TLS; their certificate is
//!   checked against the system's trust store only with `ssl_verify: true`
//!   (APISIX's default is false).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Uri};
use http_body_util::Full;
use serde_json::Value;

use crate::batch::{self, BatchConf, SendFuture, Sender};
use crate::logger::{self, Logger};
use crate::plugin::{CompileCx, Plugin, PluginSpec, SchemaType};
use crate::registry::cached;
use crate::schema::Schema;

pub const NAME: &str = "http-logger";
pub const PRIORITY: i32 = 410;

fn uri_ok(s: &str) -> bool {
    s.parse::<Uri>()
        .ok()
        .is_some_and(|u| u.scheme().is_some() && u.host().is_some_and(|h| !h.is_empty()))
}

fn build_schema() -> Schema {
    let schema = Schema::object()
        .prop(
            "uri",
            Schema::string()
                .pattern(
                    r"^[^\/]+:\/\/([\da-zA-Z.-]+|\[[\da-fA-F:]+\])(:\d+)?",
                    uri_ok,
                )
                .done(),
        )
        .prop("auth_header", Schema::string().done())
        .prop("timeout", Schema::integer().min(1.0).int())
        .prop(
            "concat_method",
            Schema::string().enumerated(&["json", "new_line"]).done(),
        )
        .prop("ssl_verify", Schema::Boolean)
        .required(&["uri"]);
    batch::add_schema(logger::common_schema(schema)).done()
}

/// The configuration schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

fn build_metadata_schema() -> Schema {
    logger::metadata_schema()
}

/// The `plugin_metadata` schema.
pub fn metadata_schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_metadata_schema)
}

/// Sends batches to the collector.
struct HttpSender {
    client: crate::tls_client::HttpsClient,
    uri: Uri,
    host: Option<HeaderValue>,
    auth: Option<HeaderValue>,
    timeout: Duration,
    new_line: bool,
    batch_max_size: usize,
}

impl Sender for HttpSender {
    fn send(&self, entries: Vec<Value>) -> SendFuture {
        let client = self.client.clone();
        let (uri, host, auth) = (self.uri.clone(), self.host.clone(), self.auth.clone());
        let (timeout, new_line, size) = (self.timeout, self.new_line, self.batch_max_size);
        Box::pin(async move {
            let body = batch::encode_off_thread(entries, size, new_line).await;
            let mut req = Request::new(Full::new(Bytes::from(body)));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = uri.clone();
            let headers = req.headers_mut();
            if let Some(host) = host {
                headers.insert(header::HOST, host);
            }
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(if new_line {
                    "text/plain"
                } else {
                    "application/json"
                }),
            );
            if let Some(auth) = auth {
                headers.insert(header::AUTHORIZATION, auth);
            }
            match tokio::time::timeout(timeout, client.request(req)).await {
                Err(_) => Err(format!("timed out sending to {uri}")),
                Ok(Err(e)) => Err(format!("error while sending data to {uri}: {e}")),
                Ok(Ok(resp)) if resp.status().as_u16() >= 400 => Err(format!(
                    "server returned status code[{}] uri[{uri}]",
                    resp.status().as_u16()
                )),
                Ok(Ok(_)) => Ok(()),
            }
        })
    }
}

/// The registry entry.
pub struct HttpLoggerSpec;

impl PluginSpec for HttpLoggerSpec {
    fn name(&self) -> &'static str {
        NAME
    }

    fn priority(&self) -> i32 {
        PRIORITY
    }

    fn schema(&self) -> &'static Schema {
        schema()
    }

    fn metadata_schema(&self) -> Option<&'static Schema> {
        Some(metadata_schema())
    }

    fn encrypt_fields(&self) -> &'static [&'static str] {
        &["auth_header"]
    }

    fn check(&self, conf: &Value, target: SchemaType) -> Result<(), String> {
        if target == SchemaType::Metadata {
            return metadata_schema().validate(conf);
        }
        schema().validate(conf)?;
        logger::check(conf)
    }

    fn compile(&self, conf: &Value, cx: &CompileCx<'_>) -> Result<Arc<dyn Plugin>, String> {
        let text = |k: &str| conf.get(k).and_then(Value::as_str);
        let uri: Uri = text("uri")
            .unwrap_or_default()
            .parse()
            .map_err(|e| format!("uri: {e}"))?;
        let host = uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.host()).ok());
        let max_pending = Logger::max_pending(cx);
        let batch_conf = BatchConf::from_conf(conf, NAME, max_pending);
        let sender = HttpSender {
            client: crate::tls_client::https_client(
                conf.get("ssl_verify").and_then(Value::as_bool) == Some(true),
            ),
            host,
            auth: text("auth_header").and_then(|a| HeaderValue::from_str(a).ok()),
            timeout: Duration::from_secs(conf.get("timeout").and_then(Value::as_u64).unwrap_or(3)),
            new_line: text("concat_method") == Some("new_line"),
            batch_max_size: batch_conf.batch_max_size,
            uri,
        };
        Logger::compile(conf, cx, batch_conf, Arc::new(sender), true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use serde_json::json;

    #[test]
    fn schema_and_refusals() {
        assert!(HttpLoggerSpec
            .check(&json!({"uri": "http://127.0.0.1:1/x"}), SchemaType::Route)
            .is_ok());
        let err = testing::refusal(NAME, &json!({}));
        assert!(err.contains("\"uri\" is required"), "{err}");
        let err = testing::refusal(NAME, &json!({"uri": "http://x", "batch_max_size": 0}));
        assert!(err.contains("batch_max_size"), "{err}");
        let err = testing::refusal(NAME, &json!({"uri": "http://x", "concat_method": "csv"}));
        assert!(err.contains("concat_method"), "{err}");
        assert!(HttpLoggerSpec
            .check(&json!({"uri": "https://x"}), SchemaType::Route)
            .is_ok());
        assert!(HttpLoggerSpec
            .check(
                &json!({"uri": "http://x", "include_req_body": true}),
                SchemaType::Route
            )
            .is_ok());
        let err = testing::refusal(
            NAME,
            &json!({"uri": "http://x", "include_resp_body_expr": [["status", "bad", 1]]}),
        );
        assert!(err.contains("include_resp_body_expr"), "{err}");
    }
}
