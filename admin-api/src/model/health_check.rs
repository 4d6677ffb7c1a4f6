//! An upstream's `checks`: active probes and passive observation, as
//! APISIX's `health_checker` schema spells them.
//!
//! Every field has APISIX's default, so a parsed [`ChecksConf`] is complete:
//! the data plane reads these values and never the JSON. The Admin API
//! refuses what these types cannot hold (see `crate::validate`), so parsing
//! a stored object fails only on a corrupt store.

use serde::Deserialize;

/// Probe interval in seconds when none is given.
pub const DEFAULT_INTERVAL_SECS: u64 = 1;
/// Seconds one active probe may take when none is given.
pub const DEFAULT_PROBE_TIMEOUT_SECS: f64 = 1.0;
/// Nodes probed at once, at most, when none is given.
pub const DEFAULT_CONCURRENCY: i64 = 10;
/// Successful active probes in a row that make a node healthy again.
pub const DEFAULT_ACTIVE_SUCCESSES: u32 = 2;
/// Bad statuses in a row that make a node unhealthy (active and passive).
pub const DEFAULT_HTTP_FAILURES: u32 = 5;
/// Failed connections in a row that make a node unhealthy (active and passive).
pub const DEFAULT_TCP_FAILURES: u32 = 2;
/// Active probe timeouts in a row that make a node unhealthy.
pub const DEFAULT_ACTIVE_TIMEOUTS: u32 = 3;
/// Good answers to proxied requests in a row that make a node healthy again.
pub const DEFAULT_PASSIVE_SUCCESSES: u32 = 5;
/// Timeouts of proxied requests in a row that make a node unhealthy.
pub const DEFAULT_PASSIVE_TIMEOUTS: u32 = 7;

/// Statuses an active probe counts as healthy by default.
pub const DEFAULT_ACTIVE_HEALTHY_STATUSES: &[u16] = &[200, 302];
/// Statuses an active probe counts as a failure by default.
pub const DEFAULT_ACTIVE_UNHEALTHY_STATUSES: &[u16] = &[429, 404, 500, 501, 502, 503, 504, 505];
/// Statuses of proxied responses counted as healthy by default.
pub const DEFAULT_PASSIVE_HEALTHY_STATUSES: &[u16] = &[
    200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304, 305, 306, 307, 308,
];
/// Statuses of proxied responses counted as a failure by default.
pub const DEFAULT_PASSIVE_UNHEALTHY_STATUSES: &[u16] = &[429, 500, 503];

/// `checks` of an upstream. `active` is required (APISIX refuses passive
/// checks alone: nothing would bring a node back).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ChecksConf {
    pub active: ActiveCheck,
    #[serde(default)]
    pub passive: Option<PassiveCheck>,
}

/// What a check judges (`checks.active.type`, `checks.passive.type`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CheckType {
    /// Statuses count; active probes are HTTP/1.1 requests (default).
    #[default]
    Http,
    /// As `http`, with active probes over TLS.
    Https,
    /// Only connections count: connecting is the whole active probe, and
    /// any answer to proxied traffic is a success.
    Tcp,
}

/// `checks.active`: the gateway probes every node on its own.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ActiveCheck {
    /// Default `http`.
    #[serde(default, rename = "type")]
    pub check_type: CheckType,
    /// Seconds one probe may take; default 1. A value of 0 or less (the
    /// schema allows it) means the default.
    #[serde(default = "probe_timeout")]
    pub timeout: f64,
    /// Nodes probed at once, at most; default 10. The gateway probes one
    /// node at a time, which keeps within any bound.
    #[serde(default = "concurrency")]
    pub concurrency: i64,
    /// Host header of HTTP probes and the name an `https` probe verifies;
    /// default: the node's address.
    #[serde(default)]
    pub host: Option<String>,
    /// Port probed instead of the node's; default: the node's.
    #[serde(default)]
    pub port: Option<u16>,
    /// Method of HTTP probes; default `GET`.
    #[serde(default = "get")]
    pub http_method: String,
    /// Path of HTTP probes; default `/`.
    #[serde(default = "root")]
    pub http_path: String,
    /// Body of HTTP probes; default empty.
    #[serde(default)]
    pub http_req_body: String,
    /// `https` probes: check the node's certificate; default true.
    #[serde(default = "yes")]
    pub https_verify_certificate: bool,
    /// Extra request headers of HTTP probes, each `Name: value`; default none.
    #[serde(default)]
    pub req_headers: Vec<String>,
    #[serde(default)]
    pub healthy: ActiveHealthy,
    #[serde(default)]
    pub unhealthy: ActiveUnhealthy,
}

