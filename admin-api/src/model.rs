//! Typed views of stored objects, with APISIX's field names.
//!
//! Objects are stored as the JSON the user sent; these structs are what the
//! data plane compiles from. Every object in the store passed
//! [`crate::validate`], so parsing them only fails on a corrupt store, and
//! then that one object is skipped (and logged), never the whole config.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

pub mod health_check;
pub mod ssl;
pub mod upstream;

pub use health_check::ChecksConf;
pub use ssl::{SslClient, SslConf, SslType};
pub use upstream::{
    BalancerType, HashOn, KeepalivePoolConf, PassHostMode, UpstreamConf, UpstreamScheme,
    UpstreamTls,
};

/// A route (`/apisix/routes/{id}`).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct RouteConf {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub uris: Option<Vec<String>>,
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub hosts: Option<Vec<String>>,
    #[serde(default)]
    pub remote_addr: Option<String>,
    #[serde(default)]
    pub remote_addrs: Option<Vec<String>>,
    #[serde(default)]
    pub vars: Option<Value>,
    /// Larger wins among routes on the same path. Default 0.
    #[serde(default)]
    pub priority: i64,
    /// 1 enabled (default), 0 disabled: the router skips it.
    #[serde(default = "enabled")]
    pub status: i64,
    #[serde(default)]
    pub plugins: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    pub upstream: Option<UpstreamConf>,
    #[serde(default)]
    pub upstream_id: Option<Value>,
    #[serde(default)]
    pub service_id: Option<Value>,
    #[serde(default)]
    pub plugin_config_id: Option<Value>,
    #[serde(default)]
    pub timeout: Option<Timeout>,
    #[serde(default)]
    pub enable_websocket: Option<bool>,
}

fn enabled() -> i64 {
    1
}

/// A service (`/apisix/services/{id}`): upstream, plugins and hosts shared by routes.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct ServiceConf {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub plugins: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    pub upstream: Option<UpstreamConf>,
    #[serde(default)]
    pub upstream_id: Option<Value>,
    #[serde(default)]
    pub hosts: Option<Vec<String>>,
    #[serde(default)]
    pub enable_websocket: Option<bool>,
}

/// A global rule (`/apisix/global_rules/{id}`): plugins run for every request.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct GlobalRuleConf {
    #[serde(default)]
    pub plugins: BTreeMap<String, Value>,
}

/// Seconds, each > 0.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
pub struct Timeout {
    pub connect: f64,
    pub send: f64,
    pub read: f64,
}

/// Both node formats APISIX accepts.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Nodes {
    /// `{"127.0.0.1:1980": 1}`
    Map(BTreeMap<String, u64>),
    /// `[{"host": "127.0.0.1", "port": 1980, "weight": 1}]`
    List(Vec<NodeConf>),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct NodeConf {
    pub host: String,
    #[serde(default)]
    pub port: Option<u16>,
    pub weight: u64,
    #[serde(default)]
    pub priority: i64,
}

/// A node resolved to host, port and weight.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Node {
    pub host: String,
    pub port: u16,
    pub weight: u64,
}

/// Splits `host:port`, `[v6]:port`, `host` or `[v6]`; the port is `None`
/// when absent, `Err` when present but not 1..=65535.
pub fn split_host_port(addr: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, "")) => (h, None),
            Some((h, p)) => match p.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None => return Err(format!("invalid address {addr}")),
            },
            None => return Err(format!("invalid address {addr}")),
        }
    } else if addr.matches(':').count() > 1 {
        // A bare IPv6 address without brackets and without port.
        (addr, None)
    } else {
        match addr.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (addr, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Some(n),
            _ => return Err(format!("invalid port {p}")),
        },
    };
    Ok((host.to_string(), port))
}

/// An id as APISIX stores it: string or integer, compared as text.
pub fn id_text(id: &Value) -> Option<String> {
    match id {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            split_host_port("127.0.0.1:1980"),
            Ok(("127.0.0.1".into(), Some(1980)))
        );
        assert_eq!(
            split_host_port("example.com"),
            Ok(("example.com".into(), None))
        );
        assert_eq!(split_host_port("[::1]:80"), Ok(("::1".into(), Some(80))));
        assert_eq!(split_host_port("::1"), Ok(("::1".into(), None)));
        assert_eq!(split_host_port("a:0"), Err("invalid port 0".into()));
        assert_eq!(split_host_port("a:70000"), Err("invalid port 70000".into()));
    }

    #[test]
    fn both_node_forms_resolve() {
        let up: UpstreamConf = serde_json::from_value(json!({
            "nodes": {"127.0.0.1:1980": 1, "example.com": 2}
        }))
        .unwrap();
        assert_eq!(up.balancer, BalancerType::Roundrobin);
        let nodes = up.resolved_nodes().unwrap();
        assert_eq!(
            nodes[0],
            Node {
                host: "127.0.0.1".into(),
                port: 1980,
                weight: 1
            }
        );
        assert_eq!(nodes[1].port, 80);
        let up: UpstreamConf = serde_json::from_value(json!({
            "scheme": "https",
            "nodes": [{"host": "a", "weight": 3}]
        }))
        .unwrap();
        assert_eq!(up.resolved_nodes().unwrap()[0].port, 443);
    }
}
