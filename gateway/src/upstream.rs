//! Upstreams compiled for the data plane: nodes, balancer, timeouts, Host
//! policy and the pooled HTTP client that reaches them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::uri::Authority;
use http::HeaderValue;

use admin_api::model::{
    BalancerType, ChecksConf, HashOn, KeepalivePoolConf, Node, PassHostMode, UpstreamConf,
};

use crate::balancer::Balancer;
use crate::connector;
use crate::h1_upstream::{H1Pool, NodeKey, WeakH1Pool};
use crate::h2_upstream::H2Pool;
use crate::health::Checked;
pub use crate::phases::{Timeouts, DEFAULT_TIMEOUT, MAX_TIMEOUT};
use crate::tls;
use rustls::RootCertStore;

/// Idle upstream connections kept per node (APISIX's `upstream.keepalive`).
pub const POOL_MAX_IDLE_PER_HOST: usize = 320;
/// How long an idle upstream connection is kept
/// (APISIX's `upstream.keepalive_timeout`).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Requests one upstream connection carries before it is closed
/// (APISIX's `keepalive_pool.requests` default, nginx's `keepalive_requests`).
pub const POOL_MAX_REQUESTS: u32 = 1000;

/// How a route reaches its upstream's nodes.
#[derive(Clone)]
pub enum UpstreamClient {
    /// `http`, `https`.
    Http1(H1Pool),
    /// `grpc`, `grpcs`.
    Http2(Arc<H2Pool>),
}

/// One client per distinct connect timeout, TLS verification mode, pool
/// shape and protocol, shared by every upstream that uses it, so that
/// keep-alive pools survive config swaps. Held weakly: a pool no compiled
/// route uses any more goes away with its connections and sweeper.
pub struct Clients {
    roots: Arc<RootCertStore>,
    by_key: Mutex<HashMap<ClientKey, WeakClient>>,
    /// Where the pools' idle sweepers run (the runtime that made this).
    runtime: Option<tokio::runtime::Handle>,
}

impl Default for Clients {
    fn default() -> Self {
        Clients::new(Arc::new(RootCertStore::empty()))
    }
}

