//! `prometheus`: counts the requests of the routes, services and global
//! rules it is enabled on, under APISIX's metric names.
//!
//! Mirrors APISIX 3.18's plugin (priority 500, `log` phase):
//!
//! ```json
//! {"prefer_name": false}
//! ```
//!
//! Each request adds, with the labels APISIX gives them (see
//! [`exporter::STATUS_LABELS`] and [`exporter::TYPED_LABELS`]):
//! - `apisix_http_status` 1, labelled with the status, the route and
//!   service ids (their names with `prefer_name`), the route pattern and
//!   host pattern that matched, the consumer and the upstream node's IP;
//!   `request_type` is `traditional_http`, `response_source` says who
//!   answered (`upstream`, `nginx` for a gateway error after trying an
//!   upstream, `apisix` for a plugin's or the router's answer);
//! - `apisix_http_latency` (histogram, milliseconds) of `type` `request`
//!   (the whole exchange), `upstream` (from the first try at an upstream
//!   to the end of the response) and `apisix` (the difference);
//! - `apisix_bandwidth` of `type` `ingress` (`$request_length`) and
//!   `egress` (`$bytes_sent`).
//!
//! `plugin_metadata/prometheus` `disabled_labels` blanks the listed labels
//! of a metric (never the ones that tell its series apart: `code`, `type`).
//!
//! Cost per request: one lock-free look-up of the request's series in a
//! short list the plugin keeps (label values compared, nothing allocated),
//! then atomic adds. A series is made (and its labels allocated) the first
//! time a label combination is seen. The exposition is built by the
//! exporter, off the request path (see [`exporter`]).

pub mod exporter;
mod series;

use std::sync::{Arc, OnceLock};

use serde_json::{json, Value};

use crate::ctx::Ctx;
use crate::plugin::{CompileCx, Phases, Plugin, PluginSpec, SchemaType};
use crate::registry::cached;
use crate::schema::Schema;

pub use exporter::{Metrics, Settings};
use series::{LabelMask, Probe, SeriesCache};

pub const NAME: &str = "prometheus";
pub const PRIORITY: i32 = 500;

fn build_schema() -> Schema {
    Schema::object()
        .prop(
            "prefer_name",
            Schema::Custom(
                |v| Schema::Boolean.validate(v),
                || json!({"type": "boolean", "default": false}),
            ),
        )
        .done()
}

/// The configuration schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

/// Labels of APISIX's LLM metrics (kept in the metadata schema so that
/// APISIX's `disabled_labels` are accepted as they are).
const LLM_LABELS: [&str; 7] = [
    "route_id",
    "service_id",
    "consumer",
    "node",
    "request_type",
    "request_llm_model",
    "llm_model",
];

/// Every metric APISIX lets `disabled_labels` name, with the labels that
/// may be blanked (APISIX's `metric_label_map` less the structural ones:
/// `code` and `type` come first in their lists).
const DISABLABLE: &[(&str, &[&str])] = &[
    ("http_status", exporter::STATUS_LABELS.split_at(1).1),
    ("http_latency", exporter::TYPED_LABELS.split_at(1).1),
    ("bandwidth", exporter::TYPED_LABELS.split_at(1).1),
    ("llm_latency", &LLM_LABELS),
    ("llm_prompt_tokens", &LLM_LABELS),
    ("llm_completion_tokens", &LLM_LABELS),
    (
        "llm_active_connections",
        &[
            "route",
            "route_id",
            "matched_uri",
            "matched_host",
            "service",
            "service_id",
            "consumer",
            "node",
            "request_type",
            "request_llm_model",
            "llm_model",
        ],
    ),
    ("llm_prompt_tokens_dist", &LLM_LABELS),
    ("llm_completion_tokens_dist", &LLM_LABELS),
];

fn build_metadata_schema() -> Schema {
    let mut disabled = Schema::object();
    for (metric, labels) in DISABLABLE {
        disabled = disabled.prop(
            metric,
            Schema::array(Schema::string().enumerated(labels).done()).done(),
        );
    }
    Schema::object()
        .prop("disabled_labels", disabled.no_additional().done())
        .done()
}

