//! The upstream schema (with `checks`, `tls` and `keepalive_pool` in full)
//! and the rules APISIX applies to an upstream after it.

use serde_json::Value;

use plugins::schema::Schema;

use super::ssl::{cert_schema, check_client_cert, key_schema};
use super::{common, host_schema, id_schema, nodes_schema, timeout_schema, Lookup, METHODS};
use crate::model::health_check::split_header_line;
use crate::model::upstream::ORIGINAL_DST;
use crate::model::{id_text, split_host_port, BalancerType, HashOn, Nodes, UpstreamConf};
use crate::resource::Kind;
/// Bound of the health-check streak counters (active: from 1, passive: from 0).
const MAX_STREAK: f64 = 254.0;
/// Range of the statuses a health check may list.
const STATUS_RANGE: (f64, f64) = (200.0, 599.0);
/// Variables a `chash` upstream with `hash_on: vars` may hash (APISIX's list).
const HASH_VARS_PATTERN: &str = "^((uri|server_name|server_addr|request_uri|remote_port|remote_addr|query_string|host|hostname|mqtt_client_id)|arg_[0-9a-zA-z_-]+)$";
/// Header and cookie names a `chash` upstream may hash.
const HASH_NAME_PATTERN: &str = "^[a-zA-Z0-9-_]+$";

fn statuses(min_items: usize) -> Schema {
    Schema::array(
        Schema::integer()
            .min(STATUS_RANGE.0)
            .max(STATUS_RANGE.1)
            .int(),
    )
    .min(min_items)
    .unique()
    .done()
}

fn streak(min: f64) -> Schema {
    Schema::integer().min(min).max(MAX_STREAK).int()
}

fn probe_type() -> Schema {
    Schema::string()
        .enumerated(&["http", "https", "tcp"])
        .done()
}

fn active_check_schema() -> Schema {
    let interval = || Schema::integer().min(1.0).int();
    Schema::object()
        .prop("type", probe_type())
        .prop("timeout", Schema::integer().number())
        .prop("concurrency", Schema::integer().int())
        .prop("host", host_schema())
        .prop("port", Schema::integer().min(1.0).max(65535.0).int())
        .prop("http_method", Schema::string().enumerated(METHODS).done())
        .prop("http_path", Schema::string().done())
        .prop("http_req_body", Schema::string().done())
        .prop("https_verify_certificate", Schema::Boolean)
        .prop(
            "healthy",
            Schema::object()
                .prop("interval", interval())
                .prop("http_statuses", statuses(1))
                .prop("successes", streak(1.0))
                .done(),
        )
        .prop(
            "unhealthy",
            Schema::object()
                .prop("interval", interval())
                .prop("http_statuses", statuses(1))
                .prop("http_failures", streak(1.0))
                .prop("tcp_failures", streak(1.0))
                .prop("timeouts", streak(1.0))
                .done(),
        )
        .prop(
            "req_headers",
            Schema::array(Schema::string().done()).min(1).done(),
        )
        .done()
}

fn passive_check_schema() -> Schema {
    Schema::object()
        .prop("type", probe_type())
        .prop(
            "healthy",
            Schema::object()
                .prop("http_statuses", statuses(1))
                .prop("successes", streak(0.0))
                .done(),
        )
        .prop(
            "unhealthy",
            Schema::object()
                .prop("http_statuses", statuses(1))
                .prop("tcp_failures", streak(0.0))
                .prop("timeouts", streak(0.0))
                .prop("http_failures", streak(0.0))
                .done(),
        )
        .done()
}

/// `checks`: APISIX's health checker. `active` is required, alone or with
/// `passive`; other properties are let through, as APISIX does.
pub(super) fn checks_schema() -> Schema {
    Schema::object()
        .prop("active", active_check_schema())
        .prop("passive", passive_check_schema())
        .any_of_required_listed(&[&["active"], &["active", "passive"]])
        .done()
}

/// `tls`: a client certificate with its key, or a reference to one, and
/// `verify`.
pub(super) fn tls_schema() -> Schema {
    Schema::object()
        .prop("client_cert_id", id_schema())
        .prop("client_cert", cert_schema())
        .prop("client_key", key_schema())
        .prop("verify", Schema::Boolean)
        .dependency(
            "client_cert",
            Schema::object().required(&["client_key"]).done(),
        )
        .dependency(
            "client_key",
            Schema::object().required(&["client_cert"]).done(),
        )
        .dependency(
            "client_cert_id",
            Schema::Not(Box::new(
                Schema::object()
                    .required(&["client_cert", "client_key"])
                    .done(),
            )),
        )
        .done()
}

