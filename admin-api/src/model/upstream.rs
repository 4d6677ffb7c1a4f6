//! An upstream, inline in a route or service or as its own object, with
//! every enumerated field as a Rust enum and every nested object as a struct
//! carrying APISIX's defaults.

use serde::Deserialize;
use serde_json::Value;

use super::health_check::ChecksConf;
use super::{split_host_port, Node, Nodes, Timeout};

/// Idle connections kept per node when `keepalive_pool.size` is absent.
pub const DEFAULT_POOL_SIZE: u64 = 320;
/// Seconds an idle connection is kept when `keepalive_pool.idle_timeout` is absent.
pub const DEFAULT_POOL_IDLE_TIMEOUT_SECS: f64 = 60.0;
/// Requests one connection carries when `keepalive_pool.requests` is absent.
pub const DEFAULT_POOL_REQUESTS: u64 = 1000;

/// An upstream's fields, JSON names as APISIX's.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct UpstreamConf {
    /// `type`; default `roundrobin`.
    #[serde(default, rename = "type")]
    pub balancer: BalancerType,
    #[serde(default)]
    pub nodes: Option<Nodes>,
    /// Extra tries on other nodes; default: number of nodes - 1.
    #[serde(default)]
    pub retries: Option<u32>,
    /// Seconds the tries may take together; 0 or absent: no limit.
    #[serde(default)]
    pub retry_timeout: Option<f64>,
    #[serde(default)]
    pub timeout: Option<Timeout>,
    /// Default `http`.
    #[serde(default)]
    pub scheme: UpstreamScheme,
    /// Default `pass`.
    #[serde(default)]
    pub pass_host: PassHostMode,
    #[serde(default)]
    pub upstream_host: Option<String>,
    /// chash: where the key comes from; default `vars`.
    #[serde(default)]
    pub hash_on: HashOn,
    /// chash: the variable, header or cookie name (or template for
    /// `vars_combinations`). Default `remote_addr`.
    #[serde(default)]
    pub key: Option<String>,
    /// Health checks; none by default.
    #[serde(default)]
    pub checks: Option<ChecksConf>,
    /// TLS towards the nodes.
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
    /// Idle connections kept towards the nodes; APISIX's defaults when absent.
    #[serde(default)]
    pub keepalive_pool: KeepalivePoolConf,
    /// Where the nodes come from when not listed: a service registry's
    /// name (with `service_name`), or `original_dst` (each request goes to
    /// the address its client was connecting to, on a transparent listener).
    #[serde(default)]
    pub discovery_type: Option<String>,
    /// The source address of upstream connections; the gateway's own when
    /// absent.
    #[serde(default)]
    pub tproxy: Option<TproxyConf>,
}

/// `discovery_type` of an upstream that sends each request to its
/// connection's original destination.
pub const ORIGINAL_DST: &str = "original_dst";

/// `tproxy` of an upstream (a ferrogate extension).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub struct TproxyConf {
    /// Default `gateway`.
    #[serde(default)]
    pub source: TproxySource,
}

/// The address upstream connections come from.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TproxySource {
    /// The gateway's own address, as the kernel picks it (default).
    #[default]
    Gateway,
    /// The client's address (the TCP peer), bound with `IP_TRANSPARENT`.
    Client,
}

impl UpstreamConf {
    /// Whether each request goes to its connection's original destination.
    pub fn is_original_dst(&self) -> bool {
        self.discovery_type.as_deref() == Some(ORIGINAL_DST)
    }

    /// Whether upstream connections come from the client's address.
    pub fn source_is_client(&self) -> bool {
        self.tproxy
            .is_some_and(|t| t.source == TproxySource::Client)
    }
}

/// The load-balancing algorithm (`type`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum BalancerType {
    /// Weighted round robin (default).
    #[default]
    Roundrobin,
    /// Consistent hashing of a request key.
    Chash,
    /// Lowest decayed response time.
    Ewma,
    /// Fewest requests in flight.
    LeastConn,
}

