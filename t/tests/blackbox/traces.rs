#![allow(clippy::unwrap_used)]
//! opentelemetry against a real OTLP/HTTP collector (protobuf decoded with
//! the OpenTelemetry project's own message types): the client's trace
//! continues through the gateway to the upstream, spans arrive with the
//! right parents, samplers decide, settings come from plugin_metadata or
//! config.yaml's plugin_attr.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};
use prost::Message;
use tokio::net::TcpListener;

use harness::serde_json::json;
use harness::{send, upstream, Gateway, Resp, Upstream};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// One export request as the collector saw it.
struct Export {
    path: String,
    content_type: String,
    auth: String,
    body: ExportTraceServiceRequest,
}

/// An OTLP/HTTP collector on a free port.
struct Collector {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Export>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got: Arc<Mutex<Vec<Export>>> = Arc::default();
        let sink = got.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let sink = sink.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let sink = sink.clone();
                            async move {
                                let header = |n: &str| {
                                    req.headers()
                                        .get(n)
                                        .and_then(|v| v.to_str().ok())
                                        .unwrap_or("")
                                        .to_string()
                                };
                                let (path, content_type, auth) = (
                                    req.uri().path().to_string(),
                                    header("content-type"),
                                    header("authorization"),
                                );
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let body = ExportTraceServiceRequest::decode(body).unwrap();
                                sink.lock().unwrap().push(Export {
                                    path,
                                    content_type,
                                    auth,
                                    body,
                                });
                                Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::new())))
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Collector { addr, got, task }
    }

    /// Every span received so far.
    fn spans(&self) -> Vec<Span> {
        let got = self.got.lock().unwrap();
        got.iter()
            .flat_map(|e| &e.body.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| s.spans.clone())
            .collect()
    }

    /// Waits until at least `n` spans arrived.
    async fn wait_spans(&self, n: usize) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let spans = self.spans();
            if spans.len() >= n {
                return spans;
            }
            assert!(Instant::now() < deadline, "{} spans, want {n}", spans.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn text(attrs: &[KeyValue], key: &str) -> String {
    match attr(attrs, key) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        other => panic!("{key}: {other:?}"),
    }
}

fn int(attrs: &[KeyValue], key: &str) -> i64 {
    match attr(attrs, key) {
        Some(any_value::Value::IntValue(v)) => *v,
        other => panic!("{key}: {other:?}"),
    }
}

