//! The process-wide metric families, their settings from
//! `plugin_attr.prometheus`, and the cached exposition the export server
//! serves.
//!
//! Settings (APISIX's keys and defaults):
//!
//! ```yaml
//! plugin_attr:
//!   prometheus:
//!     export_uri: /apisix/prometheus/metrics
//!     export_addr: {ip: 127.0.0.1, port: 9091}
//!     enable_export_server: true     # false: served through `public-api`
//!     metric_prefix: apisix_
//!     refresh_interval: 15           # seconds between expositions
//!     default_buckets: [1, 2, 5, ...] # apisix_http_latency, milliseconds
//!     metrics:
//!       http_status:
//!         extra_labels: [{upstream_addr: $upstream_addr}]
//! ```
//!
//! The settings are read once, when the gateway starts (APISIX too needs a
//! restart for them). Bad settings fail the start with a message naming the
//! key.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use prometheus::core::Collector;
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde_json::Value;

/// APISIX's latency buckets, in milliseconds.
pub const DEFAULT_BUCKETS: [f64; 15] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 30000.0,
    60000.0,
];
pub const DEFAULT_EXPORT_URI: &str = "/apisix/prometheus/metrics";
pub const DEFAULT_EXPORT_PORT: u16 = 9091;
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(15);

/// Labels of `apisix_http_status`, in APISIX's order.
pub const STATUS_LABELS: [&str; 11] = [
    "code",
    "route",
    "matched_uri",
    "matched_host",
    "service",
    "consumer",
    "node",
    "request_type",
    "request_llm_model",
    "llm_model",
    "response_source",
];
/// Labels of `apisix_http_latency` and `apisix_bandwidth`.
pub const TYPED_LABELS: [&str; 8] = [
    "type",
    "route",
    "service",
    "consumer",
    "node",
    "request_type",
    "request_llm_model",
    "llm_model",
];

/// `metrics.{name}.extra_labels`: label names and the variable each reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExtraLabels {
    pub http_status: Vec<(String, String)>,
    pub http_latency: Vec<(String, String)>,
    pub bandwidth: Vec<(String, String)>,
}

impl ExtraLabels {
    pub fn is_empty(&self) -> bool {
        self.http_status.is_empty() && self.http_latency.is_empty() && self.bandwidth.is_empty()
    }
}

/// `plugin_attr.prometheus`.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub export_uri: String,
    pub export_addr: SocketAddr,
    pub enable_export_server: bool,
    pub metric_prefix: String,
    pub refresh_interval: Duration,
    pub buckets: Vec<f64>,
    pub extra_labels: ExtraLabels,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            export_uri: DEFAULT_EXPORT_URI.into(),
            export_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_EXPORT_PORT),
            enable_export_server: true,
            metric_prefix: "apisix_".into(),
            refresh_interval: DEFAULT_REFRESH,
            buckets: DEFAULT_BUCKETS.to_vec(),
            extra_labels: ExtraLabels::default(),
        }
    }
}

fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn extra_labels_of(attr: &Value, metric: &str) -> Result<Vec<(String, String)>, String> {
    let Some(list) = attr.pointer(&format!("/metrics/{metric}/extra_labels")) else {
        return Ok(Vec::new());
    };
    let key = format!("plugin_attr.prometheus.metrics.{metric}.extra_labels");
    let Some(list) = list.as_array() else {
        return Err(format!("{key}: expected a list"));
    };
    let mut out = Vec::new();
    for entry in list {
        let pair = entry.as_object().filter(|m| m.len() == 1);
        let Some((name, var)) = pair.and_then(|m| m.iter().next()) else {
            return Err(format!("{key}: each entry is one `label: $variable` pair"));
        };
        let var = var.as_str().and_then(|v| v.strip_prefix('$'));
        let Some(var) = var.filter(|v| !v.is_empty()) else {
            return Err(format!("{key}: the value of {name} must be a $variable"));
        };
        if !valid_name(name) || STATUS_LABELS.contains(&name.as_str()) {
            return Err(format!("{key}: {name} is not a usable label name"));
        }
        out.push((name.clone(), var.to_string()));
    }
    Ok(out)
}

