//! `opentelemetry`: traces requests with W3C Trace Context and sends the
//! spans to an OpenTelemetry collector over OTLP/HTTP.
//!
//! Mirrors APISIX 3.18's plugin (priority 12009, `rewrite` and `log`):
//!
//! ```json
//! {"sampler": {"name": "parent_base", "options": {"root": {"name": "trace_id_ratio",
//!                                                          "options": {"fraction": 0.1}}}},
//!  "additional_attributes": ["remote_addr", "http_x_tenant"],
//!  "additional_header_prefix_attributes": ["x-my-*"]}
//! ```
//!
//! - The trace: the client's `traceparent` when it sent a valid one (its
//!   trace id, and its span as the parent), else a new trace id (from
//!   `X-Request-Id` when `trace_id_source` is `x-request-id` and the value
//!   is 32 hex digits, else random).
//! - `sampler` (default `always_off`, as APISIX) decides whether the trace
//!   is recorded; see [`sampler`]. Either way the upstream gets a
//!   `traceparent` naming this trace, with the `sampled` flag set as
//!   decided, so services behind the gateway follow the decision.
//! - A recorded request makes a `SERVER` span named `METHOD /route/uri`
//!   (APISIX's name and attributes: `http.*`, `url.*`, `apisix.route_id`,
//!   `apisix.route_name`, `http.route`, `apisix.service_*`,
//!   `apisix.response_source`, the status, an `ERROR` status from 500 on),
//!   plus `additional_attributes` (variables, read at the end) and
//!   `additional_header_prefix_attributes` (request headers by name, or by
//!   prefix with a trailing `*`). When the request went to an upstream, a
//!   `CLIENT` span child of it covers the upstream call, and the
//!   `traceparent` the upstream got names that span as its parent.
//! - `set_ngx_var` (settings) sets `$opentelemetry_context_traceparent`,
//!   `$opentelemetry_trace_id` and `$opentelemetry_span_id` for the access
//!   log and later plugins.
//! - Where spans go, and how they are batched, is in [`exporter`].
//!
//! One trace per request: when the plugin is on a global rule and the
//! route, the first to run traces the request.
//!
//! Cost: a request that is not recorded pays for reading `traceparent`,
//! two random ids and one header. Recording builds the attributes once,
//! and queues the spans without waiting.

pub mod context;
pub mod exporter;
pub mod sampler;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::{request, HeaderMap, HeaderName, HeaderValue};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::{span, status, Span, Status};
use serde_json::Value;

use crate::ctx::{Ctx, PluginVars};
use crate::plugin::{CompileCx, Flow, Phases, Plugin, PluginSpec, SchemaType};
use crate::registry::cached;
use crate::schema::Schema;

use context::{Parent, SpanId, TraceId, SAMPLED};
use exporter::{attr, int_attr, Exporter, Settings};
use sampler::Sampler;

pub const NAME: &str = "opentelemetry";
pub const PRIORITY: i32 = 12009;

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// OTLP span flags: the W3C flags, plus whether the parent is known to be
/// remote, and whether it is.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

fn sampler_name(names: &'static [&'static str]) -> Schema {
    Schema::string().enumerated(names).done()
}

fn fraction() -> Schema {
    Schema::object()
        .prop("fraction", Schema::integer().number())
        .done()
}

fn build_schema() -> Schema {
    let root = Schema::object()
        .prop(
            "name",
            sampler_name(&["always_on", "always_off", "trace_id_ratio"]),
        )
        .prop("options", fraction())
        .done();
    let sampler = Schema::object()
        .prop(
            "name",
            sampler_name(&["always_on", "always_off", "trace_id_ratio", "parent_base"]),
        )
        .prop(
            "options",
            Schema::object()
                .prop("fraction", Schema::integer().number())
                .prop("root", root)
                .done(),
        )
        .done();
    let names = || Schema::array(Schema::string().min(1).done()).done();
    Schema::object()
        .prop("sampler", sampler)
        .prop("additional_attributes", names())
        .prop("additional_header_prefix_attributes", names())
        .done()
}

/// The route-side schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

fn scalar() -> Schema {
    Schema::OneOf(vec![
        Schema::Boolean,
        Schema::integer().number(),
        Schema::string().done(),
    ])
}