impl Clients {
    /// Clients verifying upstream certificates against `roots`.
    pub fn new(roots: Arc<RootCertStore>) -> Self {
        Clients {
            roots,
            by_key: Mutex::new(HashMap::new()),
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }

    /// The client for this connect timeout and keep-alive pool; `verify`
    /// only matters for TLS upstreams. `http2`: HTTP/2 (see
    /// [`crate::h2_upstream`]) in clear (`tls` false) or over TLS, as `grpc`
    /// and `grpcs` upstreams speak; otherwise HTTP/1.1.
    pub fn get(
        &self,
        connect: Duration,
        verify: bool,
        pool: KeepalivePool,
        http2: Option<bool>,
        identity: Option<&tls::ClientCert>,
    ) -> UpstreamClient {
        let key = ClientKey {
            connect_ms: connect.as_millis() as u64,
            verify,
            identity: identity.map(|i| i.fingerprint),
            pool_size: pool.size,
            pool_idle_timeout_ms: pool.idle_timeout_ms,
            pool_requests: pool.requests,
            http2,
        };
        let mut map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(live) = map.get(&key).and_then(WeakClient::upgrade) {
            return live;
        }
        map.retain(|_, weak| weak.upgrade().is_some());
        let client = if let Some(tls) = http2 {
            UpstreamClient::Http2(Arc::new(H2Pool::new(
                tls.then(|| tls::client_config(self.roots.clone(), verify, identity)),
                connect,
                Duration::from_millis(pool.idle_timeout_ms),
            )))
        } else {
            let mut tls = tls::client_config(self.roots.clone(), verify, identity);
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            UpstreamClient::Http1(H1Pool::new(
                tls,
                connect,
                Duration::from_millis(pool.idle_timeout_ms),
                pool.size,
                self.runtime.as_ref(),
            ))
        };
        map.insert(key, client.downgrade());
        client
    }

    /// Pools alive (used by some compiled route).
    pub fn live(&self) -> usize {
        let map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        map.values().filter(|w| w.upgrade().is_some()).count()
    }
}

/// A pool as [`Clients`] remembers it.
enum WeakClient {
    Http1(WeakH1Pool),
    Http2(std::sync::Weak<H2Pool>),
}

impl WeakClient {
    fn upgrade(&self) -> Option<UpstreamClient> {
        match self {
            WeakClient::Http1(w) => w.upgrade().map(UpstreamClient::Http1),
            WeakClient::Http2(w) => w.upgrade().map(UpstreamClient::Http2),
        }
    }
}

impl UpstreamClient {
    fn downgrade(&self) -> WeakClient {
        match self {
            UpstreamClient::Http1(p) => WeakClient::Http1(p.downgrade()),
            UpstreamClient::Http2(p) => WeakClient::Http2(Arc::downgrade(p)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ClientKey {
    connect_ms: u64,
    verify: bool,
    /// The client certificate presented, by fingerprint.
    identity: Option<u64>,
    pool_size: usize,
    pool_idle_timeout_ms: u64,
    /// Upstreams with different per-connection request limits keep apart,
    /// so that one's limit never retires the other's connections.
    pool_requests: u32,
    /// `Some(tls)` for HTTP/2.
    http2: Option<bool>,
}

/// An upstream's `keepalive_pool`: idle connections kept per node, for how
/// long, and how many requests one connection carries before it is closed
/// (enforced by the proxy, see [`crate::connector`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeepalivePool {
    pub size: usize,
    pub idle_timeout_ms: u64,
    pub requests: u32,
}

impl Default for KeepalivePool {
    fn default() -> Self {
        KeepalivePool {
            size: POOL_MAX_IDLE_PER_HOST,
            idle_timeout_ms: POOL_IDLE_TIMEOUT.as_millis() as u64,
            requests: POOL_MAX_REQUESTS,
        }
    }
}

impl KeepalivePool {
    /// The pool an upstream asks for. Values past what the pools can hold
    /// are capped: `idle_timeout` at [`MAX_TIMEOUT`], `requests` at
    /// `u32::MAX`, `size` at `usize::MAX`; a negative `idle_timeout` (which
    /// the Admin API refuses) counts as 0.
    fn from_conf(conf: &KeepalivePoolConf) -> Self {
        let idle = conf.idle_timeout.max(0.0) * 1000.0;
        KeepalivePool {
            size: usize::try_from(conf.size).unwrap_or(usize::MAX),
            idle_timeout_ms: idle.min(MAX_TIMEOUT.as_millis() as f64) as u64,
            requests: u32::try_from(conf.requests).unwrap_or(u32::MAX),
        }
    }
}

/// Which Host header the upstream sees.
#[derive(Debug, Clone)]
pub enum PassHost {
    /// The client's Host (default).
    Pass,
    /// The node's `host[:port]`.
    Node,
    /// A fixed `upstream_host`.
    Rewrite(HeaderValue),
}

/// A node ready to be dialled.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port` of the node.
    pub authority: Authority,
    /// For TLS schemes, the name sent as SNI and verified: `upstream_host`
    /// under `pass_host: rewrite` when it is a DNS name (nginx's
    /// `proxy_ssl_name $upstream_host`), else the node's host.
    pub tls_name: Option<String>,
    /// The connection pool's key for this node (HTTP/1.1).
    pub pool_key: NodeKey,
    /// Host header for `pass_host: node`: port omitted when it is the
    /// scheme's default.
    pub host_header: HeaderValue,
}

impl Target {
    /// The target for `host` (a name or an IP address, IPv6 without
    /// brackets) and `port`. `tls`: the scheme's TLS, with the configured
    /// server name if any (else the host is the name sent and verified).
    fn new(
        host: &str,
        port: u16,
        default_port: u16,
        tls: Option<Option<&str>>,
    ) -> Result<Self, UpstreamError> {
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let authority: Authority = format!("{bracketed}:{port}")
            .parse()
            .map_err(|e| UpstreamError(format!("node {bracketed}: {e}")))?;
        let header = if port == default_port {
            bracketed.clone()
        } else {
            format!("{bracketed}:{port}")
        };
        let host_header = HeaderValue::from_str(&header)
            .map_err(|e| UpstreamError(format!("node {bracketed}: {e}")))?;
        let tls_name = tls.map(|server_name| {
            server_name
                .and_then(connector::dns_name)
                .unwrap_or(host)
                .to_string()
        });
        Ok(Target {
            pool_key: NodeKey::new(authority.clone(), tls_name.as_deref()),
            authority,
            tls_name,
            host_header,
        })
    }

    /// This target reached from `source` (`tproxy.source: client`): the
    /// same node, its own pooled connections.
    pub fn from_source(&self, source: IpAddr) -> Self {
        Target {
            pool_key: self.pool_key.from_source(source),
            ..self.clone()
        }
    }
}

/// An upstream compiled for one snapshot.
#[derive(Debug)]
pub struct CompiledUpstream {
    pub targets: Vec<Target>,
    /// `http` (`http`, `grpc`) or `https` (`https`, `grpcs`).
    pub scheme: http::uri::Scheme,
    /// HTTP/2 to the nodes (`grpc`, `grpcs`); HTTP/1.1 otherwise.
    pub http2: bool,
    /// `tls.verify` (default true): check the upstream's certificate.
    pub verify: bool,
    /// The certificate presented to the nodes (upstream mutual TLS).
    pub client_cert: Option<tls::ClientCert>,
    pub keepalive_pool: KeepalivePool,
    pub balancer: Arc<Balancer>,
    /// Health of the nodes when `checks` is configured.
    pub health: Option<Arc<Checked>>,
    /// Where a `chash` upstream takes its key from; `None` for the others.
    pub hash_key: Option<HashKey>,
    /// Tries in all (first + retries), never more than the live nodes.
    pub max_tries: usize,
    /// Bound on all tries together; `None`: unbounded.
    pub retry_timeout: Option<Duration>,
    pub timeouts: Timeouts,
    pub pass_host: PassHost,
    /// `discovery_type: original_dst`: no `targets`; each request goes to
    /// the address its client connected to (see [`Self::original_dst`]).
    pub original_dst: bool,
    /// `tproxy.source: client`: connections come from the client's address.
    pub source_client: bool,
    /// For an `original_dst` TLS upstream: the configured server name
    /// (`upstream_host` under `pass_host: rewrite`), if any.
    server_name: Option<Box<str>>,
}

/// Why an upstream could not be compiled (only a corrupt store gets here).
#[derive(Debug, thiserror::Error)]
#[error("upstream: {0}")]
pub struct UpstreamError(String);

/// The request key of a `chash` upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// A request variable (`remote_addr`, `uri`, `arg_id`, ...).
    Var(String),
    /// A request header.
    Header(http::HeaderName),
    /// A cookie.
    Cookie(String),
    /// A template of variables: `$host$request_uri`.
    Combination(String),
    /// The authenticated consumer's name; the client address without one.
    Consumer,
}

impl HashKey {
    fn from_conf(conf: &UpstreamConf) -> Result<Option<Self>, UpstreamError> {
        if conf.balancer != BalancerType::Chash {
            return Ok(None);
        }
        let key = conf.key.clone().unwrap_or_else(|| "remote_addr".into());
        Ok(Some(match conf.hash_on {
            HashOn::Header => HashKey::Header(
                http::HeaderName::from_bytes(key.as_bytes())
                    .map_err(|e| UpstreamError(format!("chash key {key}: {e}")))?,
            ),
            HashOn::Cookie => HashKey::Cookie(key),
            HashOn::VarsCombinations => HashKey::Combination(key),
            HashOn::Consumer => HashKey::Consumer,
            HashOn::Vars => HashKey::Var(key),
        }))
    }
}

/// The `chash` key of a request under `key`. A request without the key
/// (no such header, cookie or consumer) hashes its client address instead,
/// so it still gets a node; never fails.
pub fn hash_key_of<B>(key: &HashKey, req: &http::Request<B>) -> String {
    use plugins::expr::Vars as _;
    use std::borrow::Cow;

    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(crate::router::normalize_host);
    let vars = crate::vars::RequestVars {
        req,
        host: host.as_deref(),
        path: req.uri().path(),
    };
    let value = match key {
        HashKey::Var(name) => vars.var(name),
        HashKey::Header(name) => req
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(Cow::Borrowed),
        HashKey::Cookie(name) => vars.var(&format!("cookie_{name}")),
        HashKey::Combination(template) => Some(Cow::Owned(vars.expand(template))),
        HashKey::Consumer => req
            .extensions()
            .get::<plugins::ctx::ConsumerName>()
            .map(|c| Cow::Owned(c.0.to_string())),
    };
    value
        .map(Cow::into_owned)
        .or_else(|| vars.var("remote_addr").map(Cow::into_owned))
        .unwrap_or_default()
}

/// Balancers kept across snapshots, keyed by the object that owns the
/// upstream (`upstreams/1`, `routes/7`), reused while the balancer type and
/// the nodes are equal.
pub struct BalancerCache {
    by_owner: HashMap<String, CacheEntry>,
    /// Where active health probers run.
    runtime: Option<tokio::runtime::Handle>,
    /// Trust store of `https` probes.
    pub(crate) roots: Arc<RootCertStore>,
}

struct CacheEntry {
    balancer_type: BalancerType,
    nodes: Vec<Node>,
    /// Boxed: 312 bytes inline, in every route's entry, and few upstreams
    /// have health checks.
    checks: Option<Box<ChecksConf>>,
    balancer: Arc<Balancer>,
    health: Option<Arc<Checked>>,
}

impl Default for BalancerCache {
    fn default() -> Self {
        BalancerCache::new(None)
    }
}

impl BalancerCache {
    pub fn new(runtime: Option<tokio::runtime::Handle>) -> Self {
        BalancerCache {
            by_owner: HashMap::new(),
            runtime,
            roots: Arc::new(RootCertStore::empty()),
        }
    }