/// `checks.active.healthy`: when an unhealthy node comes back.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ActiveHealthy {
    /// Seconds between probes of healthy nodes (>= 1); default 1.
    #[serde(default = "interval")]
    pub interval: u64,
    /// Default 200, 302.
    #[serde(default = "active_ok")]
    pub http_statuses: Vec<u16>,
    /// 1..=254; default 2.
    #[serde(default = "active_successes")]
    pub successes: u32,
}

/// `checks.active.unhealthy`: when a node is taken out.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ActiveUnhealthy {
    /// Seconds between probes while some node is unhealthy (>= 1); default 1.
    #[serde(default = "interval")]
    pub interval: u64,
    /// Default 429, 404, 500, 501, 502, 503, 504, 505.
    #[serde(default = "active_bad")]
    pub http_statuses: Vec<u16>,
    /// 1..=254; default 5.
    #[serde(default = "http_failures")]
    pub http_failures: u32,
    /// 1..=254; default 2.
    #[serde(default = "tcp_failures")]
    pub tcp_failures: u32,
    /// 1..=254; default 3.
    #[serde(default = "active_timeouts")]
    pub timeouts: u32,
}

/// `checks.passive`: verdicts drawn from proxied traffic.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct PassiveCheck {
    /// Default `http`.
    #[serde(default, rename = "type")]
    pub check_type: CheckType,
    #[serde(default)]
    pub healthy: PassiveHealthy,
    #[serde(default)]
    pub unhealthy: PassiveUnhealthy,
}

/// `checks.passive.healthy`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PassiveHealthy {
    /// Default the 2xx and 3xx statuses APISIX lists (200..=208, 226, 300..=308).
    #[serde(default = "passive_ok")]
    pub http_statuses: Vec<u16>,
    /// 0..=254 (0: never counts); default 5.
    #[serde(default = "passive_successes")]
    pub successes: u32,
}

/// `checks.passive.unhealthy`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PassiveUnhealthy {
    /// Default 429, 500, 503.
    #[serde(default = "passive_bad")]
    pub http_statuses: Vec<u16>,
    /// 0..=254 (0: never counts); default 2.
    #[serde(default = "tcp_failures")]
    pub tcp_failures: u32,
    /// 0..=254 (0: never counts); default 7.
    #[serde(default = "passive_timeouts")]
    pub timeouts: u32,
    /// 0..=254 (0: never counts); default 5.
    #[serde(default = "http_failures")]
    pub http_failures: u32,
}

impl Default for ActiveHealthy {
    fn default() -> Self {
        ActiveHealthy {
            interval: interval(),
            http_statuses: active_ok(),
            successes: active_successes(),
        }
    }
}

impl Default for ActiveUnhealthy {
    fn default() -> Self {
        ActiveUnhealthy {
            interval: interval(),
            http_statuses: active_bad(),
            http_failures: http_failures(),
            tcp_failures: tcp_failures(),
            timeouts: active_timeouts(),
        }
    }
}

impl Default for PassiveHealthy {
    fn default() -> Self {
        PassiveHealthy {
            http_statuses: passive_ok(),
            successes: passive_successes(),
        }
    }
}

impl Default for PassiveUnhealthy {
    fn default() -> Self {
        PassiveUnhealthy {
            http_statuses: passive_bad(),
            tcp_failures: tcp_failures(),
            timeouts: passive_timeouts(),
            http_failures: http_failures(),
        }
    }
}