/// The `traceparent` the upstream received, split in its four fields.
fn upstream_traceparent(r: &Resp) -> Vec<String> {
    let tp = r.json()["headers"]["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("no traceparent upstream: {}", r.text()))
        .to_string();
    tp.split('-').map(str::to_string).collect()
}

async fn get(gw: &Gateway, path: &str, headers: &[(&str, String)]) -> Resp {
    send(gw.data, "GET", path, headers, String::new(), None).await
}

/// Metadata sending to `collector`, batches after 100 ms of quiet.
fn metadata(collector: &Collector) -> harness::serde_json::Value {
    json!({"collector": {"address": collector.addr.to_string(),
                         "request_headers": {"Authorization": "token-1"}},
           "resource": {"service.name": "edge", "zone": "a"},
           "batch_span_processor": {"inactive_timeout": 0.1, "batch_timeout": 0.2}})
}

#[tokio::test]
async fn client_trace_continues_to_the_upstream_and_the_collector() {
    let gw = Gateway::start().await;
    let up = Upstream::start("u").await;
    let collector = Collector::start().await;
    gw.put("plugin_metadata/opentelemetry", metadata(&collector))
        .await;
    gw.put(
        "routes/traced",
        json!({"uri": "/traced/*", "name": "traced-route", "upstream": upstream(&[(&up.node(), 1)]),
               "plugins": {"opentelemetry": {
                   "sampler": {"name": "parent_base", "options": {"root": {"name": "always_off"}}},
                   "additional_attributes": ["remote_addr", "route_id", "upstream_status"],
                   "additional_header_prefix_attributes": ["x-tenant-*", "X-Plain"]}}}),
    )
    .await;
    let r = get(
        &gw,
        "/traced/a?q=1",
        &[
            ("traceparent", format!("00-{TRACE}-{PARENT}-01")),
            ("tracestate", "vendor=1".to_string()),
            ("x-tenant-id", "acme".to_string()),
            ("x-plain", "p".to_string()),
            ("user-agent", "tracer-test".to_string()),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let fields = upstream_traceparent(&r);
    assert_eq!(fields[0], "00");
    assert_eq!(fields[1], TRACE, "the client's trace goes on");
    assert_ne!(
        fields[2], PARENT,
        "the upstream's parent is the gateway's span"
    );
    assert_eq!(fields[3], "01");

    let spans = collector.wait_spans(2).await;
    assert_eq!(spans.len(), 2, "{spans:?}");
    let server = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .unwrap();
    let client = spans
        .iter()
        .find(|s| s.kind == SpanKind::Client as i32)
        .unwrap();
    // Server span: child of the client's span, in the client's trace.
    assert_eq!(hex(&server.trace_id), TRACE);
    assert_eq!(hex(&server.parent_span_id), PARENT);
    assert_eq!(server.trace_state, "vendor=1");
    assert_eq!(server.name, "GET /traced/*");
    let a = &server.attributes;
    assert_eq!(text(a, "http.method"), "GET");
    assert_eq!(text(a, "http.request.method"), "GET");
    assert_eq!(text(a, "http.target"), "/traced/a?q=1");
    assert_eq!(text(a, "url.path"), "/traced/a");
    assert_eq!(text(a, "url.scheme"), "http");
    assert_eq!(text(a, "user_agent.original"), "tracer-test");
    assert_eq!(text(a, "apisix.route_id"), "traced");
    assert_eq!(text(a, "apisix.route_name"), "traced-route");
    assert_eq!(text(a, "http.route"), "/traced/*");
    assert_eq!(text(a, "apisix.response_source"), "upstream");
    assert_eq!(int(a, "http.status_code"), 200);
    assert_eq!(int(a, "http.response.status_code"), 200);
    assert_eq!(text(a, "remote_addr"), "127.0.0.1");
    assert_eq!(text(a, "route_id"), "traced");
    assert_eq!(text(a, "upstream_status"), "200");
    assert_eq!(text(a, "x-tenant-id"), "acme");
    assert_eq!(text(a, "x-plain"), "p");
    assert!(server.status.is_none());
    assert!(server.end_time_unix_nano >= server.start_time_unix_nano);
    // Client span: the upstream call, child of the server span; its id is
    // the parent the upstream was told about.
    assert_eq!(hex(&client.trace_id), TRACE);
    assert_eq!(client.parent_span_id, server.span_id);
    assert_eq!(hex(&client.span_id), fields[2]);
    assert_eq!(client.name, "GET");
    assert_eq!(text(&client.attributes, "server.address"), "127.0.0.1");
    assert_eq!(
        int(&client.attributes, "server.port"),
        i64::from(up.addr.port())
    );
    assert_eq!(int(&client.attributes, "http.response.status_code"), 200);
    assert!(client.start_time_unix_nano >= server.start_time_unix_nano);
    assert!(client.end_time_unix_nano <= server.end_time_unix_nano);

    // The export itself: OTLP/HTTP protobuf, with the configured header
    // and resource.
    {
        let got = collector.got.lock().unwrap();
        let e = &got[0];
        assert_eq!(e.path, "/v1/traces");
        assert_eq!(e.content_type, "application/x-protobuf");
        assert_eq!(e.auth, "token-1");
        let resource = e.body.resource_spans[0].resource.as_ref().unwrap();
        assert_eq!(text(&resource.attributes, "service.name"), "edge");
        assert_eq!(text(&resource.attributes, "zone"), "a");
        assert!(!text(&resource.attributes, "hostname").is_empty());
    }

    // parent_base follows an unsampled parent: nothing recorded, and the
    // upstream is told so.
    let r = get(
        &gw,
        "/traced/b",
        &[("traceparent", format!("00-{TRACE}-{PARENT}-00"))],
    )
    .await;
    let fields = upstream_traceparent(&r);
    assert_eq!((fields[1].as_str(), fields[3].as_str()), (TRACE, "00"));
    // No parent: the root sampler (always_off) decides; a new trace.
    let r = get(&gw, "/traced/c", &[]).await;
    let fields = upstream_traceparent(&r);
    assert_ne!(fields[1], TRACE);
    assert_eq!(fields[3], "00");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(collector.spans().len(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn samplers_errors_and_request_id_traces() {
    let gw = Gateway::start().await;
    let up = Upstream::start("u").await;
    let collector = Collector::start().await;
    let mut meta = metadata(&collector);
    meta["trace_id_source"] = json!("x-request-id");
    gw.put("plugin_metadata/opentelemetry", meta).await;
    let route = |uri: &str, sampler: harness::serde_json::Value| {
        json!({"uri": uri, "upstream": upstream(&[(&up.node(), 1)]),
               "plugins": {"opentelemetry": {"sampler": sampler}}})
    };
    gw.put("routes/on", route("/on", json!({"name": "always_on"})))
        .await;
    gw.put("routes/off", route("/off", json!({}))).await;
    gw.put(
        "routes/half",
        route(
            "/half",
            json!({"name": "trace_id_ratio", "options": {"fraction": 0.5}}),
        ),
    )
    .await;

    // The default sampler is always_off, and a client's sampled parent does
    // not change that.
    for _ in 0..3 {
        let r = get(
            &gw,
            "/off",
            &[("traceparent", format!("00-{TRACE}-{PARENT}-01"))],
        )
        .await;
        assert_eq!(upstream_traceparent(&r)[3], "00");
    }
    // A 32-hex X-Request-Id becomes the trace id; an upstream 503 marks the
    // server span as an error.
    let request_id = "0AF7651916CD43DD8448EB211C80319C";
    let r = get(
        &gw,
        "/on?status=503",
        &[("x-request-id", request_id.to_string())],
    )
    .await;
    assert_eq!(r.status, 503);
    assert_eq!(upstream_traceparent(&r)[1], request_id.to_ascii_lowercase());
    // trace_id_ratio decides by the trace id: the low 63 bits against half
    // their range.
    let low = "00000000000000000000000000000001";
    let high = "0000000000000000ffffffffffffffff";
    let sampled_low =
        upstream_traceparent(&get(&gw, "/half", &[("x-request-id", low.to_string())]).await);
    let sampled_high =
        upstream_traceparent(&get(&gw, "/half", &[("x-request-id", high.to_string())]).await);
    assert_eq!(sampled_low[3], "01");
    assert_eq!(sampled_high[3], "00");

    let spans = collector.wait_spans(4).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans_now = collector.spans();
    assert_eq!(spans_now.len(), 4, "{spans:?}");
    let servers: Vec<&Span> = spans_now
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32)
        .collect();
    assert_eq!(servers.len(), 2);
    let error = servers.iter().find(|s| s.name == "GET /on").unwrap();
    assert_eq!(hex(&error.trace_id), request_id.to_ascii_lowercase());
    assert!(error.parent_span_id.is_empty());
    let status = error.status.as_ref().unwrap();
    assert_eq!(status.code, 2);
    assert_eq!(status.message, "upstream error: 503");
    assert_eq!(int(&error.attributes, "http.status_code"), 503);
    assert!(servers.iter().any(|s| hex(&s.trace_id) == low));
    gw.stop().await;
}

/// Waits until the file has a line.
async fn first_line(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(line) = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.lines().next().map(str::to_string))
        {
            return line;
        }
        assert!(Instant::now() < deadline, "no line in {}", path.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn plugin_attr_settings_and_trace_ids_in_the_access_log() {
    // No metadata: config.yaml's plugin_attr names the collector (APISIX
    // before 3.18 read it there), and set_ngx_var exposes the ids.
    let collector = Collector::start().await;
    let gw = Gateway::start_with(&format!(
        "plugin_attr:\n  prometheus:\n    enable_export_server: false\n  opentelemetry:\n    set_ngx_var: true\n    collector:\n      address: {}\n    batch_span_processor:\n      inactive_timeout: 0.1\n\
         nginx_config:\n  http:\n    access_log: logs/trace.log\n    access_log_format: '$opentelemetry_trace_id $opentelemetry_span_id $opentelemetry_context_traceparent'\n",
        collector.addr
    ))
    .await;
    gw.put(
        "global_rules/otel",
        json!({"plugins": {"opentelemetry": {"sampler": {"name": "always_on"}}}}),
    )
    .await;
    // Unrouted: the global rule still traces, with no client span.
    let r = get(
        &gw,
        "/nowhere",
        &[("traceparent", format!("00-{TRACE}-{PARENT}-01"))],
    )
    .await;
    assert_eq!(r.status, 404);
    let spans = collector.wait_spans(1).await;
    assert_eq!(spans[0].name, "GET");
    assert_eq!(hex(&spans[0].trace_id), TRACE);
    assert_eq!(
        text(&spans[0].attributes, "apisix.response_source"),
        "apisix"
    );
    let line = first_line(&gw.dir.path().join("logs/trace.log")).await;
    let parts: Vec<&str> = line.split(' ').collect();
    assert_eq!(parts[0], TRACE);
    assert_eq!(parts[1], hex(&spans[0].span_id));
    assert_eq!(parts[2], format!("00-{TRACE}-{}-01", parts[1]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        collector.spans().len(),
        1,
        "no client span without an upstream"
    );
    gw.stop().await;
}

#[tokio::test]
async fn collector_down_never_holds_requests() {
    let gw = Gateway::start().await;
    let up = Upstream::start("u").await;
    gw.put(
        "plugin_metadata/opentelemetry",
        json!({"collector": {"address": harness::refused_addr().to_string()},
               "batch_span_processor": {"max_queue_size": 16, "inactive_timeout": 0.1}}),
    )
    .await;
    gw.put(
        "routes/r",
        json!({"uri": "/r", "upstream": upstream(&[(&up.node(), 1)]),
               "plugins": {"opentelemetry": {"sampler": {"name": "always_on"}}}}),
    )
    .await;
    let start = Instant::now();
    for _ in 0..200 {
        assert_eq!(get(&gw, "/r", &[]).await.status, 200);
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    // A collector address it cannot use is refused, the running settings
    // kept.
    let r = gw
        .admin(
            "PUT",
            "plugin_metadata/opentelemetry",
            Some(json!({"collector": {"address": "grpc://otel:4317"}})),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("unknown scheme"), "{}", r.text());
    assert_eq!(get(&gw, "/r", &[]).await.status, 200);
    gw.stop().await;
}
