//! The series a request adds to, found without locks or allocation.
//!
//! A series is every metric handle one label combination records into
//! (its `http_status` counter, three latency histograms, two bandwidth
//! counters). Each compiled plugin keeps the series it has seen in a short
//! copy-on-write list: a request compares its label values with each entry
//! and, on a hit, only adds to atomics. A miss makes the series from the
//! families (which lock, hash and allocate) and, while the list is short,
//! adds it for the next request. Label combinations beyond
//! [`MAX_CACHED`] (a global rule over many routes) still count, through the
//! families directly.

use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use prometheus::{Histogram, HistogramVec, IntCounter};
use serde_json::Value;

use super::exporter::{Metrics, STATUS_LABELS, TYPED_LABELS};

/// Series a plugin keeps at hand.
pub const MAX_CACHED: usize = 64;

/// Who produced the response (`response_source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Upstream,
    /// The gateway's error after trying an upstream (502, 504).
    Nginx,
    /// A plugin's or the router's own answer.
    Apisix,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Upstream => "upstream",
            Source::Nginx => "nginx",
            Source::Apisix => "apisix",
        }
    }
}

/// One request's label values: `labels` are route, service, consumer,
/// node, matched_uri and matched_host.
pub struct Probe<'a> {
    pub code: u16,
    pub source: Source,
    pub labels: [&'a str; 6],
}

/// What one request adds.
pub struct Sample {
    pub request_ms: f64,
    pub upstream_ms: Option<f64>,
    pub apisix_ms: f64,
    pub ingress: u64,
    pub egress: u64,
}

/// `disabled_labels` from the plugin metadata, as bit sets over
/// [`STATUS_LABELS`] and [`TYPED_LABELS`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LabelMask {
    status: u32,
    latency: u32,
    bandwidth: u32,
}

fn bits(list: Option<&Value>, names: &[&str]) -> u32 {
    let Some(list) = list.and_then(Value::as_array) else {
        return 0;
    };
    list.iter()
        .filter_map(Value::as_str)
        .filter_map(|l| names.iter().position(|n| *n == l))
        .fold(0, |acc, i| acc | (1 << i))
}

impl LabelMask {
    pub fn from_metadata(metadata: Option<&Value>) -> LabelMask {
        let disabled = metadata.and_then(|m| m.get("disabled_labels"));
        let of = |metric: &str| disabled.and_then(|d| d.get(metric));
        LabelMask {
            status: bits(of("http_status"), &STATUS_LABELS),
            latency: bits(of("http_latency"), &TYPED_LABELS),
            bandwidth: bits(of("bandwidth"), &TYPED_LABELS),
        }
    }
}

/// Blanks the labels `mask` disables.
fn masked(mut values: Vec<&str>, mask: u32) -> Vec<&str> {
    for (i, v) in values.iter_mut().enumerate() {
        if i < 32 && mask & (1 << i) != 0 {
            *v = "";
        }
    }
    values
}

/// String equality that never calls `memcmp` for an empty string: an
/// empty `Box<str>` points at a dangling address, and the vectorised
/// `memcmp` still issues a masked load there, which costs a microcode
/// assist (about 100 ns) on CPUs with AVX-512. Most labels are short and
/// several are empty.
#[inline]
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && (a.is_empty() || a.as_bytes() == b.as_bytes())
}

struct Series {
    code: u16,
    source: Source,
    labels: [Box<str>; 6],
    extra: Box<[Box<str>]>,
    status: IntCounter,
    /// request, apisix.
    latency: [Histogram; 2],
    /// Made at the first request that reached an upstream, as APISIX's
    /// series appears only once observed.
    upstream: OnceLock<Option<Histogram>>,
    upstream_labels: Box<[Box<str>]>,
    family: HistogramVec,
    ingress: IntCounter,
    egress: IntCounter,
}

impl Series {
    fn matches(&self, p: &Probe<'_>, extra: &[&str]) -> bool {
        self.code == p.code
            && self.source == p.source
            && self.labels.iter().zip(p.labels).all(|(a, b)| same(a, b))
            && self.extra.len() == extra.len()
            && self.extra.iter().zip(extra).all(|(a, b)| same(a, b))
    }