/// The `plugin_metadata` schema.
pub fn metadata_schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_metadata_schema)
}

/// The compiled plugin of one object.
pub struct Prometheus {
    metrics: Arc<Metrics>,
    prefer_name: bool,
    mask: LabelMask,
    series: SeriesCache,
}

impl Prometheus {
    pub fn new(metrics: Arc<Metrics>, conf: &Value, metadata: Option<&Value>) -> Prometheus {
        Prometheus {
            metrics,
            prefer_name: conf
                .get("prefer_name")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            mask: LabelMask::from_metadata(metadata),
            series: SeriesCache::default(),
        }
    }
}

/// The upstream node's IP, as APISIX's `balancer_ip`.
fn node_ip(ctx: &Ctx) -> &str {
    ctx.upstream
        .addr
        .as_ref()
        .map_or("", |a| authority_ip(a.as_str()))
}

/// The address of a node's `host:port` (`[v6]:port` gives `v6`). The
/// balancer writes these authorities itself, always with a port and never
/// with user info, so splitting at the last colon is enough; it spares
/// `Authority::host`'s general parse on every request.
fn authority_ip(authority: &str) -> &str {
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    };
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

impl Plugin for Prometheus {
    fn phases(&self) -> Phases {
        Phases::LOG
    }

    fn reads_sizes(&self) -> bool {
        true
    }

    fn log(&self, ctx: &Ctx) {
        let route_info = ctx.route.as_deref();
        let mut route = ctx.route_id.as_deref().unwrap_or("");
        let mut service = ctx.service_id.as_deref().unwrap_or("");
        if self.prefer_name {
            if let Some(name) = route_info.and_then(|r| r.name.as_deref()) {
                route = name;
            }
            if let Some(name) = route_info.and_then(|r| r.service_name.as_deref()) {
                service = name;
            }
        }
        let upstream = &ctx.upstream;
        let source = match upstream.response_source() {
            "upstream" => series::Source::Upstream,
            "nginx" => series::Source::Nginx,
            _ => series::Source::Apisix,
        };
        let probe = Probe {
            code: ctx.status.map_or(0, |s| s.as_u16()),
            source,
            labels: [
                route,
                service,
                ctx.consumer_name().unwrap_or(""),
                node_ip(ctx),
                ctx.matched_uri(),
                route_info.map_or("", |r| r.matched_host(ctx.host.as_deref())),
            ],
        };
        let (request_ms, upstream_ms, apisix_ms) = ctx.finished().latencies_ms();
        let sample = series::Sample {
            request_ms,
            upstream_ms,
            apisix_ms,
            ingress: ctx.request_length,
            egress: ctx.header_bytes_sent + ctx.body_bytes_sent,
        };
        let extra = &self.metrics.settings.extra_labels;
        if extra.is_empty() {
            self.series
                .record(&self.metrics, &self.mask, &probe, &[], &sample);
        } else {
            let values: Vec<String> = extra
                .http_status
                .iter()
                .chain(&extra.http_latency)
                .chain(&extra.bandwidth)
                .map(|(_, var)| {
                    ctx.var(None, var)
                        .map(|v| v.into_owned())
                        .unwrap_or_default()
                })
                .collect();
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            self.series
                .record(&self.metrics, &self.mask, &probe, &values, &sample);
        }
    }
}

/// The registry entry.
pub struct PrometheusSpec;

impl PluginSpec for PrometheusSpec {
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
        match target {
            SchemaType::Metadata => metadata_schema().validate(conf),
            _ => schema().validate(conf),
        }
    }

    fn compile(&self, conf: &Value, cx: &CompileCx<'_>) -> Result<Arc<dyn Plugin>, String> {
        let metrics = Metrics::install(cx.attr)?;
        Ok(Arc::new(Prometheus::new(metrics, conf, cx.metadata)))
    }
}

#[cfg(test)]
mod tests;