fn build_metadata_schema() -> Schema {
    let collector = Schema::object()
        .prop("address", Schema::string().done())
        .prop("request_timeout", Schema::integer().int())
        .prop(
            "request_headers",
            Schema::object().additional(scalar()).done(),
        )
        .done();
    let processor = Schema::object()
        .prop("drop_on_queue_full", Schema::Boolean)
        .prop("max_queue_size", Schema::integer().int())
        .prop("batch_timeout", Schema::integer().number())
        .prop("inactive_timeout", Schema::integer().number())
        .prop("max_export_batch_size", Schema::integer().int())
        .done();
    Schema::object()
        .prop(
            "trace_id_source",
            Schema::string()
                .enumerated(&["x-request-id", "random"])
                .done(),
        )
        .prop("resource", Schema::object().additional(scalar()).done())
        .prop("collector", collector)
        .prop("batch_span_processor", processor)
        .prop("set_ngx_var", Schema::Boolean)
        .done()
}

/// The `plugin_metadata` schema (also what `plugin_attr.opentelemetry`
/// holds).
pub fn metadata_schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_metadata_schema)
}

/// `additional_header_prefix_attributes`, compiled.
#[derive(Default)]
struct HeaderAttrs {
    exact: Vec<HeaderName>,
    prefixes: Vec<Box<str>>,
}

impl HeaderAttrs {
    fn compile(names: &[Value]) -> HeaderAttrs {
        let mut out = HeaderAttrs::default();
        for name in names.iter().filter_map(Value::as_str) {
            let lower = name.to_ascii_lowercase();
            match lower.strip_suffix('*') {
                Some(prefix) if lower.len() >= 2 => out.prefixes.push(prefix.into()),
                _ => {
                    if let Ok(h) = HeaderName::from_bytes(lower.as_bytes()) {
                        out.exact.push(h);
                    }
                }
            }
        }
        out
    }

    /// Attributes for the headers named, values of a repeated header
    /// joined with ", ".
    fn collect(&self, headers: &HeaderMap, out: &mut Vec<KeyValue>) {
        let joined = |name: &HeaderName| -> Option<String> {
            let mut text = String::new();
            for v in headers.get_all(name) {
                if !text.is_empty() {
                    text.push_str(", ");
                }
                text.push_str(&String::from_utf8_lossy(v.as_bytes()));
            }
            (!text.is_empty() || headers.contains_key(name)).then_some(text)
        };
        for name in &self.exact {
            if let Some(v) = joined(name) {
                out.push(attr(name.as_str(), v));
            }
        }
        for prefix in &self.prefixes {
            for name in headers.keys() {
                if name.as_str().starts_with(&**prefix) {
                    if let Some(v) = joined(name) {
                        out.push(attr(name.as_str(), v));
                    }
                }
            }
        }
    }
}

/// A recorded request's trace, from `rewrite` to `log`.
struct Recording {
    trace_id: TraceId,
    span_id: SpanId,
    /// The span the upstream call is recorded as.
    client_span_id: SpanId,
    parent: Option<SpanId>,
    trace_state: String,
    /// The request's arrival, in Unix nanoseconds and as an instant.
    start_unix: u64,
    start: Instant,
    name: String,
    method: String,
    attributes: Vec<KeyValue>,
}

/// The request's recording, taken by the `log` hook (which only sees the
/// context by shared reference).
struct Pending(Mutex<Option<Recording>>);

/// Marks a request traced but not recorded; zero-sized, so keeping it
/// allocates nothing.
struct Unrecorded;

