//! Prometheus, the gateway's side: connection counters as nginx's
//! `stub_status` keeps them, the gauges built at each exposition
//! (`apisix_nginx_http_current_connections`, `apisix_http_requests_total`,
//! `apisix_node_info`, `apisix_upstream_status`, `apisix_etcd_*`), the
//! timer that rebuilds the exposition every `refresh_interval`, and the
//! export server (`plugin_attr.prometheus.export_addr`).
//!
//! Connection states map to nginx's:
//! - `accepted`: connections accepted; `handled`: those served (a
//!   connection shed over `worker_connections` is accepted, not handled);
//! - `active`: client connections open now;
//! - `reading`: connections whose first request head (or TLS handshake)
//!   has not arrived yet;
//! - `writing`: requests being answered;
//! - `waiting`: the rest of `active`, idle keep-alive connections.
//!
//! `apisix_shared_dict_*` is not exported: there are no nginx shared dicts.
//! Request counters are atomics, updated with relaxed adds, one set per
//! worker and summed when read.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::sync::{Arc, Mutex, OnceLock};

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts};
use tokio::sync::watch;

use plugins::prometheus::Metrics;

use crate::park::Activity;

/// One worker's share of the `stub_status` counters, on cache lines of its
/// own. A gauge may go below zero in one share (a connection counted in by
/// one thread and out by another) and is read as the wrapping sum of all.
#[derive(Debug)]
#[repr(align(128))]
struct Share {
    accepted: AtomicU64,
    handled: AtomicU64,
    active: AtomicU64,
    reading: AtomicU64,
    requests: AtomicU64,
    answered: AtomicU64,
}

impl Share {
    const fn new() -> Share {
        Share {
            accepted: AtomicU64::new(0),
            handled: AtomicU64::new(0),
            active: AtomicU64::new(0),
            reading: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            answered: AtomicU64::new(0),
        }
    }
}

/// Shares per [`ConnStats`]; workers past this many share a share.
const SHARES: usize = 16;

/// nginx's `stub_status` counters, counted by each worker in its own share
/// (see `workers::slot`): with one set of counters every request of two
/// workers moved its cache line between their cores twice.
#[derive(Debug)]
pub struct ConnStats {
    shares: [Share; SHARES],
}

impl Default for ConnStats {
    fn default() -> Self {
        ConnStats::new()
    }
}

/// The process's counters.
pub static CONNECTIONS: ConnStats = ConnStats::new();

/// A served client connection; counts as active until dropped, and as
/// reading until its first request begins ([`ConnStats::request_begun`]
/// clears the connection's flag).
#[derive(Debug)]
pub struct ConnGuard {
    stats: &'static ConnStats,
    activity: Arc<Activity>,
}

impl ConnStats {
    const fn new() -> ConnStats {
        ConnStats {
            shares: [const { Share::new() }; SHARES],
        }
    }

    /// The calling thread's share.
    fn share(&self) -> &Share {
        &self.shares[crate::workers::slot(SHARES)]
    }

    /// The sum of `field` over the shares.
    fn sum(&self, field: impl Fn(&Share) -> &AtomicU64) -> u64 {
        self.shares.iter().fold(0u64, |total, share| {
            total.wrapping_add(field(share).load(Ordering::Relaxed))
        })
    }