    /// The balancer (and health state) for `owner`, reused while type,
    /// nodes and checks are unchanged.
    pub fn get(
        &mut self,
        owner: &str,
        balancer_type: BalancerType,
        nodes: &[Node],
        checks: Option<&ChecksConf>,
    ) -> (Arc<Balancer>, Option<Arc<Checked>>) {
        if let Some(e) = self.by_owner.get(owner) {
            if e.nodes.as_slice() == nodes
                && e.balancer_type == balancer_type
                && e.checks.as_deref() == checks
            {
                return (e.balancer.clone(), e.health.clone());
            }
        }
        let ids: Vec<String> = nodes
            .iter()
            .map(|n| format!("{}:{}", n.host, n.port))
            .collect();
        let balancer = Arc::new(Balancer::new(
            balancer_type,
            nodes.iter().map(|n| n.weight).collect(),
            &ids,
        ));
        let health = checks.map(|c| {
            let addrs: Vec<(String, u16)> =
                nodes.iter().map(|n| (n.host.clone(), n.port)).collect();
            let checked = Checked::start(c, &addrs, self.runtime.as_ref(), &self.roots);
            crate::health::register(owner, &addrs, &checked.health);
            Arc::new(checked)
        });
        self.by_owner.insert(
            owner.to_string(),
            CacheEntry {
                balancer_type,
                nodes: nodes.to_vec(),
                checks: checks.cloned().map(Box::new),
                balancer: balancer.clone(),
                health: health.clone(),
            },
        );
        (balancer, health)
    }