/// A compiled configuration.
struct OpenTelemetry {
    sampler: Sampler,
    settings: Arc<Settings>,
    exporter: Arc<Exporter>,
    /// `additional_attributes`: variables read in `log`.
    vars: Box<[Box<str>]>,
    headers: HeaderAttrs,
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn nanos_between(from: Instant, to: Instant) -> u64 {
    u64::try_from(to.saturating_duration_since(from).as_nanos()).unwrap_or(u64::MAX)
}

impl OpenTelemetry {
    /// The server span's attributes known when the request arrives.
    fn request_attributes(&self, ctx: &Ctx, req: &request::Parts) -> (String, Vec<KeyValue>) {
        let method = req.method.as_str();
        let host = ctx.host.as_deref().unwrap_or("");
        let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let path = ctx.path.as_deref().unwrap_or_else(|| req.uri.path());
        let agent = req
            .headers
            .get(http::header::USER_AGENT)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        let scheme = ctx.conn.scheme;
        let mut attributes = Vec::with_capacity(18);
        attributes.extend([
            attr("net.host.name", host),
            attr("http.method", method),
            attr("http.scheme", scheme),
            attr("http.target", target),
            attr("http.user_agent", agent.clone()),
            attr("http.request.method", method),
            attr("url.scheme", scheme),
            attr("url.path", path),
            attr("user_agent.original", agent),
        ]);
        let mut name = method.to_string();
        if let Some(route) = ctx.route_id.as_deref() {
            let info = ctx.route.as_deref();
            attributes.push(attr("apisix.route_id", route));
            attributes.push(attr(
                "apisix.route_name",
                info.and_then(|r| r.name.as_deref()).unwrap_or(""),
            ));
            let pattern = ctx.matched_uri();
            attributes.push(attr("http.route", pattern));
            if !pattern.is_empty() {
                name.push(' ');
                name.push_str(pattern);
            }
        }
        if let Some(service) = ctx.service_id.as_deref() {
            attributes.push(attr("apisix.service_id", service));
            attributes.push(attr(
                "apisix.service_name",
                ctx.route
                    .as_deref()
                    .and_then(|r| r.service_name.as_deref())
                    .unwrap_or(""),
            ));
        }
        self.headers.collect(&req.headers, &mut attributes);
        (name, attributes)
    }

    fn trace_id(&self, parent: Option<&Parent>, headers: &HeaderMap) -> TraceId {
        if let Some(p) = parent {
            return p.trace_id;
        }
        if self.settings.trace_id_from_request_id {
            if let Some(id) = headers
                .get(&X_REQUEST_ID)
                .and_then(|v| context::trace_id_from_request_id(v.as_bytes()))
            {
                return id;
            }
        }
        context::new_trace_id()
    }

    fn server_span(&self, ctx: &Ctx, rec: &mut Recording, end: Instant) -> Span {
        let mut attributes = std::mem::take(&mut rec.attributes);
        let source = ctx.upstream.response_source();
        attributes.push(attr("apisix.response_source", source));
        let code = ctx.status.map_or(0, |s| i64::from(s.as_u16()));
        attributes.push(int_attr("http.status_code", code));
        attributes.push(int_attr("http.response.status_code", code));
        for name in self.vars.iter() {
            if let Some(v) = ctx.var(None, name) {
                attributes.push(attr(name, v.into_owned()));
            }
        }
        let status = (code >= 500).then(|| Status {
            code: status::StatusCode::Error as i32,
            message: format!("{source} error: {code}"),
        });
        let remote = if rec.parent.is_some() { IS_REMOTE } else { 0 };
        Span {
            trace_id: rec.trace_id.to_vec(),
            span_id: rec.span_id.to_vec(),
            parent_span_id: rec.parent.map(|p| p.to_vec()).unwrap_or_default(),
            trace_state: std::mem::take(&mut rec.trace_state),
            flags: u32::from(SAMPLED) | HAS_IS_REMOTE | remote,
            name: std::mem::take(&mut rec.name),
            kind: span::SpanKind::Server as i32,
            start_time_unix_nano: rec.start_unix,
            end_time_unix_nano: rec.start_unix + nanos_between(rec.start, end),
            attributes,
            status,
            ..Default::default()
        }
    }

    /// The span of the upstream call, when there was one.
    fn client_span(&self, ctx: &Ctx, rec: &Recording, end: Instant) -> Option<Span> {
        let started = ctx.upstream.started?;
        let mut attributes = vec![attr("http.request.method", rec.method.clone())];
        if let Some(addr) = &ctx.upstream.addr {
            attributes.push(attr("server.address", addr.host()));
            if let Some(port) = addr.port_u16() {
                attributes.push(int_attr("server.port", i64::from(port)));
            }
        }
        if let Some(scheme) = ctx.upstream.scheme {
            attributes.push(attr("url.scheme", scheme));
        }
        let status = match ctx.upstream.status {
            Some(code) => {
                attributes.push(int_attr("http.response.status_code", i64::from(code)));
                (code >= 500).then(|| format!("upstream error: {code}"))
            }
            None => Some("no response from the upstream".to_string()),
        }
        .map(|message| Status {
            code: status::StatusCode::Error as i32,
            message,
        });
        Some(Span {
            trace_id: rec.trace_id.to_vec(),
            span_id: rec.client_span_id.to_vec(),
            parent_span_id: rec.span_id.to_vec(),
            flags: u32::from(SAMPLED) | HAS_IS_REMOTE,
            name: rec.method.clone(),
            kind: span::SpanKind::Client as i32,
            start_time_unix_nano: rec.start_unix + nanos_between(rec.start, started),
            end_time_unix_nano: rec.start_unix + nanos_between(rec.start, end),
            attributes,
            status,
            ..Default::default()
        })
    }
}

impl Plugin for OpenTelemetry {
    fn phases(&self) -> Phases {
        Phases::REWRITE | Phases::LOG
    }