/// `keepalive_pool`: every field optional, with APISIX's minimums.
pub(super) fn keepalive_pool_schema() -> Schema {
    Schema::object()
        .prop("size", Schema::integer().min(1.0).int())
        .prop("idle_timeout", Schema::integer().min(0.0).number())
        .prop("requests", Schema::integer().min(1.0).int())
        .done()
}

pub(super) fn build_upstream_schema() -> Schema {
    common(Schema::object())
        .prop("nodes", nodes_schema())
        .prop("retries", Schema::integer().min(0.0).int())
        .prop("retry_timeout", Schema::integer().min(0.0).number())
        .prop("timeout", timeout_schema())
        .prop(
            "type",
            Schema::string()
                .enumerated(&["roundrobin", "chash", "ewma", "least_conn"])
                .done(),
        )
        .prop(
            "scheme",
            Schema::string()
                .enumerated(&[
                    "grpc", "grpcs", "http", "https", "tcp", "tls", "udp", "kafka",
                ])
                .done(),
        )
        .prop(
            "pass_host",
            Schema::string()
                .enumerated(&["pass", "node", "rewrite"])
                .done(),
        )
        .prop("upstream_host", host_schema())
        .prop(
            "hash_on",
            Schema::string()
                .enumerated(&["vars", "header", "cookie", "consumer", "vars_combinations"])
                .done(),
        )
        .prop("key", Schema::string().done())
        .prop("checks", checks_schema())
        .prop("keepalive_pool", keepalive_pool_schema())
        .prop("tls", tls_schema())
        .prop("service_name", Schema::string().min(1).max(256).done())
        .prop("discovery_type", Schema::string().done())
        .prop("discovery_args", Schema::object().done())
        .prop(
            "tproxy",
            Schema::object()
                .prop(
                    "source",
                    Schema::string().enumerated(&["gateway", "client"]).done(),
                )
                .no_additional()
                .done(),
        )
        .no_additional()
        .one_of_required(&[&["nodes"], &["service_name", "discovery_type"]])
        .one_of_waived_by("discovery_type", ORIGINAL_DST)
        .done()
}

/// Checks the rules APISIX applies to an upstream after its schema, then
/// that the typed model holds it, so that whatever passes here is what the
/// data plane compiles. `conf` must already have passed the schema;
/// `lookup` finds the ssl object `tls.client_cert_id` names.
///
/// In APISIX's order (`check_upstream_conf` of `apisix/upstream.lua`): node
/// ports, `tls.client_cert_id` (`failed to fetch ssl info by ssl id [<id>],
/// response code: 404`, or `..., wrong ssl type` unless it is a `client`
/// ssl object), `pass_host`, `tls.client_cert` with `tls.client_key` (as an
/// ssl object's `cert` and `key`: `failed to parse cert: ...`), the hash key.
pub fn check_upstream(conf: &Value, lookup: &dyn Lookup) -> Result<(), String> {
    // Accepted by APISIX's schema but not served by ferrogate yet: refuse
    // rather than proxy differently from what was asked.
    if let Some(s) = conf
        .get("scheme")
        .and_then(Value::as_str)
        .filter(|s| !matches!(*s, "http" | "https" | "grpc" | "grpcs"))
    {
        return Err(format!(
            "invalid configuration: upstream scheme `{s}` is not supported by ferrogate yet"
        ));
    }
    if let Some(Value::Object(map)) = conf.get("nodes") {
        for addr in map.keys() {
            split_host_port(addr)?;
        }
    }
    let tls = conf.get("tls");
    if let Some(id) = tls.and_then(|t| t.get("client_cert_id")).and_then(id_text) {
        check_client_cert_id(&id, lookup)?;
    }
    if conf.get("pass_host").and_then(Value::as_str) == Some("rewrite")
        && conf.get("upstream_host").is_none()
    {
        return Err("`upstream_host` can't be empty when `pass_host` is `rewrite`".into());
    }
    let text = |field: &str| tls.and_then(|t| t.get(field)).and_then(Value::as_str);
    // The schema makes each of the two require the other.
    if let (Some(cert), Some(key)) = (text("client_cert"), text("client_key")) {
        check_client_cert(cert, key)?;
    }
    let up: UpstreamConf =
        serde_json::from_value(conf.clone()).map_err(|e| format!("invalid configuration: {e}"))?;
    if let Some(Nodes::List(list)) = &up.nodes {
        for n in list {
            if n.host.is_empty() {
                return Err("invalid configuration: empty node host".into());
            }
        }
    }
    check_hash_key(&up)?;
    check_transparent(&up)?;
    if let Some(checks) = &up.checks {
        for (i, line) in checks.active.req_headers.iter().enumerate() {
            let valid = split_header_line(line).is_some_and(|(name, value)| {
                http::HeaderName::from_bytes(name.as_bytes()).is_ok()
                    && http::HeaderValue::from_str(value).is_ok()
            });
            if !valid {
                return Err(format!(
                    "invalid configuration: property \"checks\" validation failed: \
                     req_headers item {} is not a `Name: value` header",
                    i + 1
                ));
            }
        }
    }
    Ok(())
}