    /// A connection was accepted (served or shed).
    pub fn accepted(&self) {
        self.share().accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// An accepted connection is being served; `activity` is its record.
    pub fn handled(&'static self, activity: Arc<Activity>) -> ConnGuard {
        let share = self.share();
        share.handled.fetch_add(1, Ordering::Relaxed);
        share.active.fetch_add(1, Ordering::Relaxed);
        share.reading.fetch_add(1, Ordering::Relaxed);
        activity.reading.store(true, Ordering::Relaxed);
        ConnGuard {
            stats: self,
            activity,
        }
    }

    /// A request's head has arrived on the connection whose flag is
    /// `reading`.
    pub fn request_begun(&self, reading: &AtomicBool) {
        let share = self.share();
        share.requests.fetch_add(1, Ordering::Relaxed);
        if reading.load(Ordering::Relaxed) && reading.swap(false, Ordering::Relaxed) {
            share.reading.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// A request's response has ended (or was abandoned).
    pub fn request_ended(&self) {
        self.share().answered.fetch_add(1, Ordering::Relaxed);
    }

    /// `(accepted, handled, active, reading, writing, waiting, requests)`.
    pub fn snapshot(&self) -> [u64; 7] {
        let requests = self.sum(|s| &s.requests);
        let answered = self.sum(|s| &s.answered);
        let active = self.sum(|s| &s.active);
        let reading = self.sum(|s| &s.reading);
        // Read apart from each other: keep the derived values sane.
        let writing = requests.saturating_sub(answered);
        let waiting = active.saturating_sub(reading + writing);
        [
            self.sum(|s| &s.accepted),
            self.sum(|s| &s.handled),
            active,
            reading,
            writing,
            waiting,
            requests,
        ]
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let share = self.stats.share();
        share.active.fetch_sub(1, Ordering::Relaxed);
        if self.activity.reading.swap(false, Ordering::Relaxed) {
            share.reading.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Health of one upstream node, for `apisix_upstream_status`.
pub struct NodeHealth {
    /// The health checker's name (`/apisix/routes/1` style).
    pub name: String,
    pub ip: String,
    pub port: String,
    pub healthy: bool,
}

/// Where the exposition's store-dependent gauges come from.
pub trait Sources: Send + Sync + 'static {
    /// Every health-checked node.
    fn upstream_health(&self) -> Vec<NodeHealth>;
    /// `Some` when etcd is the store: whether it answered lately, and the
    /// highest modification index seen per key prefix (`routes`, ...).
    fn etcd(&self) -> Option<(bool, Vec<(String, i64)>)>;
    /// Packets the in-kernel deny list dropped (IPv4, IPv6), when it is on.
    fn xdp_drops(&self) -> Option<(u64, u64)> {
        None
    }
}

/// The gauges the gateway fills at each exposition.
struct Gauges {
    connections: IntGaugeVec,
    requests: IntGauge,
    node_info: IntGaugeVec,
    upstream_status: IntGaugeVec,
    etcd_reachable: Option<IntGauge>,
    etcd_modify_indexes: Option<IntGaugeVec>,
    /// `<prefix>xdp_dropped_packets_total{family}`: only shown once the
    /// in-kernel deny list reports.
    xdp_drops: IntCounterVec,
}

fn gauges(metrics: &Metrics, etcd: bool) -> Result<Gauges, String> {
    let err = |e: prometheus::Error| e.to_string();
    let connections = IntGaugeVec::new(
        Opts::new(
            metrics.name("nginx_http_current_connections"),
            "Number of HTTP connections",
        ),
        &["state"],
    )
    .map_err(err)?;
    let requests = IntGauge::new(
        metrics.name("http_requests_total"),
        "The total number of client requests since APISIX started",
    )
    .map_err(err)?;
    let node_info = IntGaugeVec::new(
        Opts::new(metrics.name("node_info"), "Info of APISIX node"),
        &["hostname", "version"],
    )
    .map_err(err)?;
    let upstream_status = IntGaugeVec::new(
        Opts::new(
            metrics.name("upstream_status"),
            "Upstream status from health check",
        ),
        &["name", "ip", "port"],
    )
    .map_err(err)?;
    metrics.register(Box::new(connections.clone()))?;
    metrics.register(Box::new(requests.clone()))?;
    metrics.register(Box::new(node_info.clone()))?;
    metrics.register(Box::new(upstream_status.clone()))?;
    let xdp_drops = IntCounterVec::new(
        Opts::new(
            metrics.name("xdp_dropped_packets_total"),
            "Packets from denied sources dropped in the kernel (XDP) before reaching the gateway",
        ),
        &["family"],
    )
    .map_err(err)?;
    metrics.register(Box::new(xdp_drops.clone()))?;
    let (etcd_reachable, etcd_modify_indexes) = if etcd {
        let reachable = IntGauge::new(
            metrics.name("etcd_reachable"),
            "Config server etcd reachable from APISIX, 0 is unreachable",
        )
        .map_err(err)?;
        let indexes = IntGaugeVec::new(
            Opts::new(
                metrics.name("etcd_modify_indexes"),
                "Etcd modify index for APISIX keys",
            ),
            &["key"],
        )
        .map_err(err)?;
        metrics.register(Box::new(reachable.clone()))?;
        metrics.register(Box::new(indexes.clone()))?;
        (Some(reachable), Some(indexes))
    } else {
        (None, None)
    };
    Ok(Gauges {
        connections,
        requests,
        node_info,
        upstream_status,
        etcd_reachable,
        etcd_modify_indexes,
        xdp_drops,
    })
}

/// The gauges, registered once per process (tests run several gateways
/// in one).
fn gauges_once(metrics: &Metrics, etcd: bool) -> Result<&'static Gauges, String> {
    static GAUGES: OnceLock<Gauges> = OnceLock::new();
    static INIT: Mutex<()> = Mutex::new(());
    if let Some(g) = GAUGES.get() {
        return Ok(g);
    }
    let _once = INIT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(g) = GAUGES.get() {
        return Ok(g);
    }
    let made = gauges(metrics, etcd)?;
    Ok(GAUGES.get_or_init(|| made))
}

impl Gauges {
    fn fill(&self, sources: &dyn Sources, host: &str) {
        let [accepted, handled, active, reading, writing, waiting, requests] =
            CONNECTIONS.snapshot();
        for (state, v) in [
            ("active", active),
            ("accepted", accepted),
            ("handled", handled),
            ("reading", reading),
            ("writing", writing),
            ("waiting", waiting),
        ] {
            self.connections
                .with_label_values(&[state])
                .set(v.min(i64::MAX as u64) as i64);
        }
        self.requests.set(requests.min(i64::MAX as u64) as i64);
        self.node_info
            .with_label_values(&[host, crate::VERSION])
            .set(1);
        // Nodes come and go with the configuration: only current ones.
        self.upstream_status.reset();
        for node in sources.upstream_health() {
            self.upstream_status
                .with_label_values(&[&node.name, &node.ip, &node.port])
                .set(i64::from(node.healthy));
        }
        if let Some((v4, v6)) = sources.xdp_drops() {
            for (family, total) in [("ipv4", v4), ("ipv6", v6)] {
                let counter = self.xdp_drops.with_label_values(&[family]);
                counter.inc_by(total.saturating_sub(counter.get()));
            }
        }
        if let (Some(reachable), Some(indexes), Some((up, keys))) = (
            &self.etcd_reachable,
            &self.etcd_modify_indexes,
            sources.etcd(),
        ) {
            reachable.set(i64::from(up));
            for (key, index) in keys {
                indexes.with_label_values(&[&key]).set(index);
            }
        }
    }
}

/// Registers the gateway's gauges and rebuilds the exposition every
/// `refresh_interval` (the first one at once), until `shutdown`.
pub fn start_exporter(
    metrics: Arc<Metrics>,
    sources: Arc<dyn Sources>,
    etcd: bool,
    mut shutdown: watch::Receiver<bool>,
) -> Result<impl std::future::Future<Output = ()> + Send, String> {
    let gauges = gauges_once(&metrics, etcd)?;
    let host = plugins::log_entry::hostname();
    let interval = metrics.settings.refresh_interval;
    let refresh = Arc::new(move || {
        gauges.fill(sources.as_ref(), host);
        metrics.refresh();
    });
    // Ready before the first scrape can arrive.
    refresh();
    Ok(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // Encoding walks every series: not on a worker thread
                    // that serves requests.
                    let step = refresh.clone();
                    if tokio::task::spawn_blocking(move || step()).await.is_err() {
                        tracing::error!("metrics exposition failed");
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    })
}

/// The export server's routes: `GET export_uri` serves the last
/// exposition, anything else is 404.
pub fn export_router(metrics: Arc<Metrics>) -> axum::Router {
    let uri = metrics.settings.export_uri.clone();
    axum::Router::new()
        .route(
            &uri,
            axum::routing::get(move || {
                let metrics = metrics.clone();
                async move { exposition(&metrics) }
            }),
        )
        .fallback(|| async { StatusCode::NOT_FOUND })
}

fn exposition(metrics: &Metrics) -> Response {
    match metrics.cached() {
        Some(text) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"))],
            text,
        )
            .into_response(),
        None => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(
                serde_json::json!({"message": "Failed to retrieve metrics: no data available"}),
            ),
        )
            .into_response(),
    }
}

/// Where the export server listens, when it runs.
pub fn export_addr(metrics: &Metrics) -> Option<SocketAddr> {
    metrics
        .settings
        .enable_export_server
        .then_some(metrics.settings.export_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gauge_counted_in_and_out_by_different_workers_sums_to_zero() {
        let stats = ConnStats::new();
        stats.shares[1].active.fetch_add(1, Ordering::Relaxed);
        stats.shares[2].active.fetch_sub(1, Ordering::Relaxed);
        stats.shares[3].requests.fetch_add(2, Ordering::Relaxed);
        stats.shares[0].requests.fetch_add(1, Ordering::Relaxed);
        let [_, _, active, _, _, _, requests] = stats.snapshot();
        assert_eq!((active, requests), (0, 3));
    }

    #[test]
    fn connection_states_add_up() {
        let stats: &'static ConnStats = Box::leak(Box::default());
        stats.accepted();
        stats.accepted();
        let activity = Arc::new(Activity::default());
        let flag = &activity.reading;
        let guard = stats.handled(activity.clone());
        let [accepted, handled, active, reading, writing, waiting, _] = stats.snapshot();
        assert_eq!(
            (accepted, handled, active, reading, writing, waiting),
            (2, 1, 1, 1, 0, 0)
        );
        stats.request_begun(flag);
        let [_, _, _, reading, writing, waiting, requests] = stats.snapshot();
        assert_eq!((reading, writing, waiting, requests), (0, 1, 0, 1));
        stats.request_ended();
        let [_, _, _, reading, writing, waiting, _] = stats.snapshot();
        assert_eq!((reading, writing, waiting), (0, 0, 1));
        drop(guard);
        let [_, _, active, reading, _, waiting, _] = stats.snapshot();
        assert_eq!((active, reading, waiting), (0, 0, 0));
    }
}