    fn rewrite(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        if ctx.data.get::<Pending>().is_some() || ctx.data.get::<Unrecorded>().is_some() {
            return Flow::Continue;
        }
        let parent = req
            .headers
            .get(&TRACEPARENT)
            .and_then(|v| context::parse_traceparent(v.as_bytes()));
        let trace_id = self.trace_id(parent.as_ref(), &req.headers);
        let sampled = self.sampler.sampled(parent.as_ref(), &trace_id);
        let flags = if sampled { SAMPLED } else { 0 };
        let span_id = context::new_span_id();
        let client_span_id = context::new_span_id();
        let outgoing = context::traceparent(&trace_id, &client_span_id, flags);
        if let Ok(v) = HeaderValue::from_bytes(&outgoing) {
            req.headers.insert(TRACEPARENT.clone(), v);
        }
        if self.settings.set_vars {
            let vars = ctx.data.get_or_insert_default::<PluginVars>();
            let own = context::traceparent(&trace_id, &span_id, flags);
            vars.set(
                "opentelemetry_context_traceparent",
                String::from_utf8_lossy(&own),
            );
            vars.set("opentelemetry_trace_id", context::hex(&trace_id));
            vars.set("opentelemetry_span_id", context::hex(&span_id));
        }
        if !sampled {
            ctx.data.insert(Unrecorded);
            return Flow::Continue;
        }
        let recording = {
            let (name, attributes) = self.request_attributes(ctx, req);
            let start = ctx.started;
            let start_unix =
                unix_nanos(SystemTime::now()).saturating_sub(nanos_between(start, Instant::now()));
            Recording {
                trace_id,
                span_id,
                client_span_id,
                parent: parent.map(|p| p.span_id),
                trace_state: req
                    .headers
                    .get(&TRACESTATE)
                    .filter(|_| parent.is_some())
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string(),
                start_unix,
                start,
                name,
                method: req.method.as_str().to_string(),
                attributes,
            }
        };
        ctx.data.insert(Pending(Mutex::new(Some(recording))));
        Flow::Continue
    }

    fn log(&self, ctx: &Ctx) {
        let Some(pending) = ctx.data.get::<Pending>() else {
            return;
        };
        let taken = pending.0.lock().map(|mut r| r.take()).unwrap_or(None);
        let Some(mut rec) = taken else { return };
        let end = ctx.finished().at;
        if let Some(client) = self.client_span(ctx, &rec, end) {
            self.exporter.export(|| client);
        }
        let server = self.server_span(ctx, &mut rec, end);
        self.exporter.export(|| server);
    }

    fn reads_request(&self) -> bool {
        !self.vars.is_empty()
    }

    fn reads_response_headers(&self) -> bool {
        self.vars.iter().any(|v| v.starts_with("sent_http_"))
    }
}

/// The registry entry.
pub struct OpenTelemetrySpec;

impl PluginSpec for OpenTelemetrySpec {
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

    fn check(&self, conf: &Value, target: SchemaType) -> Result<(), String> {
        if target == SchemaType::Metadata {
            metadata_schema().validate(conf)?;
            return Settings::from_conf(Some(conf)).map(|_| ());
        }
        schema().validate(conf)
    }