    /// Forgets every balancer whose owner starts with `prefix`.
    pub fn forget(&mut self, prefix: &str) {
        self.by_owner.retain(|k, _| !k.starts_with(prefix));
    }
}

impl CompiledUpstream {
    /// The scheme as APISIX's `$upstream_scheme` names it.
    pub fn scheme_name(&self) -> &'static str {
        match (self.scheme == http::uri::Scheme::HTTPS, self.http2) {
            (false, false) => "http",
            (true, false) => "https",
            (false, true) => "grpc",
            (true, true) => "grpcs",
        }
    }

    /// The target of an `original_dst` upstream for a connection whose
    /// original destination is `dst`.
    pub fn original_dst(&self, dst: SocketAddr) -> Option<Target> {
        let tls = (self.scheme == http::uri::Scheme::HTTPS).then_some(self.server_name.as_deref());
        let default = if tls.is_some() { 443 } else { 80 };
        Target::new(&dst.ip().to_string(), dst.port(), default, tls).ok()
    }

    /// `client_cert`: the certificate `conf.tls` names, resolved by the
    /// caller (it may live in an ssl object).
    pub fn compile(
        conf: &UpstreamConf,
        owner: &str,
        balancers: &mut BalancerCache,
        client_cert: Option<tls::ClientCert>,
    ) -> Result<Self, UpstreamError> {
        let nodes = conf.resolved_nodes().map_err(UpstreamError)?;
        // Stream and kafka schemes are not HTTP: refuse rather than proxy
        // them as something they are not.
        if !conf.scheme.is_http() {
            return Err(UpstreamError(format!(
                "scheme `{}` is not supported yet",
                conf.scheme.as_str()
            )));
        }
        let default = conf.scheme.default_port();
        let tls = conf.scheme.is_tls();
        // nginx's proxy_ssl_name is $upstream_host: with `rewrite`, the
        // configured name is the one the certificate is checked against.
        let server_name = match (tls, conf.pass_host) {
            (true, PassHostMode::Rewrite) => conf.upstream_host.as_deref(),
            _ => None,
        };
        // Sized exactly: collecting through `Result` starts at room for four
        // targets (176 bytes each), and most upstreams have one or two.
        let mut targets = Vec::with_capacity(nodes.len());
        for n in &nodes {
            targets.push(Target::new(
                &n.host,
                n.port,
                default,
                tls.then_some(server_name),
            )?);
        }
        let live = nodes.iter().filter(|n| n.weight > 0).count();
        let pass_host = match conf.pass_host {
            PassHostMode::Node => PassHost::Node,
            PassHostMode::Rewrite => PassHost::Rewrite(
                HeaderValue::from_str(conf.upstream_host.as_deref().unwrap_or_default())
                    .map_err(|e| UpstreamError(format!("upstream_host: {e}")))?,
            ),
            PassHostMode::Pass => PassHost::Pass,
        };
        // A certificate asked for but not found (a store written by
        // something else) must not become a connection without it.
        let wants_cert = conf
            .tls
            .as_ref()
            .is_some_and(|t| t.client_cert.is_some() || t.client_cert_id.is_some());
        if wants_cert && client_cert.is_none() {
            return Err(UpstreamError(
                "its tls client certificate is missing".into(),
            ));
        }
        let checks: Option<&ChecksConf> = conf.checks.as_ref();
        if let Some(c) = checks {
            crate::health::ProbePlan::check(&c.active).map_err(UpstreamError)?;
        }
        let (balancer, health) = balancers.get(owner, conf.balancer, &nodes, checks);
        let verify = conf.tls.as_ref().and_then(|t| t.verify).unwrap_or(true);
        if tls && !verify {
            tracing::warn!(
                owner,
                "tls.verify is false: upstream certificates are not checked"
            );
        }
        let original_dst = conf.is_original_dst();
        let max_tries = if original_dst {
            // One node, the connection's destination: retries go to it again.
            conf.retries.map_or(1, |r| (r as usize).saturating_add(1))
        } else {
            conf.retries
                .map_or(live, |r| (r as usize).saturating_add(1))
                .min(live)
                .max(1)
        };
        Ok(CompiledUpstream {
            original_dst,
            source_client: conf.source_is_client(),
            server_name: server_name.map(Box::from),
            scheme: if tls {
                http::uri::Scheme::HTTPS
            } else {
                http::uri::Scheme::HTTP
            },
            http2: conf.scheme.is_http2(),
            verify,
            client_cert,
            keepalive_pool: KeepalivePool::from_conf(&conf.keepalive_pool),
            balancer,
            health,
            hash_key: HashKey::from_conf(conf)?,
            targets,
            max_tries,
            retry_timeout: conf
                .retry_timeout
                .filter(|t| *t > 0.0)
                .and_then(|t| Duration::try_from_secs_f64(t).ok()),
            timeouts: Timeouts::from_conf(conf.timeout.as_ref()).unwrap_or(Timeouts::DEFAULT),
            pass_host,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compile(v: serde_json::Value) -> CompiledUpstream {
        let conf: UpstreamConf = serde_json::from_value(v).unwrap();
        CompiledUpstream::compile(&conf, "upstreams/t", &mut BalancerCache::default(), None)
            .unwrap()
    }

    #[test]
    fn defaults_and_options() {
        let up = compile(json!({"nodes": {"127.0.0.1:80": 1, "127.0.0.2:8080": 1}}));
        assert_eq!(up.max_tries, 2, "retries default to nodes - 1");
        assert!(up.verify);
        assert_eq!(up.keepalive_pool, KeepalivePool::default());
        assert_eq!(
            up.targets[0].host_header, "127.0.0.1",
            "default port left out of Host"
        );
        assert_eq!(up.targets[1].host_header, "127.0.0.2:8080");
        let up = compile(json!({
            "nodes": {"a:443": 1}, "scheme": "https", "retries": 7, "tls": {"verify": false},
            "keepalive_pool": {"size": 8, "idle_timeout": 1.5, "requests": 10}
        }));
        assert_eq!(up.max_tries, 1, "never more tries than nodes");
        assert!(!up.verify);
        assert_eq!(up.scheme, http::uri::Scheme::HTTPS);
        assert_eq!(
            up.keepalive_pool,
            KeepalivePool {
                size: 8,
                idle_timeout_ms: 1500,
                requests: 10,
            }
        );
        assert_eq!(up.targets[0].host_header, "a");
    }

    #[test]
    fn huge_timeouts_are_capped() {
        let up = compile(
            json!({"nodes": {"a:80": 1}, "timeout": {"connect": 1e300, "send": 1, "read": 1e19}}),
        );
        assert_eq!(up.timeouts.connect, MAX_TIMEOUT);
        assert_eq!(up.timeouts.response_head(), MAX_TIMEOUT + MAX_TIMEOUT);
    }

    #[test]
    fn unsupported_schemes_do_not_compile() {
        let conf: UpstreamConf =
            serde_json::from_value(json!({"nodes": {"a:80": 1}, "scheme": "kafka"})).unwrap();
        assert!(
            CompiledUpstream::compile(&conf, "o", &mut BalancerCache::default(), None).is_err()
        );
    }

    #[test]
    fn typed_settings_reach_the_compiled_upstream() {
        let up = compile(json!({
            "nodes": {"a:80": 1}, "type": "chash", "hash_on": "header", "key": "x-user",
            "keepalive_pool": {"idle_timeout": 1e300}
        }));
        assert_eq!(
            up.hash_key,
            Some(HashKey::Header(http::HeaderName::from_static("x-user")))
        );
        assert_eq!(
            up.keepalive_pool.idle_timeout_ms,
            MAX_TIMEOUT.as_millis() as u64
        );
        assert_eq!(up.keepalive_pool.size, POOL_MAX_IDLE_PER_HOST);
        assert_eq!(up.keepalive_pool.requests, POOL_MAX_REQUESTS);
        let up = compile(json!({"nodes": {"a:80": 1}, "hash_on": "header"}));
        assert_eq!(up.hash_key, None, "only chash hashes");
    }

    #[test]
    fn what_cannot_be_honoured_does_not_compile() {
        let refused = |v: serde_json::Value| {
            let conf: UpstreamConf = serde_json::from_value(v).unwrap();
            CompiledUpstream::compile(&conf, "o", &mut BalancerCache::default(), None).unwrap_err()
        };
        refused(json!({"nodes": {"a:80": 1}, "tls": {"client_cert_id": 1}}));
        refused(json!({"nodes": {"a:80": 1},
            "checks": {"active": {"req_headers": ["no colon"]}}}));
    }

    #[test]
    fn grpc_schemes_speak_http2() {
        let up = compile(json!({"nodes": {"a:50051": 1}, "scheme": "grpc"}));
        assert!(up.http2);
        assert_eq!(up.scheme, http::uri::Scheme::HTTP);
        let up = compile(json!({"nodes": {"a": 1}, "scheme": "grpcs"}));
        assert!(up.http2);
        assert_eq!(up.scheme, http::uri::Scheme::HTTPS);
        assert_eq!(up.targets[0].authority.as_str(), "a:443");
        assert!(!compile(json!({"nodes": {"a:80": 1}})).http2);
    }

    #[test]
    fn rewritten_host_is_the_tls_server_name() {
        let up = compile(json!({
            "nodes": {"10.0.0.5:8443": 1}, "scheme": "https",
            "pass_host": "rewrite", "upstream_host": "api.example.com"
        }));
        assert_eq!(up.targets[0].tls_name.as_deref(), Some("api.example.com"));
        assert_eq!(up.targets[0].authority.as_str(), "10.0.0.5:8443");
        // Plain HTTP has no server name; other pass_host modes use the node.
        let up = compile(json!({
            "nodes": {"10.0.0.5:80": 1}, "pass_host": "rewrite", "upstream_host": "api.example.com"
        }));
        assert_eq!(up.targets[0].tls_name, None);
        let up = compile(json!({"nodes": {"[::1]:8443": 1}, "scheme": "https"}));
        assert_eq!(up.targets[0].tls_name.as_deref(), Some("::1"));
    }

    #[test]
    fn original_dst_targets_the_connection_destination() {
        let up = compile(json!({"discovery_type": "original_dst"}));
        assert!(up.original_dst && up.targets.is_empty());
        assert_eq!(up.max_tries, 1);
        let t = up.original_dst("192.0.2.7:8080".parse().unwrap()).unwrap();
        assert_eq!(t.authority.as_str(), "192.0.2.7:8080");
        assert_eq!(t.host_header, "192.0.2.7:8080");
        assert_eq!(t.tls_name, None);
        let t = up
            .original_dst("[2001:db8::7]:80".parse().unwrap())
            .unwrap();
        assert_eq!(t.authority.as_str(), "[2001:db8::7]:80");
        assert_eq!(t.host_header, "[2001:db8::7]", "default port left out");
        let up = compile(json!({"discovery_type": "original_dst", "scheme": "https",
            "retries": 2, "pass_host": "rewrite", "upstream_host": "api.example.com"}));
        assert_eq!(up.max_tries, 3, "retries go to the same destination");
        let t = up.original_dst("192.0.2.7:443".parse().unwrap()).unwrap();
        assert_eq!(t.tls_name.as_deref(), Some("api.example.com"));
        let t = compile(json!({"discovery_type": "original_dst", "scheme": "https"}))
            .original_dst("192.0.2.7:8443".parse().unwrap())
            .unwrap();
        assert_eq!(t.tls_name.as_deref(), Some("192.0.2.7"));
    }

    #[test]
    fn a_client_source_keeps_its_own_connections() {
        let up = compile(json!({"nodes": {"a:80": 1}, "tproxy": {"source": "client"}}));
        assert!(up.source_client);
        let plain = &up.targets[0];
        let a = plain.from_source("192.0.2.1".parse().unwrap());
        let b = plain.from_source("192.0.2.2".parse().unwrap());
        assert_ne!(a.pool_key, plain.pool_key);
        assert_ne!(a.pool_key, b.pool_key);
        assert_eq!(
            a.pool_key,
            plain.from_source("192.0.2.1".parse().unwrap()).pool_key
        );
        assert_eq!(a.authority, plain.authority);
    }

    #[tokio::test]
    async fn pools_are_shared_while_used_and_dropped_after() {
        let clients = Clients::default();
        let pool = KeepalivePool::default();
        let a = clients.get(Duration::from_secs(1), true, pool, None, None);
        let b = clients.get(Duration::from_secs(1), true, pool, None, None);
        let (UpstreamClient::Http1(a1), UpstreamClient::Http1(b1)) = (&a, &b) else {
            panic!("HTTP/1.1 pools expected");
        };
        assert!(a1.same_pool(b1), "one pool for one setting");
        let other = clients.get(Duration::from_secs(2), true, pool, None, None);
        assert_eq!(clients.live(), 2);
        drop((a, b, other));
        assert_eq!(clients.live(), 0, "nobody uses them any more");
    }
}