impl Settings {
    /// Reads `plugin_attr.prometheus`; missing keys take APISIX's defaults.
    pub fn from_attr(attr: Option<&Value>) -> Result<Settings, String> {
        let mut s = Settings::default();
        let Some(attr) = attr else { return Ok(s) };
        let key = |k: &str| format!("plugin_attr.prometheus.{k}");
        if let Some(v) = attr.get("export_uri") {
            match v.as_str() {
                Some(u) if u.starts_with('/') => s.export_uri = u.into(),
                _ => return Err(format!("{}: expected a path", key("export_uri"))),
            }
        }
        if let Some(v) = attr.get("enable_export_server") {
            s.enable_export_server = v.as_bool().ok_or_else(|| {
                format!("{}: expected true or false", key("enable_export_server"))
            })?;
        }
        if let Some(addr) = attr.get("export_addr") {
            if let Some(ip) = addr.get("ip") {
                let ip = ip
                    .as_str()
                    .and_then(|t| t.trim_matches(['[', ']']).parse::<IpAddr>().ok())
                    .ok_or_else(|| format!("{}: expected an IP address", key("export_addr.ip")))?;
                s.export_addr.set_ip(ip);
            }
            if let Some(port) = addr.get("port") {
                let port = port
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("{}: expected a port", key("export_addr.port")))?;
                s.export_addr.set_port(port);
            }
        }
        if let Some(v) = attr.get("metric_prefix") {
            match v.as_str() {
                Some(p) if p.is_empty() || valid_name(p) => s.metric_prefix = p.into(),
                _ => {
                    return Err(format!(
                        "{}: letters, digits and underscores, not starting with a digit",
                        key("metric_prefix")
                    ))
                }
            }
        }
        if let Some(v) = attr.get("refresh_interval") {
            s.refresh_interval = v
                .as_f64()
                .filter(|n| *n > 0.0 && *n <= 86_400.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| format!("{}: expected seconds above 0", key("refresh_interval")))?;
        }
        if let Some(v) = attr.get("default_buckets") {
            let buckets: Option<Vec<f64>> = v
                .as_array()
                .map(|l| l.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
                .unwrap_or(None);
            match buckets {
                Some(b) if !b.is_empty() && b.windows(2).all(|w| w[0] < w[1]) => s.buckets = b,
                _ => {
                    return Err(format!(
                        "{}: expected increasing numbers",
                        key("default_buckets")
                    ))
                }
            }
        }
        s.extra_labels = ExtraLabels {
            http_status: extra_labels_of(attr, "http_status")?,
            http_latency: extra_labels_of(attr, "http_latency")?,
            bandwidth: extra_labels_of(attr, "bandwidth")?,
        };
        Ok(s)
    }
}

static GLOBAL: OnceLock<Arc<Metrics>> = OnceLock::new();

/// The families every request with the plugin records into, the registry
/// the exposition is built from, and the last exposition.
pub struct Metrics {
    pub settings: Settings,
    registry: Registry,
    pub(super) status: IntCounterVec,
    pub(super) latency: HistogramVec,
    pub(super) bandwidth: IntCounterVec,
    cached: ArcSwapOption<Bytes>,
    /// One exposition at a time.
    rendering: Mutex<()>,
}

