//! Where spans go: OTLP over HTTP (protobuf, `POST /v1/traces`) to the
//! collector, in batches.
//!
//! Settings come from `plugin_metadata/opentelemetry` when it is set (as in
//! APISIX 3.18), else from config.yaml's `plugin_attr.opentelemetry` (as in
//! earlier 3.x releases), else the defaults below. Both have one shape:
//!
//! ```yaml
//! trace_id_source: random          # or x-request-id
//! resource: {service.name: APISIX} # resource attributes; hostname is added
//! collector:
//!   address: 127.0.0.1:4318        # host:port, or an http:// URL
//!   request_timeout: 3             # seconds
//!   request_headers: {Authorization: token}
//! batch_span_processor:
//!   max_queue_size: 2048           # spans waiting at most; more are dropped
//!   max_export_batch_size: 256     # spans per POST
//!   batch_timeout: 5               # seconds a span waits at most
//!   inactive_timeout: 2            # seconds without a new span before a send
//!   drop_on_queue_full: true
//! set_ngx_var: false               # $opentelemetry_trace_id and friends
//! ```
//!
//! The queue is always bounded: with the collector down, a batch is tried
//! again three times a second apart, then dropped and counted, and spans
//! beyond `max_queue_size` are dropped as they come (`drop_on_queue_full:
//! false` is accepted, but never makes a request wait). Every gateway route
//! with the plugin shares one exporter per settings.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::Full;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use serde_json::Value;

use crate::batch::{BatchConf, Processor, SendFuture, Sender};

/// `collector.address` default.
pub const DEFAULT_COLLECTOR: &str = "127.0.0.1:4318";

/// What the plugin reads from the metadata or `plugin_attr`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `trace_id_source: x-request-id`.
    pub trace_id_from_request_id: bool,
    /// `set_ngx_var`.
    pub set_vars: bool,
    pub endpoint: Uri,
    pub timeout: Duration,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub resource: Vec<KeyValue>,
    pub batch: BatchConf,
}

/// A string attribute.
pub fn attr(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// An integer attribute.
pub fn int_attr(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

/// The collector's `/v1/traces` URL for `address` (`host:port`, or an
/// `http://` or `https://` URL whose path, if any, is kept).
pub fn endpoint(address: &str) -> Result<Uri, String> {
    let url = match address.split_once("://") {
        Some((scheme @ ("http" | "https"), rest)) if rest.contains('/') && !rest.ends_with('/') => {
            format!("{scheme}://{rest}")
        }
        Some((scheme @ ("http" | "https"), rest)) => {
            format!("{scheme}://{}/v1/traces", rest.trim_end_matches('/'))
        }
        Some((scheme, _)) => {
            return Err(format!(
                "collector.address {address}: unknown scheme {scheme}"
            ))
        }
        None => format!("http://{address}/v1/traces"),
    };
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("collector.address {address}: {e}"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("collector.address {address}: no host"));
    }
    Ok(uri)
}

fn header_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn seconds(v: Option<&Value>, default: f64) -> Duration {
    let secs = v.and_then(Value::as_f64).unwrap_or(default);
    if secs.is_finite() && secs > 0.0 {
        Duration::from_secs_f64(secs.min(86_400.0))
    } else {
        Duration::from_millis(1)
    }
}

impl Settings {
    /// Reads `conf` (the metadata or `plugin_attr` object; `None`: all
    /// defaults). Fails on a collector address it cannot send to.
    pub fn from_conf(conf: Option<&Value>) -> Result<Settings, String> {
        let get = |k: &str| conf.and_then(|c| c.get(k));
        let collector = get("collector");
        let address = collector
            .and_then(|c| c.get("address"))
            .and_then(Value::as_str)
            .unwrap_or(DEFAULT_COLLECTOR);
        let endpoint = endpoint(address)?;
        let timeout = seconds(collector.and_then(|c| c.get("request_timeout")), 3.0);
        let mut headers = Vec::new();
        if let Some(map) = collector
            .and_then(|c| c.get("request_headers"))
            .and_then(Value::as_object)
        {
            for (k, v) in map {
                let name = HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| format!("collector.request_headers: bad header name {k}"))?;
                let value = header_text(v)
                    .and_then(|t| HeaderValue::from_str(&t).ok())
                    .ok_or_else(|| format!("collector.request_headers: bad value of {k}"))?;
                headers.push((name, value));
            }
        }
        let mut resource = vec![attr("hostname", crate::log_entry::hostname())];
        let configured = get("resource").and_then(Value::as_object);
        if !configured.is_some_and(|r| r.contains_key("service.name")) {
            resource.push(attr("service.name", "APISIX"));
        }
        for (k, v) in configured.into_iter().flatten() {
            let value = match v {
                Value::String(s) => any_value::Value::StringValue(s.clone()),
                Value::Bool(b) => any_value::Value::BoolValue(*b),
                Value::Number(n) => any_value::Value::DoubleValue(n.as_f64().unwrap_or(0.0)),
                _ => continue,
            };
            resource.push(KeyValue {
                key: k.clone(),
                value: Some(AnyValue { value: Some(value) }),
                ..Default::default()
            });
        }
        let bsp = get("batch_span_processor");
        let int = |k: &str, d: u64| {
            bsp.and_then(|b| b.get(k))
                .and_then(Value::as_u64)
                .unwrap_or(d)
                .max(1)
        };
        let batch = BatchConf {
            name: "opentelemetry".into(),
            batch_max_size: int("max_export_batch_size", 256) as usize,
            inactive_timeout: seconds(bsp.and_then(|b| b.get("inactive_timeout")), 2.0),
            buffer_duration: seconds(bsp.and_then(|b| b.get("batch_timeout")), 5.0),
            max_retry_count: 3,
            retry_delay: Duration::from_secs(1),
            max_pending: int("max_queue_size", 2048) as usize,
        };
        Ok(Settings {
            trace_id_from_request_id: get("trace_id_source").and_then(Value::as_str)
                == Some("x-request-id"),
            set_vars: get("set_ngx_var").and_then(Value::as_bool).unwrap_or(false),
            endpoint,
            timeout,
            headers,
            resource,
            batch,
        })
    }
}