/// The protocol spoken to the nodes (`scheme`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamScheme {
    Grpc,
    Grpcs,
    /// Default.
    #[default]
    Http,
    Https,
    Tcp,
    Tls,
    Udp,
    Kafka,
}

/// Which Host header the nodes see (`pass_host`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum PassHostMode {
    /// The client's (default).
    #[default]
    Pass,
    /// The node's `host[:port]`.
    Node,
    /// `upstream_host`.
    Rewrite,
}

/// Where a `chash` upstream takes its key from (`hash_on`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum HashOn {
    /// A request variable (default).
    #[default]
    Vars,
    Header,
    Cookie,
    /// The authenticated consumer's name.
    Consumer,
    /// A template of variables.
    VarsCombinations,
}

/// `tls` of an upstream. Its `Debug` leaves the private key out.
#[derive(Clone, Default, Deserialize, PartialEq)]
pub struct UpstreamTls {
    /// PEM certificate presented to the nodes; comes with `client_key`.
    #[serde(default)]
    pub client_cert: Option<String>,
    /// PEM key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<String>,
    /// An SSL object holding the client certificate instead.
    #[serde(default)]
    pub client_cert_id: Option<Value>,
    /// Whether the nodes' certificates are checked. APISIX's schema default
    /// is false but APISIX reads it for kafka only; for `https` and `grpcs`
    /// ferrogate checks unless this is explicitly false, so `None` keeps the
    /// safe behaviour.
    #[serde(default)]
    pub verify: Option<bool>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("client_cert", &self.client_cert.as_ref().map(|_| "(pem)"))
            .field("client_key", &self.client_key.as_ref().map(|_| "(hidden)"))
            .field("client_cert_id", &self.client_cert_id)
            .field("verify", &self.verify)
            .finish()
    }
}

/// `keepalive_pool` of an upstream.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
pub struct KeepalivePoolConf {
    /// Idle connections kept per node (>= 1); default 320.
    #[serde(default = "pool_size")]
    pub size: u64,
    /// Seconds an idle connection is kept (>= 0); default 60.
    #[serde(default = "pool_idle_timeout")]
    pub idle_timeout: f64,
    /// Requests one connection carries before it is closed (>= 1); default 1000.
    #[serde(default = "pool_requests")]
    pub requests: u64,
}

impl Default for KeepalivePoolConf {
    fn default() -> Self {
        KeepalivePoolConf {
            size: DEFAULT_POOL_SIZE,
            idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT_SECS,
            requests: DEFAULT_POOL_REQUESTS,
        }
    }
}

fn pool_size() -> u64 {
    DEFAULT_POOL_SIZE
}
fn pool_idle_timeout() -> f64 {
    DEFAULT_POOL_IDLE_TIMEOUT_SECS
}
fn pool_requests() -> u64 {
    DEFAULT_POOL_REQUESTS
}

impl BalancerType {
    /// The name APISIX uses.
    pub fn as_str(self) -> &'static str {
        match self {
            BalancerType::Roundrobin => "roundrobin",
            BalancerType::Chash => "chash",
            BalancerType::Ewma => "ewma",
            BalancerType::LeastConn => "least_conn",
        }
    }
}

impl UpstreamScheme {
    /// The name APISIX uses.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamScheme::Grpc => "grpc",
            UpstreamScheme::Grpcs => "grpcs",
            UpstreamScheme::Http => "http",
            UpstreamScheme::Https => "https",
            UpstreamScheme::Tcp => "tcp",
            UpstreamScheme::Tls => "tls",
            UpstreamScheme::Udp => "udp",
            UpstreamScheme::Kafka => "kafka",
        }
    }

    /// The port implied when a node names none.
    pub fn default_port(self) -> u16 {
        if self.is_tls() {
            443
        } else {
            80
        }
    }

    /// Whether connections to the nodes are TLS.
    pub fn is_tls(self) -> bool {
        matches!(
            self,
            UpstreamScheme::Https | UpstreamScheme::Grpcs | UpstreamScheme::Tls
        )
    }

    /// Whether this is HTTP (1.1 or, for gRPC, 2): the schemes the data
    /// plane proxies.
    pub fn is_http(self) -> bool {
        matches!(
            self,
            UpstreamScheme::Http
                | UpstreamScheme::Https
                | UpstreamScheme::Grpc
                | UpstreamScheme::Grpcs
        )
    }

    /// Whether the nodes speak HTTP/2 (gRPC).
    pub fn is_http2(self) -> bool {
        matches!(self, UpstreamScheme::Grpc | UpstreamScheme::Grpcs)
    }
}