fn labels_with(base: &[&'static str], extra: &[(String, String)]) -> Vec<String> {
    base.iter()
        .map(|s| s.to_string())
        .chain(extra.iter().map(|(name, _)| name.clone()))
        .collect()
}

impl Metrics {
    pub fn new(settings: Settings) -> Result<Metrics, String> {
        let p = &settings.metric_prefix;
        let err = |e: prometheus::Error| e.to_string();
        let extra = &settings.extra_labels;
        let status_labels = labels_with(&STATUS_LABELS, &extra.http_status);
        let status = IntCounterVec::new(
            Opts::new(
                format!("{p}http_status"),
                "HTTP status codes per service in APISIX",
            ),
            &status_labels.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .map_err(err)?;
        let latency_labels = labels_with(&TYPED_LABELS, &extra.http_latency);
        let latency = HistogramVec::new(
            HistogramOpts::new(
                format!("{p}http_latency"),
                "HTTP request latency in milliseconds per service in APISIX",
            )
            .buckets(settings.buckets.clone()),
            &latency_labels
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .map_err(err)?;
        let bandwidth_labels = labels_with(&TYPED_LABELS, &extra.bandwidth);
        let bandwidth = IntCounterVec::new(
            Opts::new(
                format!("{p}bandwidth"),
                "Total bandwidth in bytes consumed per service in APISIX",
            ),
            &bandwidth_labels
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .map_err(err)?;
        let registry = Registry::new();
        registry.register(Box::new(status.clone())).map_err(err)?;
        registry.register(Box::new(latency.clone())).map_err(err)?;
        registry
            .register(Box::new(bandwidth.clone()))
            .map_err(err)?;
        Ok(Metrics {
            settings,
            registry,
            status,
            latency,
            bandwidth,
            cached: ArcSwapOption::empty(),
            rendering: Mutex::new(()),
        })
    }

    /// The process's metrics, made from `attr` by the first caller
    /// (the gateway, at start); later callers get the same ones.
    pub fn install(attr: Option<&Value>) -> Result<Arc<Metrics>, String> {
        static INIT: Mutex<()> = Mutex::new(());
        if let Some(m) = GLOBAL.get() {
            return Ok(m.clone());
        }
        let _once = INIT.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = GLOBAL.get() {
            return Ok(m.clone());
        }
        let metrics = Arc::new(Metrics::new(Settings::from_attr(attr)?)?);
        Ok(GLOBAL.get_or_init(|| metrics).clone())
    }

    /// The process's metrics, once [`Metrics::install`]ed.
    pub fn installed() -> Option<Arc<Metrics>> {
        GLOBAL.get().cloned()
    }

    /// Adds a collector of the gateway's own (connections, node info) to
    /// the exposition.
    pub fn register(&self, collector: Box<dyn Collector>) -> Result<(), String> {
        self.registry.register(collector).map_err(|e| e.to_string())
    }

    /// The full name of a metric: `metric_prefix` + `name`.
    pub fn name(&self, name: &str) -> String {
        format!("{}{name}", self.settings.metric_prefix)
    }

    /// Builds the exposition now and keeps it for [`Metrics::cached`].
    /// Runs off the request path (the exporter's timer).
    pub fn refresh(&self) {
        let _one = self.rendering.lock().unwrap_or_else(|p| p.into_inner());
        let families = self.registry.gather();
        let mut text = Vec::with_capacity(64 * 1024);
        match prometheus::TextEncoder::new().encode(&families, &mut text) {
            Ok(()) => self.cached.store(Some(Arc::new(Bytes::from(text)))),
            Err(e) => tracing::error!(error = %e, "failed to build the metrics exposition"),
        }
    }

    /// The last exposition, `None` before the first [`Metrics::refresh`].
    pub fn cached(&self) -> Option<Bytes> {
        self.cached.load_full().map(|b| (*b).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_are_apisix_defaults() {
        let s = Settings::from_attr(None).expect("defaults");
        assert_eq!(s.export_uri, "/apisix/prometheus/metrics");
        assert_eq!(s.export_addr, "127.0.0.1:9091".parse().expect("addr"));
        assert!(s.enable_export_server);
        assert_eq!(s.metric_prefix, "apisix_");
        assert_eq!(s.refresh_interval, Duration::from_secs(15));
        assert_eq!(s.buckets, DEFAULT_BUCKETS.to_vec());
    }

    #[test]
    fn reads_every_key() {
        let s = Settings::from_attr(Some(&json!({
            "export_uri": "/m",
            "export_addr": {"ip": "0.0.0.0", "port": 9999},
            "enable_export_server": false,
            "metric_prefix": "gw_",
            "refresh_interval": 0.5,
            "default_buckets": [10, 100],
            "metrics": {"http_status": {"extra_labels": [{"upstream_addr": "$upstream_addr"}]}}
        })))
        .expect("settings");
        assert_eq!(s.export_uri, "/m");
        assert_eq!(s.export_addr, "0.0.0.0:9999".parse().expect("addr"));
        assert!(!s.enable_export_server);
        assert_eq!(s.metric_prefix, "gw_");
        assert_eq!(s.refresh_interval, Duration::from_millis(500));
        assert_eq!(s.buckets, vec![10.0, 100.0]);
        assert_eq!(
            s.extra_labels.http_status,
            vec![("upstream_addr".to_string(), "upstream_addr".to_string())]
        );
    }

    #[test]
    fn bad_settings_name_the_key() {
        for (attr, key) in [
            (json!({"export_addr": {"port": 70000}}), "export_addr.port"),
            (json!({"metric_prefix": "9x"}), "metric_prefix"),
            (json!({"default_buckets": [5, 1]}), "default_buckets"),
            (json!({"refresh_interval": 0}), "refresh_interval"),
            (
                json!({"metrics": {"bandwidth": {"extra_labels": [{"x": "novar"}]}}}),
                "extra_labels",
            ),
            (
                json!({"metrics": {"http_status": {"extra_labels": [{"code": "$status"}]}}}),
                "extra_labels",
            ),
        ] {
            let err = Settings::from_attr(Some(&attr)).expect_err("refused");
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn exposition_is_cached_until_refreshed() {
        let m = Metrics::new(Settings::default()).expect("metrics");
        assert!(m.cached().is_none());
        m.status
            .with_label_values(&[
                "200",
                "1",
                "/a",
                "",
                "",
                "",
                "127.0.0.1",
                "",
                "",
                "",
                "upstream",
            ])
            .inc();
        m.refresh();
        let text = String::from_utf8(m.cached().expect("cached").to_vec()).expect("utf8");
        assert!(text.contains("# TYPE apisix_http_status counter"), "{text}");
        assert!(text.contains("route=\"1\""), "{text}");
        m.status
            .with_label_values(&[
                "500",
                "1",
                "/a",
                "",
                "",
                "",
                "127.0.0.1",
                "",
                "",
                "",
                "upstream",
            ])
            .inc();
        let again = String::from_utf8(m.cached().expect("cached").to_vec()).expect("utf8");
        assert!(!again.contains("code=\"500\""));
    }
}
