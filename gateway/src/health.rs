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

use admin_api::model::health_check::{
    split_header_line, ActiveCheck, CheckType, ChecksConf, DEFAULT_INTERVAL_SECS,
    DEFAULT_PROBE_TIMEOUT_SECS,
};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};

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
            passive: conf.passive.as_ref().map(|p| {
                // A tcp check judges connections only: any answer is one.
                let tcp = p.check_type == CheckType::Tcp;
                Rules {
                    ok_statuses: if tcp {
                        (100..=599).collect()
                    } else {
                        p.healthy.http_statuses.clone()
                    },
                    bad_statuses: if tcp {
                        Vec::new()
                    } else {
                        p.unhealthy.http_statuses.clone()
                    },
                    successes: p.healthy.successes,
                    http_failures: p.unhealthy.http_failures,
                    tcp_failures: p.unhealthy.tcp_failures,
                    timeouts: p.unhealthy.timeouts,
                }
            }),
            active: Some(Rules {
                ok_statuses: conf.active.healthy.http_statuses.clone(),
                bad_statuses: conf.active.unhealthy.http_statuses.clone(),
                successes: conf.active.healthy.successes,
                http_failures: conf.active.unhealthy.http_failures,
                tcp_failures: conf.active.unhealthy.tcp_failures,
                timeouts: conf.active.unhealthy.timeouts,
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
    /// `http_method`.
    pub method: Method,
    /// `req_headers`, parsed.
    pub headers: HeaderMap,
    /// `http_req_body`.
    pub body: Bytes,
}

impl ProbePlan {
    /// Whether a plan can be made from `active`: its method and headers
    /// parse. `Err` names the first that does not (the Admin API refuses
    /// such configs, so only a store written by something else gets here).
    pub fn check(active: &ActiveCheck) -> Result<(), String> {
        request_parts(active).map(drop)
    }

    /// The plan for `active` over `nodes`. Non-positive timeouts (the schema
    /// lets them through) mean the defaults.
    pub fn new(
        active: &ActiveCheck,
        nodes: &[(String, u16)],
        roots: &Arc<rustls::RootCertStore>,
    ) -> Result<Self, String> {
        let (method, headers) = request_parts(active)?;
        let secs = |v: f64| {
            Duration::try_from_secs_f64(if v > 0.0 {
                v
            } else {
                DEFAULT_PROBE_TIMEOUT_SECS
            })
            .unwrap_or(Duration::from_secs(1))
        };
        let interval = |v: u64| Duration::from_secs(v.max(DEFAULT_INTERVAL_SECS));
        Ok(ProbePlan {
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
            timeout: secs(active.timeout),
            healthy_interval: interval(active.healthy.interval),
            unhealthy_interval: interval(active.unhealthy.interval),
            tcp_only: active.check_type == CheckType::Tcp,
            https: (active.check_type == CheckType::Https).then(|| {
                crate::tls::client_config(roots.clone(), active.https_verify_certificate, None)
            }),
            method,
            headers,
            body: Bytes::from(active.http_req_body.clone()),
        })
    }
}

fn request_parts(active: &ActiveCheck) -> Result<(Method, HeaderMap), String> {
    let method = Method::from_bytes(active.http_method.as_bytes())
        .map_err(|_| format!("checks: invalid http_method {}", active.http_method))?;
    let mut headers = HeaderMap::new();
    for line in &active.req_headers {
        let parsed = split_header_line(line).and_then(|(name, value)| {
            Some((
                HeaderName::from_bytes(name.as_bytes()).ok()?,
                HeaderValue::from_str(value).ok()?,
            ))
        });
        let (name, value) =
            parsed.ok_or_else(|| format!("checks: invalid req_headers {line:?}"))?;
        headers.append(name, value);
    }
    Ok((method, headers))
}

/// Probes every node until `health` is dropped.
pub async fn run_prober(health: Weak<Health>, plan: ProbePlan) {
    let client = probe_client(&plan);
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

/// A client for `plan`'s probes: no connection reuse, so that every probe
/// also tests connecting.
fn probe_client(plan: &ProbePlan) -> ProbeClient {
    let tls = plan.https.clone().unwrap_or_else(|| {
        crate::tls::client_config(Arc::new(rustls::RootCertStore::empty()), true, None)
    });
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .with_server_name_resolver(crate::connector::server_name)
        .enable_http1()
        .wrap_connector(http);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector)
}

/// The prober's HTTP client (plain or TLS by the probe URI's scheme).
type ProbeClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<Bytes>,
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
    let mut req = http::Request::builder()
        .method(plan.method.clone())
        .uri(uri.as_str());
    if let Some(headers) = req.headers_mut() {
        headers.clone_from(&plan.headers);
    }
    // The configured `Host` (as a header line) wins over the derived one,
    // as a header the user wrote would.
    if !plan.headers.contains_key(http::header::HOST) {
        req = req.header(
            http::header::HOST,
            plan.host_header.as_deref().unwrap_or(target),
        );
    }
    let Ok(req) = req.body(http_body_util::Full::new(plan.body.clone())) else {
        return Outcome::TcpFailure;
    };
    match tokio::time::timeout(plan.timeout, client.request(req)).await {
        Ok(Ok(resp)) => Outcome::Status(resp.status().as_u16()),
        Ok(Err(_)) => Outcome::TcpFailure,
        Err(_) => Outcome::Timeout,
    }
}