impl UpstreamConf {
    /// The nodes in declaration order (hash form: key order), ports
    /// resolved; `Err` names a hash-form address whose port is not 1..=65535.
    pub fn resolved_nodes(&self) -> Result<Vec<Node>, String> {
        let default = self.scheme.default_port();
        match &self.nodes {
            None => Ok(Vec::new()),
            Some(Nodes::Map(map)) => map
                .iter()
                .map(|(addr, weight)| {
                    let (host, port) = split_host_port(addr)?;
                    Ok(Node {
                        host,
                        port: port.unwrap_or(default),
                        weight: *weight,
                    })
                })
                .collect(),
            Some(Nodes::List(list)) => Ok(list
                .iter()
                .map(|n| Node {
                    host: n
                        .host
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string(),
                    port: n.port.unwrap_or(default),
                    weight: n.weight,
                })
                .collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> UpstreamConf {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn defaults() {
        let up = parse(json!({"nodes": {"a:1": 1}}));
        assert_eq!(up.balancer, BalancerType::Roundrobin);
        assert_eq!(up.scheme, UpstreamScheme::Http);
        assert_eq!(up.pass_host, PassHostMode::Pass);
        assert_eq!(up.hash_on, HashOn::Vars);
        assert_eq!(up.keepalive_pool, KeepalivePoolConf::default());
        assert_eq!(
            (
                up.keepalive_pool.size,
                up.keepalive_pool.idle_timeout,
                up.keepalive_pool.requests
            ),
            (320, 60.0, 1000)
        );
        assert_eq!((up.checks, up.tls), (None, None));
    }

    #[test]
    fn apisix_spellings() {
        let up = parse(json!({
            "nodes": {"a:1": 1}, "type": "least_conn", "scheme": "grpcs",
            "pass_host": "rewrite", "upstream_host": "h", "hash_on": "vars_combinations",
            "keepalive_pool": {"size": 2}, "tls": {"verify": false}
        }));
        assert_eq!(up.balancer, BalancerType::LeastConn);
        assert_eq!(up.balancer.as_str(), "least_conn");
        assert_eq!(up.scheme, UpstreamScheme::Grpcs);
        assert!(up.scheme.is_http2() && up.scheme.is_tls());
        assert_eq!(up.pass_host, PassHostMode::Rewrite);
        assert_eq!(up.hash_on, HashOn::VarsCombinations);
        assert_eq!(up.keepalive_pool.size, 2);
        assert_eq!(up.keepalive_pool.requests, 1000);
        assert_eq!(up.tls.and_then(|t| t.verify), Some(false));
        for (name, ty) in [
            ("roundrobin", BalancerType::Roundrobin),
            ("chash", BalancerType::Chash),
            ("ewma", BalancerType::Ewma),
        ] {
            assert_eq!(parse(json!({"type": name})).balancer, ty);
        }
        for s in [
            "grpc", "grpcs", "http", "https", "tcp", "tls", "udp", "kafka",
        ] {
            assert_eq!(parse(json!({ "scheme": s })).scheme.as_str(), s);
        }
    }

    #[test]
    fn unknown_names_do_not_parse() {
        for bad in [
            json!({"type": "random"}),
            json!({"scheme": "ftp"}),
            json!({"pass_host": "keep"}),
            json!({"hash_on": "body"}),
        ] {
            assert!(serde_json::from_value::<UpstreamConf>(bad).is_err());
        }
    }
}
