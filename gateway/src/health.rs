//! Upstream health checks, as APISIX's `checks`: active HTTP probes and
//! passive observation of proxied traffic.
//!
//! ```json
//! {"active": {"http_path": "/status", "timeout": 1,
//!             "healthy": {"interval": 1, "successes": 2},
//!             "unhealthy": {"interval": 1, "http_failures": 2}},
//!  "passive": {"unhealthy": {"http_statuses": [500, 503], "http_failures": 3}}}
//! ```
//!
//! A node turns unhealthy after `unhealthy.http_failures` bad statuses,
//! `tcp_failures` connection failures or `timeouts` timeouts in a row, and
//! healthy again after `healthy.successes` good answers in a row. The
//! balancers skip unhealthy nodes; when every node is unhealthy, all of them
//! are used again (APISIX's fallback), so a wrong probe never takes a whole
//! upstream down. Health state belongs to the upstream's balancer entry, so
//! it survives config swaps while the nodes stay the same; an active prober
//! stops by itself when its upstream is gone.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::Deserialize;

/// Defaults from APISIX's health-check schema.
pub const DEFAULT_INTERVAL_SECS: f64 = 1.0;
pub const DEFAULT_PROBE_TIMEOUT_SECS: f64 = 1.0;
pub const DEFAULT_HEALTHY_SUCCESSES: u32 = 2;
pub const DEFAULT_UNHEALTHY_HTTP_FAILURES: u32 = 5;
pub const DEFAULT_UNHEALTHY_TCP_FAILURES: u32 = 2;
pub const DEFAULT_UNHEALTHY_TIMEOUTS: u32 = 3;

fn ok_statuses() -> Vec<u16> {
    vec![200, 302]
}
fn active_bad_statuses() -> Vec<u16> {
    vec![429, 404, 500, 501, 502, 503, 504, 505]
}
fn passive_ok_statuses() -> Vec<u16> {
    (200..=226).chain(300..=308).collect()
}
fn passive_bad_statuses() -> Vec<u16> {
    vec![429, 500, 503]
}
fn interval() -> f64 {
    DEFAULT_INTERVAL_SECS
}
fn probe_timeout() -> f64 {
    DEFAULT_PROBE_TIMEOUT_SECS
}
fn successes() -> u32 {
    DEFAULT_HEALTHY_SUCCESSES
}
fn http_failures() -> u32 {
    DEFAULT_UNHEALTHY_HTTP_FAILURES
}
fn tcp_failures() -> u32 {
    DEFAULT_UNHEALTHY_TCP_FAILURES
}
fn timeouts() -> u32 {
    DEFAULT_UNHEALTHY_TIMEOUTS
}
fn root() -> String {
    "/".into()
}

/// `checks` of an upstream.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct ChecksConf {
    #[serde(default)]
    pub active: Option<ActiveConf>,
    #[serde(default)]
    pub passive: Option<PassiveConf>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ActiveConf {
    /// `http` (default), `https`, or `tcp` (a connection is the whole
    /// probe, for nodes that do not speak HTTP/1.1, such as gRPC ones).
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// `https` probes: check the node's certificate (default true), against
    /// `host` when that is a DNS name, else the node's address.
    #[serde(default)]
    pub https_verify_certificate: Option<bool>,
    #[serde(default = "root")]
    pub http_path: String,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "probe_timeout")]
    pub timeout: f64,
    #[serde(default)]
    pub healthy: ActiveHealthy,
    #[serde(default)]
    pub unhealthy: ActiveUnhealthy,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ActiveHealthy {
    #[serde(default = "interval")]
    pub interval: f64,
    #[serde(default = "successes")]
    pub successes: u32,
    #[serde(default = "ok_statuses")]
    pub http_statuses: Vec<u16>,
}