fn probe_timeout() -> f64 {
    DEFAULT_PROBE_TIMEOUT_SECS
}
fn concurrency() -> i64 {
    DEFAULT_CONCURRENCY
}
fn get() -> String {
    "GET".into()
}
fn root() -> String {
    "/".into()
}
fn yes() -> bool {
    true
}
fn interval() -> u64 {
    DEFAULT_INTERVAL_SECS
}
fn active_ok() -> Vec<u16> {
    DEFAULT_ACTIVE_HEALTHY_STATUSES.to_vec()
}
fn active_bad() -> Vec<u16> {
    DEFAULT_ACTIVE_UNHEALTHY_STATUSES.to_vec()
}
fn passive_ok() -> Vec<u16> {
    DEFAULT_PASSIVE_HEALTHY_STATUSES.to_vec()
}
fn passive_bad() -> Vec<u16> {
    DEFAULT_PASSIVE_UNHEALTHY_STATUSES.to_vec()
}
fn active_successes() -> u32 {
    DEFAULT_ACTIVE_SUCCESSES
}
fn passive_successes() -> u32 {
    DEFAULT_PASSIVE_SUCCESSES
}
fn http_failures() -> u32 {
    DEFAULT_HTTP_FAILURES
}
fn tcp_failures() -> u32 {
    DEFAULT_TCP_FAILURES
}
fn active_timeouts() -> u32 {
    DEFAULT_ACTIVE_TIMEOUTS
}
fn passive_timeouts() -> u32 {
    DEFAULT_PASSIVE_TIMEOUTS
}

/// Splits a `req_headers` entry (`Name: value`) into its trimmed name and
/// value; `None` when there is no colon or the name is empty.
pub fn split_header_line(line: &str) -> Option<(&str, &str)> {
    let (name, value) = line.split_once(':')?;
    let name = name.trim();
    (!name.is_empty()).then_some((name, value.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn empty_active_gets_every_default() {
        let c: ChecksConf = serde_json::from_value(json!({"active": {}})).unwrap();
        let a = &c.active;
        assert_eq!(a.check_type, CheckType::Http);
        assert_eq!((a.timeout, a.concurrency), (1.0, 10));
        assert_eq!((a.http_method.as_str(), a.http_path.as_str()), ("GET", "/"));
        assert!(a.https_verify_certificate);
        assert!(a.req_headers.is_empty() && a.http_req_body.is_empty());
        assert_eq!(a.healthy.http_statuses, vec![200, 302]);
        assert_eq!((a.healthy.interval, a.healthy.successes), (1, 2));
        assert_eq!(
            a.unhealthy.http_statuses,
            vec![429, 404, 500, 501, 502, 503, 504, 505]
        );
        assert_eq!(
            (
                a.unhealthy.http_failures,
                a.unhealthy.tcp_failures,
                a.unhealthy.timeouts
            ),
            (5, 2, 3)
        );
        assert_eq!(c.passive, None);
    }

    #[test]
    fn empty_passive_gets_every_default() {
        let c: ChecksConf = serde_json::from_value(json!({"active": {}, "passive": {}})).unwrap();
        let p = c.passive.unwrap();
        assert_eq!(p.healthy.http_statuses.len(), 19);
        assert_eq!(p.healthy.successes, 5);
        assert_eq!(p.unhealthy.http_statuses, vec![429, 500, 503]);
        assert_eq!(
            (
                p.unhealthy.http_failures,
                p.unhealthy.tcp_failures,
                p.unhealthy.timeouts
            ),
            (5, 2, 7)
        );
    }

    #[test]
    fn passive_alone_does_not_parse() {
        assert!(serde_json::from_value::<ChecksConf>(json!({"passive": {}})).is_err());
    }

    #[test]
    fn header_lines() {
        assert_eq!(split_header_line("X-A: 1"), Some(("X-A", "1")));
        assert_eq!(split_header_line("X-A:"), Some(("X-A", "")));
        assert_eq!(split_header_line("no colon"), None);
        assert_eq!(split_header_line(" : v"), None);
    }
}