    fn compile(&self, conf: &Value, cx: &CompileCx<'_>) -> Result<Arc<dyn Plugin>, String> {
        // The metadata when set (APISIX 3.18), else config.yaml's
        // plugin_attr (earlier 3.x), else the defaults.
        let source = cx.metadata.or(cx.attr).filter(|v| v.is_object());
        let settings = match Settings::from_conf(source) {
            Ok(s) => s,
            Err(e) if cx.metadata.is_none() => {
                tracing::warn!(error = %e, "plugin_attr.opentelemetry unusable; default collector used");
                Settings::from_conf(None)?
            }
            Err(e) => return Err(e),
        };
        let key = format!(
            "exporter:{}",
            crate::plugin::conf_hash(source.unwrap_or(&Value::Null))
        );
        let exporter = cx.shared_state(&key, || Exporter::new(&settings));
        let list = |k: &str| {
            conf.get(k)
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default()
        };
        Ok(Arc::new(OpenTelemetry {
            sampler: Sampler::from_conf(conf.get("sampler")),
            settings: Arc::new(settings),
            exporter,
            vars: list("additional_attributes")
                .iter()
                .filter_map(Value::as_str)
                .map(Into::into)
                .collect(),
            headers: HeaderAttrs::compile(list("additional_header_prefix_attributes")),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use serde_json::json;

    #[test]
    fn schema_matches_apisix() {
        let ok = |c: Value| OpenTelemetrySpec.check(&c, SchemaType::Route);
        assert!(ok(json!({})).is_ok());
        assert!(
            ok(json!({"sampler": {"name": "trace_id_ratio", "options": {"fraction": 0.5}}}))
                .is_ok()
        );
        let err = testing::refusal(NAME, &json!({"sampler": {"name": "sometimes"}}));
        assert!(err.contains("sampler"), "{err}");
        let err = testing::refusal(
            NAME,
            &json!({"sampler": {"name": "parent_base", "options": {"root": {"name": "parent_base"}}}}),
        );
        assert!(err.contains("root"), "{err}");
        let err = testing::refusal(NAME, &json!({"additional_attributes": [""]}));
        assert!(err.contains("additional_attributes"), "{err}");
        let meta = |c: Value| OpenTelemetrySpec.check(&c, SchemaType::Metadata);
        assert!(meta(json!({"collector": {"address": "127.0.0.1:4318"}})).is_ok());
        assert!(meta(json!({"trace_id_source": "header"})).is_err());
        assert!(meta(json!({"collector": {"address": "https://otel:4318"}})).is_ok());
        assert!(meta(json!({"collector": {"address": "udp://otel:4318"}}))
            .unwrap_err()
            .contains("unknown scheme"));
    }

    #[tokio::test]
    async fn traceparent_goes_upstream_as_sampled() {
        let run = |sampler: Value, incoming: Option<&'static str>| async move {
            let set = testing::compile(&json!({"opentelemetry": {"sampler": sampler}}))
                .expect("compiles");
            let chain = testing::chain(Vec::new(), set, Default::default());
            let headers: Vec<(&str, &str)> = incoming
                .map(|v| vec![("traceparent", v)])
                .unwrap_or_default();
            let answer = testing::send(chain, testing::request("10.0.0.1", "/x", &headers)).await;
            answer.upstream_header("traceparent").expect("traceparent")
        };
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let on = run(json!({"name": "always_on"}), Some(parent)).await;
        let p = context::parse_traceparent(on.as_bytes()).expect("valid");
        assert_eq!(
            context::hex(&p.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_ne!(context::hex(&p.span_id), "00f067aa0ba902b7");
        assert!(p.sampled());
        let off = run(json!({"name": "always_off"}), Some(parent)).await;
        assert!(off.ends_with("-00"), "{off}");
        let fresh = run(json!({"name": "always_on"}), None).await;
        let p = context::parse_traceparent(fresh.as_bytes()).expect("valid");
        assert_ne!(
            context::hex(&p.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        // An invalid client value starts a new trace rather than going on.
        let bad = run(json!({"name": "always_on"}), Some("00-zz-00-01")).await;
        assert!(
            context::parse_traceparent(bad.as_bytes()).is_some(),
            "{bad}"
        );
    }

    #[test]
    fn header_attributes_by_name_and_prefix() {
        let attrs = HeaderAttrs::compile(&[json!("X-Tenant"), json!("x-my-*"), json!("*")]);
        let mut headers = HeaderMap::new();
        headers.insert("x-tenant", HeaderValue::from_static("acme"));
        headers.append("x-my-a", HeaderValue::from_static("1"));
        headers.append("x-my-a", HeaderValue::from_static("2"));
        headers.insert("x-my-b", HeaderValue::from_static("3"));
        headers.insert("other", HeaderValue::from_static("no"));
        let mut out = Vec::new();
        attrs.collect(&headers, &mut out);
        let mut got: Vec<(String, String)> = out
            .into_iter()
            .map(|kv| {
                let v = match kv.value.and_then(|v| v.value) {
                    Some(
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s),
                    ) => s,
                    _ => String::new(),
                };
                (kv.key, v)
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("x-my-a".to_string(), "1, 2".to_string()),
                ("x-my-b".to_string(), "3".to_string()),
                ("x-tenant".to_string(), "acme".to_string()),
            ]
        );
    }
}