impl Default for ActiveHealthy {
    fn default() -> Self {
        ActiveHealthy {
            interval: interval(),
            successes: successes(),
            http_statuses: ok_statuses(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ActiveUnhealthy {
    #[serde(default = "interval")]
    pub interval: f64,
    #[serde(default = "http_failures")]
    pub http_failures: u32,
    #[serde(default = "tcp_failures")]
    pub tcp_failures: u32,
    #[serde(default = "timeouts")]
    pub timeouts: u32,
    #[serde(default = "active_bad_statuses")]
    pub http_statuses: Vec<u16>,
}

impl Default for ActiveUnhealthy {
    fn default() -> Self {
        ActiveUnhealthy {
            interval: interval(),
            http_failures: http_failures(),
            tcp_failures: tcp_failures(),
            timeouts: timeouts(),
            http_statuses: active_bad_statuses(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct PassiveConf {
    #[serde(default)]
    pub healthy: PassiveHealthy,
    #[serde(default)]
    pub unhealthy: PassiveUnhealthy,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PassiveHealthy {
    #[serde(default = "passive_ok_statuses")]
    pub http_statuses: Vec<u16>,
    #[serde(default = "successes")]
    pub successes: u32,
}

impl Default for PassiveHealthy {
    fn default() -> Self {
        PassiveHealthy {
            http_statuses: passive_ok_statuses(),
            successes: successes(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PassiveUnhealthy {
    #[serde(default = "passive_bad_statuses")]
    pub http_statuses: Vec<u16>,
    #[serde(default = "http_failures")]
    pub http_failures: u32,
    #[serde(default = "tcp_failures")]
    pub tcp_failures: u32,
    #[serde(default = "timeouts")]
    pub timeouts: u32,
}

impl Default for PassiveUnhealthy {
    fn default() -> Self {
        PassiveUnhealthy {
            http_statuses: passive_bad_statuses(),
            http_failures: http_failures(),
            tcp_failures: tcp_failures(),
            timeouts: timeouts(),
        }
    }
}

/// What one observation of a node said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Status(u16),
    /// A `tcp` probe connected.
    Connected,
    TcpFailure,
    Timeout,
}

/// Thresholds and status lists, from either the active or passive part.
#[derive(Debug, Clone)]
struct Rules {
    ok_statuses: Vec<u16>,
    bad_statuses: Vec<u16>,
    successes: u32,
    http_failures: u32,
    tcp_failures: u32,
    timeouts: u32,
}

/// Consecutive outcomes seen by one kind of check.
#[derive(Debug, Default)]
struct Counters {
    successes: AtomicU32,
    http_failures: AtomicU32,
    tcp_failures: AtomicU32,
    timeouts: AtomicU32,
}

/// A node's health: one verdict, counted separately by the active prober
/// and by passive observation so that neither eats the other's streak.
#[derive(Debug, Default)]
struct NodeHealth {
    unhealthy: AtomicBool,
    active: Counters,
    passive: Counters,
}

/// Health of every node of one upstream.
#[derive(Debug)]
pub struct Health {
    nodes: Vec<NodeHealth>,
    passive: Option<Rules>,
    active: Option<Rules>,
}

impl Health {
    pub fn new(conf: &ChecksConf, nodes: usize) -> Self {
        Health {
            nodes: (0..nodes).map(|_| NodeHealth::default()).collect(),
            passive: conf.passive.as_ref().map(|p| Rules {
                ok_statuses: p.healthy.http_statuses.clone(),
                bad_statuses: p.unhealthy.http_statuses.clone(),
                successes: p.healthy.successes,
                http_failures: p.unhealthy.http_failures,
                tcp_failures: p.unhealthy.tcp_failures,
                timeouts: p.unhealthy.timeouts,
            }),
            active: conf.active.as_ref().map(|a| Rules {
                ok_statuses: a.healthy.http_statuses.clone(),
                bad_statuses: a.unhealthy.http_statuses.clone(),
                successes: a.healthy.successes,
                http_failures: a.unhealthy.http_failures,
                tcp_failures: a.unhealthy.tcp_failures,
                timeouts: a.unhealthy.timeouts,
            }),
        }
    }

    pub fn is_healthy(&self, i: usize) -> bool {
        self.nodes
            .get(i)
            .is_none_or(|n| !n.unhealthy.load(Ordering::Relaxed))
    }

    /// Unhealthy node indexes, or none when every node is unhealthy
    /// (then all are used: APISIX's fallback).
    pub fn excluded(&self) -> Vec<usize> {
        let bad: Vec<usize> = (0..self.nodes.len())
            .filter(|i| !self.is_healthy(*i))
            .collect();
        if bad.len() == self.nodes.len() {
            Vec::new()
        } else {
            bad
        }
    }

    /// Records what proxied traffic saw (no-op without `passive`).
    pub fn observe_passive(&self, i: usize, outcome: Outcome) {
        if let Some(rules) = &self.passive {
            self.record(rules, i, outcome, |n| &n.passive);
        }
    }

    fn observe_active(&self, i: usize, outcome: Outcome) {
        if let Some(rules) = &self.active {
            self.record(rules, i, outcome, |n| &n.active);
        }
    }

    fn record(
        &self,
        rules: &Rules,
        i: usize,
        outcome: Outcome,
        counters: fn(&NodeHealth) -> &Counters,
    ) {
        let Some(node) = self.nodes.get(i) else {
            return;
        };
        let c = counters(node);
        let bump = |counter: &AtomicU32, threshold: u32| {
            let n = counter.fetch_add(1, Ordering::Relaxed).saturating_add(1);
            threshold > 0 && n >= threshold
        };
        let reset_failures = || {
            c.http_failures.store(0, Ordering::Relaxed);
            c.tcp_failures.store(0, Ordering::Relaxed);
            c.timeouts.store(0, Ordering::Relaxed);
        };
        let turn_bad = match outcome {
            Outcome::Status(s) if rules.bad_statuses.contains(&s) => {
                bump(&c.http_failures, rules.http_failures)
            }
            Outcome::Status(s) if rules.ok_statuses.contains(&s) => {
                reset_failures();
                if bump(&c.successes, rules.successes)
                    && node.unhealthy.swap(false, Ordering::Relaxed)
                {
                    tracing::info!(node = i, "upstream node healthy again");
                }
                return;
            }
            Outcome::Connected => {
                reset_failures();
                if bump(&c.successes, rules.successes)
                    && node.unhealthy.swap(false, Ordering::Relaxed)
                {
                    tracing::info!(node = i, "upstream node healthy again");
                }
                return;
            }
            Outcome::Status(_) => return,
            Outcome::TcpFailure => bump(&c.tcp_failures, rules.tcp_failures),
            Outcome::Timeout => bump(&c.timeouts, rules.timeouts),
        };
        c.successes.store(0, Ordering::Relaxed);
        if turn_bad {
            reset_failures();
            if !node.unhealthy.swap(true, Ordering::Relaxed) {
                tracing::warn!(node = i, ?outcome, "upstream node marked unhealthy");
            }
        }
    }
}

/// Where and how to probe one upstream.
#[derive(Debug, Clone)]
pub struct ProbePlan {
    /// `host:port` per node.
    pub targets: Vec<String>,
    pub path: String,
    pub host_header: Option<String>,
    pub timeout: Duration,
    pub healthy_interval: Duration,
    pub unhealthy_interval: Duration,
    /// `type: tcp`: connect only.
    pub tcp_only: bool,
    /// `type: https`: the TLS settings.
    pub https: Option<rustls::ClientConfig>,
}

impl ProbePlan {
    pub fn new(
        active: &ActiveConf,
        nodes: &[(String, u16)],
        roots: &Arc<rustls::RootCertStore>,
    ) -> Self {
        let secs = |v: f64, d: f64| {
            Duration::try_from_secs_f64(if v > 0.0 { v } else { d })
                .unwrap_or(Duration::from_secs(1))
        };
        ProbePlan {
            targets: nodes
                .iter()
                .map(|(h, p)| {
                    let host = if h.contains(':') {
                        format!("[{h}]")
                    } else {
                        h.clone()
                    };
                    format!("{host}:{}", active.port.unwrap_or(*p))
                })
                .collect(),
            path: if active.http_path.starts_with('/') {
                active.http_path.clone()
            } else {
                format!("/{}", active.http_path)
            },
            host_header: active.host.clone(),
            timeout: secs(active.timeout, DEFAULT_PROBE_TIMEOUT_SECS),
            healthy_interval: secs(active.healthy.interval, DEFAULT_INTERVAL_SECS),
            unhealthy_interval: secs(active.unhealthy.interval, DEFAULT_INTERVAL_SECS),
            tcp_only: active.kind.as_deref() == Some("tcp"),
            https: (active.kind.as_deref() == Some("https")).then(|| {
                crate::tls::client_config(
                    roots.clone(),
                    active.https_verify_certificate.unwrap_or(true),
                )
            }),
        }
    }
}

/// Probes every node until `health` is dropped.
pub async fn run_prober(health: Weak<Health>, plan: ProbePlan) {
    let tls = plan.https.clone().unwrap_or_else(|| {
        crate::tls::client_config(Arc::new(rustls::RootCertStore::empty()), true)
    });
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .with_server_name_resolver(crate::connector::server_name)
        .enable_http1()
        .wrap_connector(http);
    let client: ProbeClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector);
    loop {
        let Some(h) = health.upgrade() else { return };
        let mut any_unhealthy = false;
        for (i, target) in plan.targets.iter().enumerate() {
            let outcome = probe(&client, target, &plan).await;
            h.observe_active(i, outcome);
            any_unhealthy |= !h.is_healthy(i);
        }
        drop(h);
        let pause = if any_unhealthy {
            plan.unhealthy_interval.min(plan.healthy_interval)
        } else {
            plan.healthy_interval
        };
        tokio::time::sleep(pause).await;
    }
}

/// The prober's HTTP client (plain or TLS by the probe URI's scheme).
type ProbeClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<bytes::Bytes>,
>;

async fn probe(client: &ProbeClient, target: &str, plan: &ProbePlan) -> Outcome {
    if plan.tcp_only {
        return match tokio::time::timeout(plan.timeout, tokio::net::TcpStream::connect(target))
            .await
        {
            Ok(Ok(_)) => Outcome::Connected,
            Ok(Err(_)) => Outcome::TcpFailure,
            Err(_) => Outcome::Timeout,
        };
    }
    let uri = match (&plan.https, &plan.host_header) {
        (None, _) => format!("http://{target}{}", plan.path),
        // The `host` to verify travels as the URI's user-info (see
        // crate::connector); an address is verified as itself.
        (Some(_), Some(host)) if crate::connector::dns_name(host).is_some() => {
            format!(
                "https://{}@{target}{}",
                crate::connector::dns_name(host).unwrap_or(host),
                plan.path
            )
        }
        (Some(_), _) => format!("https://{target}{}", plan.path),
    };
    let mut req = http::Request::get(uri.as_str());
    req = req.header(
        http::header::HOST,
        plan.host_header.as_deref().unwrap_or(target),
    );
    let Ok(req) = req.body(http_body_util::Empty::new()) else {
        return Outcome::TcpFailure;
    };
    match tokio::time::timeout(plan.timeout, client.request(req)).await {
        Ok(Ok(resp)) => Outcome::Status(resp.status().as_u16()),
        Ok(Err(_)) => Outcome::TcpFailure,
        Err(_) => Outcome::Timeout,
    }
}

/// Keeps the prober task of an upstream; aborting it when the last
/// compiled upstream using it goes away.
#[derive(Debug)]
pub struct Checked {
    pub health: Arc<Health>,
    prober: Option<tokio::task::JoinHandle<()>>,
}

impl Checked {
    pub fn start(
        conf: &ChecksConf,
        nodes: &[(String, u16)],
        runtime: Option<&tokio::runtime::Handle>,
        roots: &Arc<rustls::RootCertStore>,
    ) -> Self {
        let health = Arc::new(Health::new(conf, nodes.len()));
        let prober = match (conf.active.as_ref(), runtime) {
            (Some(active), Some(rt)) => Some(rt.spawn(run_prober(
                Arc::downgrade(&health),
                ProbePlan::new(active, nodes, roots),
            ))),
            _ => None,
        };
        Checked { health, prober }
    }
}

impl Drop for Checked {
    fn drop(&mut self) {
        if let Some(p) = self.prober.take() {
            p.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conf(v: serde_json::Value) -> ChecksConf {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn passive_thresholds_and_recovery() {
        let h = Health::new(
            &conf(
                json!({"passive": {"unhealthy": {"http_failures": 2}, "healthy": {"successes": 1}}}),
            ),
            2,
        );
        h.observe_passive(0, Outcome::Status(500));
        assert!(h.is_healthy(0));
        h.observe_passive(0, Outcome::Status(500));
        assert!(!h.is_healthy(0));
        assert_eq!(h.excluded(), vec![0]);
        h.observe_passive(0, Outcome::Status(200));
        assert!(h.is_healthy(0));
    }

    #[test]
    fn tcp_failures_and_timeouts_count_separately() {
        let h = Health::new(
            &conf(json!({"passive": {"unhealthy": {"tcp_failures": 2, "timeouts": 3}}})),
            1,
        );
        h.observe_passive(0, Outcome::Timeout);
        h.observe_passive(0, Outcome::TcpFailure);
        h.observe_passive(0, Outcome::Timeout);
        assert!(h.is_healthy(0));
        h.observe_passive(0, Outcome::TcpFailure);
        assert!(!h.is_healthy(0));
    }

    #[test]
    fn active_and_passive_count_their_own_streaks() {
        let h = Health::new(
            &conf(json!({
                "active": {"unhealthy": {"http_failures": 2}},
                "passive": {"unhealthy": {"http_statuses": [500], "http_failures": 2}}
            })),
            1,
        );
        h.observe_passive(0, Outcome::Status(500));
        h.observe_active(0, Outcome::Status(500));
        assert!(h.is_healthy(0), "one failure each is not two in a row");
        h.observe_active(0, Outcome::Status(500));
        assert!(!h.is_healthy(0));
    }

    #[test]
    fn all_unhealthy_falls_back_to_all() {
        let h = Health::new(
            &conf(json!({"passive": {"unhealthy": {"http_failures": 1}}})),
            2,
        );
        h.observe_passive(0, Outcome::Status(503));
        h.observe_passive(1, Outcome::Status(503));
        assert!(h.excluded().is_empty());
    }

    #[test]
    fn without_passive_traffic_changes_nothing() {
        let h = Health::new(&conf(json!({"active": {}})), 1);
        for _ in 0..10 {
            h.observe_passive(0, Outcome::Status(500));
        }
        assert!(h.is_healthy(0));
    }
}