    fn add(&self, s: &Sample) {
        self.status.inc();
        self.latency[0].observe(s.request_ms);
        if let Some(up) = s.upstream_ms {
            let made = self.upstream.get_or_init(|| {
                let labels: Vec<&str> = self.upstream_labels.iter().map(|l| &**l).collect();
                self.family.get_metric_with_label_values(&labels).ok()
            });
            if let Some(h) = made {
                h.observe(up);
            }
        }
        self.latency[1].observe(s.apisix_ms);
        self.ingress.inc_by(s.ingress);
        self.egress.inc_by(s.egress);
    }

    fn new(
        m: &Metrics,
        mask: &LabelMask,
        p: &Probe<'_>,
        extra: &[&str],
    ) -> Result<Series, prometheus::Error> {
        let [route, service, consumer, node, uri, host] = p.labels;
        let counts = &m.settings.extra_labels;
        let (status_extra, rest) = extra.split_at(counts.http_status.len().min(extra.len()));
        let (latency_extra, bandwidth_extra) =
            rest.split_at(counts.http_latency.len().min(rest.len()));
        let code = p.code.to_string();
        let mut status = vec![
            code.as_str(),
            route,
            uri,
            host,
            service,
            consumer,
            node,
            "traditional_http",
            "",
            "",
            p.source.as_str(),
        ];
        status.extend_from_slice(status_extra);
        let typed = |kind: &'static str, mask: u32| {
            let values = vec![
                kind,
                route,
                service,
                consumer,
                node,
                "traditional_http",
                "",
                "",
            ];
            masked(values, mask)
        };
        let latency_labels = |kind| {
            let mut v = typed(kind, mask.latency);
            v.extend_from_slice(latency_extra);
            v
        };
        let latency = |kind| {
            m.latency
                .get_metric_with_label_values(&latency_labels(kind))
        };
        let bandwidth = |kind| {
            let mut v = typed(kind, mask.bandwidth);
            v.extend_from_slice(bandwidth_extra);
            m.bandwidth.get_metric_with_label_values(&v)
        };
        Ok(Series {
            code: p.code,
            source: p.source,
            labels: p.labels.map(Box::from),
            extra: extra.iter().map(|v| Box::from(*v)).collect(),
            status: m
                .status
                .get_metric_with_label_values(&masked(status, mask.status))?,
            latency: [latency("request")?, latency("apisix")?],
            upstream: OnceLock::new(),
            upstream_labels: latency_labels("upstream")
                .into_iter()
                .map(Box::from)
                .collect(),
            family: m.latency.clone(),
            ingress: bandwidth("ingress")?,
            egress: bandwidth("egress")?,
        })
    }
}

/// The series one compiled plugin has seen.
#[derive(Default)]
pub struct SeriesCache {
    list: ArcSwap<Vec<Arc<Series>>>,
    adding: Mutex<()>,
}

impl SeriesCache {
    /// Adds `sample` to the series of `probe` and `extra` (the extra
    /// label values of `http_status`, `http_latency` and `bandwidth`, in
    /// that order).
    pub fn record(
        &self,
        metrics: &Metrics,
        mask: &LabelMask,
        probe: &Probe<'_>,
        extra: &[&str],
        sample: &Sample,
    ) {
        {
            let list = self.list.load();
            if let Some(series) = list.iter().find(|s| s.matches(probe, extra)) {
                series.add(sample);
                return;
            }
        }
        let series = match Series::new(metrics, mask, probe, extra) {
            Ok(series) => Arc::new(series),
            Err(e) => {
                tracing::warn!(error = %e, "prometheus: request not counted");
                return;
            }
        };
        series.add(sample);
        let _adding = self.adding.lock().unwrap_or_else(|p| p.into_inner());
        let list = self.list.load();
        if list.len() < MAX_CACHED && !list.iter().any(|s| s.matches(probe, extra)) {
            let mut grown = Vec::with_capacity(list.len() + 1);
            grown.extend(list.iter().cloned());
            grown.push(series);
            self.list.store(Arc::new(grown));
        }
    }

    /// Series kept, for tests.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.list.load().len()
    }
}