/// An `original_dst` upstream takes its one node from each connection, so
/// it lists none and has none to probe; a client source address is bound
/// for HTTP/1.1 connections (`http`, `https`) only.
fn check_transparent(up: &UpstreamConf) -> Result<(), String> {
    if up.is_original_dst() {
        if up.nodes.is_some() {
            return Err(
                "invalid configuration: an upstream with discovery_type `original_dst` \
                 takes its node from each connection and lists no `nodes`"
                    .into(),
            );
        }
        if up.checks.is_some() {
            return Err(
                "invalid configuration: an upstream with discovery_type `original_dst` \
                 has no fixed nodes to health-check: remove `checks`"
                    .into(),
            );
        }
    }
    if up.source_is_client() && up.scheme.is_http2() {
        return Err(format!(
            "invalid configuration: tproxy source `client` is supported for http and https \
             upstreams, not `{}`",
            up.scheme.as_str()
        ));
    }
    Ok(())
}

/// `tls.client_cert_id` must name an ssl object of `type: client`.
fn check_client_cert_id(id: &str, lookup: &dyn Lookup) -> Result<(), String> {
    if !lookup.exists(Kind::Ssls, id) {
        return Err(format!(
            "failed to fetch ssl info by ssl id [{id}], response code: 404"
        ));
    }
    // A stored object without `type` is a `server` one (APISIX stores the
    // default; ferrogate reads it so).
    let wrong_type = lookup
        .get(Kind::Ssls, id)
        .is_some_and(|ssl| ssl.get("type").and_then(Value::as_str) != Some("client"));
    if wrong_type {
        return Err(format!(
            "failed to fetch ssl info by ssl id [{id}], wrong ssl type"
        ));
    }
    Ok(())
}

fn is_hash_var(key: &str) -> bool {
    const NAMED: &[&str] = &[
        "uri",
        "server_name",
        "server_addr",
        "request_uri",
        "remote_port",
        "remote_addr",
        "query_string",
        "host",
        "hostname",
        "mqtt_client_id",
    ];
    // APISIX's pattern spells the range `A-z`, which also admits the six
    // punctuation bytes between `Z` and `a`; kept, so that the same keys pass.
    let arg_char = |b: u8| b.is_ascii_digit() || (b'A'..=b'z').contains(&b) || b == b'-';
    NAMED.contains(&key)
        || key
            .strip_prefix("arg_")
            .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(arg_char))
}

fn is_hash_name(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A `chash` upstream needs a key (except `hash_on: consumer`) of the form
/// its `hash_on` takes, as APISIX checks after the schema.
fn check_hash_key(up: &UpstreamConf) -> Result<(), String> {
    if up.balancer != BalancerType::Chash || up.hash_on == HashOn::Consumer {
        return Ok(());
    }
    let Some(key) = up.key.as_deref() else {
        return Err("missing key".into());
    };
    let rule = match up.hash_on {
        HashOn::Vars => Schema::string()
            .pattern(HASH_VARS_PATTERN, is_hash_var)
            .done(),
        HashOn::Header | HashOn::Cookie => Schema::string()
            .pattern(HASH_NAME_PATTERN, is_hash_name)
            .done(),
        HashOn::VarsCombinations | HashOn::Consumer => return Ok(()),
    };
    rule.validate(&Value::String(key.to_string()))
        .map_err(|e| format!("invalid configuration: {e}"))
}

#[cfg(test)]
mod tests;