/// Posts batches of spans to the collector.
struct OtlpSender {
    client: crate::tls_client::HttpsClient,
    endpoint: Uri,
    host: Option<HeaderValue>,
    headers: Vec<(HeaderName, HeaderValue)>,
    timeout: Duration,
    resource: Resource,
}

/// The instrumentation scope spans are reported under.
fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "ferrogate".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    }
}

/// The protobuf body of one export request.
pub fn encode(resource: &Resource, spans: Vec<Span>) -> Vec<u8> {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![ScopeSpans {
                scope: Some(scope()),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

impl Sender<Span> for OtlpSender {
    fn send(&self, spans: Vec<Span>) -> SendFuture {
        let body = encode(&self.resource, spans);
        let mut req = Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.endpoint.clone();
        let headers = req.headers_mut();
        if let Some(host) = &self.host {
            headers.insert(header::HOST, host.clone());
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        for (k, v) in &self.headers {
            headers.insert(k.clone(), v.clone());
        }
        let client = self.client.clone();
        let (timeout, endpoint) = (self.timeout, self.endpoint.clone());
        Box::pin(async move {
            match tokio::time::timeout(timeout, client.request(req)).await {
                Err(_) => Err(format!("timed out exporting spans to {endpoint}")),
                Ok(Err(e)) => Err(format!("failed to export spans to {endpoint}: {e}")),
                Ok(Ok(resp)) if !resp.status().is_success() => Err(format!(
                    "collector {endpoint} answered {}",
                    resp.status().as_u16()
                )),
                Ok(Ok(_)) => Ok(()),
            }
        })
    }
}

/// One batch span processor and its collector: shared by every compiled
/// plugin with the same settings.
pub struct Exporter {
    processor: Arc<Processor<Span>>,
}

impl Exporter {
    pub fn new(settings: &Settings) -> Exporter {
        let sender = OtlpSender {
            // A trace collector's certificate is checked against the
            // system's trust store.
            client: crate::tls_client::https_client(true),
            host: settings
                .endpoint
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
            endpoint: settings.endpoint.clone(),
            headers: settings.headers.clone(),
            timeout: settings.timeout,
            resource: Resource {
                attributes: settings.resource.clone(),
                ..Default::default()
            },
        };
        Exporter {
            processor: Arc::new(Processor::new(settings.batch.clone(), Arc::new(sender))),
        }
    }

    /// Queues the spans `build` makes, when there is room for them; never
    /// waits.
    pub fn export(&self, build: impl FnOnce() -> Span) {
        self.processor.push_with(build);
    }

    /// Spans dropped (queue full, or the collector failing).
    pub fn dropped(&self) -> u64 {
        self.processor
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn endpoints() {
        let e = |a| endpoint(a).map(|u| u.to_string());
        assert_eq!(
            e("127.0.0.1:4318").unwrap(),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(e("http://otel:4318").unwrap(), "http://otel:4318/v1/traces");
        assert_eq!(
            e("http://otel:4318/").unwrap(),
            "http://otel:4318/v1/traces"
        );
        assert_eq!(
            e("http://otel:4318/custom/traces").unwrap(),
            "http://otel:4318/custom/traces"
        );
        assert_eq!(
            e("https://otel:4318").unwrap(),
            "https://otel:4318/v1/traces"
        );
        assert!(e("ftp://otel:4318").unwrap_err().contains("unknown scheme"));
        assert!(e("").is_err());
    }

    #[test]
    fn settings_defaults_and_overrides() {
        let s = Settings::from_conf(None).unwrap();
        assert_eq!(s.endpoint.to_string(), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(s.timeout, Duration::from_secs(3));
        assert_eq!(s.batch.batch_max_size, 256);
        assert_eq!(s.batch.max_pending, 2048);
        assert!(!s.trace_id_from_request_id && !s.set_vars);
        assert!(s.resource.iter().any(|kv| kv.key == "service.name"));
        let s = Settings::from_conf(Some(&json!({
            "trace_id_source": "x-request-id",
            "set_ngx_var": true,
            "resource": {"service.name": "edge", "tier": 2, "canary": true},
            "collector": {"address": "10.0.0.1:4318", "request_timeout": 1,
                          "request_headers": {"Authorization": "token"}},
            "batch_span_processor": {"max_export_batch_size": 16, "batch_timeout": 0.5,
                                     "inactive_timeout": 1, "max_queue_size": 100}
        })))
        .unwrap();
        assert!(s.trace_id_from_request_id && s.set_vars);
        assert_eq!(s.headers[0].0, "authorization");
        assert_eq!(s.batch.buffer_duration, Duration::from_millis(500));
        assert_eq!(s.batch.batch_max_size, 16);
        let names: Vec<&str> = s.resource.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(names, ["hostname", "service.name", "tier", "canary"]);
    }

    #[test]
    fn encodes_a_decodable_request() {
        let span = Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: "GET /x".into(),
            ..Default::default()
        };
        let resource = Resource {
            attributes: vec![attr("service.name", "APISIX")],
            ..Default::default()
        };
        let body = encode(&resource, vec![span.clone()]);
        let back = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        assert_eq!(back.resource_spans[0].scope_spans[0].spans, vec![span]);
        assert_eq!(
            back.resource_spans[0].resource.as_ref().unwrap().attributes[0].key,
            "service.name"
        );
    }
}