/// A checker as the metrics see it.
struct Registered {
    name: String,
    nodes: Vec<(String, u16)>,
    health: std::sync::Weak<Health>,
}

/// Every live checker of the process, for `apisix_upstream_status`.
static CHECKERS: std::sync::Mutex<Vec<Registered>> = std::sync::Mutex::new(Vec::new());

/// Lists `health` (of the upstream of `owner`, `routes/1`) until it is
/// dropped.
pub fn register(owner: &str, nodes: &[(String, u16)], health: &Arc<Health>) {
    let mut all = CHECKERS.lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|r| r.health.strong_count() > 0);
    all.push(Registered {
        name: format!("/apisix/{owner}"),
        nodes: nodes.to_vec(),
        health: Arc::downgrade(health),
    });
}

/// `(checker name, host, port, healthy)` of every node of every live
/// checker.
pub fn node_statuses() -> Vec<(String, String, u16, bool)> {
    let all = CHECKERS.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = Vec::new();
    for r in all.iter() {
        let Some(health) = r.health.upgrade() else {
            continue;
        };
        for (i, (host, port)) in r.nodes.iter().enumerate() {
            out.push((r.name.clone(), host.clone(), *port, health.is_healthy(i)));
        }
    }
    out
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
        let prober = match (ProbePlan::new(&conf.active, nodes, roots), runtime) {
            (Ok(plan), Some(rt)) => Some(rt.spawn(run_prober(Arc::downgrade(&health), plan))),
            (Err(e), _) => {
                // Compiling an upstream refuses such checks before this; a
                // caller that skipped that gets passive checks only, and a
                // log line saying why.
                tracing::error!(error = %e, "active health checks not started");
                None
            }
            (Ok(_), None) => None,
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
                json!({"active": {}, "passive": {"unhealthy": {"http_failures": 2}, "healthy": {"successes": 1}}}),
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
            &conf(
                json!({"active": {}, "passive": {"unhealthy": {"tcp_failures": 2, "timeouts": 3}}}),
            ),
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
            &conf(json!({"active": {}, "passive": {"unhealthy": {"http_failures": 1}}})),
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

    #[test]
    fn passive_tcp_checks_judge_connections_only() {
        let h = Health::new(
            &conf(json!({"active": {}, "passive": {"type": "tcp",
                "healthy": {"successes": 1}, "unhealthy": {"http_failures": 1, "tcp_failures": 1}}})),
            1,
        );
        h.observe_passive(0, Outcome::Status(500));
        assert!(h.is_healthy(0), "an answer is a working connection");
        h.observe_passive(0, Outcome::TcpFailure);
        assert!(!h.is_healthy(0));
        h.observe_passive(0, Outcome::Status(503));
        assert!(h.is_healthy(0));
    }

    #[test]
    fn probe_plan_takes_every_active_setting() {
        let roots = Arc::new(rustls::RootCertStore::empty());
        let c = conf(json!({"active": {
            "type": "https", "timeout": 0, "port": 9000, "http_path": "health",
            "http_method": "POST", "http_req_body": "ping", "https_verify_certificate": false,
            "req_headers": ["X-Probe: 1", "X-Probe: 2"],
            "healthy": {"interval": 3}, "unhealthy": {"interval": 2}
        }}));
        let plan =
            ProbePlan::new(&c.active, &[("::1".into(), 80), ("a".into(), 81)], &roots).unwrap();
        assert_eq!(plan.targets, vec!["[::1]:9000", "a:9000"]);
        assert_eq!(plan.path, "/health");
        assert_eq!(plan.method, Method::POST);
        assert_eq!(plan.body, Bytes::from_static(b"ping"));
        assert_eq!(plan.headers.get_all("x-probe").iter().count(), 2);
        assert_eq!(plan.timeout, Duration::from_secs(1), "0 means the default");
        assert_eq!(plan.healthy_interval, Duration::from_secs(3));
        assert_eq!(plan.unhealthy_interval, Duration::from_secs(2));
        assert!(plan.https.is_some() && !plan.tcp_only);

        let mut bad = c.active.clone();
        bad.req_headers = vec!["no colon".into()];
        assert!(ProbePlan::check(&bad).is_err());
        assert!(ProbePlan::new(&bad, &[], &roots).is_err());
    }

    #[tokio::test]
    async fn probes_send_method_headers_and_body() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = l.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            while !seen.ends_with(b"ping") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "request ended early: {seen:?}");
                seen.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 302 Found\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8(seen).unwrap()
        });
        let c = conf(json!({"active": {
            "http_method": "PUT", "http_path": "/up", "http_req_body": "ping",
            "host": "svc.local", "req_headers": ["X-Probe: yes"]
        }}));
        let roots = Arc::new(rustls::RootCertStore::empty());
        let plan = ProbePlan::new(&c.active, &[], &roots).unwrap();
        let outcome = probe(&probe_client(&plan), &target, &plan).await;
        assert_eq!(outcome, Outcome::Status(302));
        let request = server.await.unwrap().to_ascii_lowercase();
        assert!(request.starts_with("put /up http/1.1\r\n"), "{request}");
        assert!(request.contains("\r\nx-probe: yes\r\n"), "{request}");
        assert!(request.contains("\r\nhost: svc.local\r\n"), "{request}");
    }
}
