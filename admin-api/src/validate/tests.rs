use super::*;
use serde_json::json;

struct Has(&'static [(Kind, &'static str)]);

impl Lookup for Has {
    fn exists(&self, kind: Kind, id: &str) -> bool {
        self.0.iter().any(|(k, i)| *k == kind && *i == id)
    }
}

fn route(extra: Value) -> Value {
    let mut base = json!({"id": "1", "uri": "/a", "upstream": {"type": "roundrobin", "nodes": {"127.0.0.1:80": 1}}});
    if let (Value::Object(b), Value::Object(e)) = (&mut base, extra) {
        for (k, v) in e {
            if v.is_null() {
                b.remove(&k);
            } else {
                b.insert(k, v);
            }
        }
    }
    base
}

fn route_err(extra: Value) -> String {
    check(Kind::Routes, &route(extra), &Has(&[])).unwrap_err()
}

#[test]
fn valid_route_passes() {
    check(
        Kind::Routes,
        &route(json!({"methods": ["GET"], "hosts": ["*.a.com"], "priority": 3})),
        &Has(&[]),
    )
    .unwrap();
}

#[test]
fn route_messages() {
    assert_eq!(
        route_err(json!({"host": "a.com", "hosts": ["b.com"]})),
        "only one of host or hosts is allowed"
    );
    assert_eq!(
        route_err(json!({"remote_addr": "127.0.0.1", "remote_addrs": ["127.0.0.1"]})),
        "only one of remote_addr or remote_addrs is allowed"
    );
    assert_eq!(
        route_err(json!({"methods": ["FETCH"]})),
        "invalid configuration: property \"methods\" validation failed: failed to validate item 1: matches none of the enum values"
    );
    assert_eq!(
        route_err(json!({"name": "n".repeat(257)})),
        "invalid configuration: property \"name\" validation failed: string too long, expected at most 256, got 257"
    );
    assert_eq!(
        route_err(json!({"id": "bad!id"})),
        "invalid configuration: property \"id\" validation failed: object matches none of the required"
    );
    assert_eq!(
        route_err(json!({"bogus": 1})),
        "invalid configuration: additional properties forbidden, found bogus"
    );
    assert!(route_err(json!({"uris": ["/b"]})).contains("value should match only one schema"));
    assert!(route_err(json!({"uri": null})).starts_with("invalid configuration: "));
    assert!(route_err(json!({"uri": 12})).starts_with("invalid configuration: "));
    assert_eq!(
        route_err(json!({"plugins": {"nope": {}}})),
        "unknown plugin [nope]"
    );
    assert_eq!(
        route_err(json!({"vars": [["arg_name", "=", "json"]]})),
        "failed to validate the 'vars' expression: invalid operator '='"
    );
    assert_eq!(
        route_err(json!({"upstream_id": "9"})),
        "failed to fetch upstream info by upstream id [9], response code: 404"
    );
    assert_eq!(
        route_err(json!({"service_id": 77})),
        "failed to fetch service info by service id [77], response code: 404"
    );
    check(
        Kind::Routes,
        &route(json!({"upstream": null, "upstream_id": "9"})),
        &Has(&[(Kind::Upstreams, "9")]),
    )
    .unwrap();
}

fn upstream_err(conf: Value) -> String {
    check(Kind::Upstreams, &conf, &Has(&[])).unwrap_err()
}

#[test]
fn upstream_messages() {
    assert_eq!(
        upstream_err(json!({"nodes": {"127.0.0.1:80": 1}, "retries": -1})),
        "invalid configuration: property \"retries\" validation failed: expected -1 to be at least 0"
    );
    assert_eq!(
        upstream_err(json!({"nodes": {"127.0.0.1:80": 1}, "timeout": {"connect": 0, "send": 1, "read": 1}})),
        "invalid configuration: property \"timeout\" validation failed: property \"connect\" validation failed: expected 0 to be greater than 0"
    );
    for weight in [json!("1"), json!(-100)] {
        assert_eq!(
            upstream_err(json!({"nodes": {"127.0.0.1:80": weight}})),
            "invalid configuration: property \"nodes\" validation failed: object matches none of the required"
        );
    }
    assert_eq!(
        upstream_err(json!({"nodes": {"127.0.0.1:80": 1}, "pass_host": "rewrite"})),
        "`upstream_host` can't be empty when `pass_host` is `rewrite`"
    );
    assert_eq!(
        upstream_err(json!({"nodes": {"127.0.0.1:70000": 1}})),
        "invalid port 70000"
    );
    assert!(upstream_err(json!({"nodes": "x"})).starts_with("invalid configuration: "));
    check(
        Kind::Upstreams,
        &json!({"nodes": [{"host": "127.0.0.1", "port": 80, "weight": 1}], "timeout": {"connect": 0.5, "send": 1, "read": 1}}),
        &Has(&[]),
    )
    .unwrap();
}

#[test]
fn global_rule_needs_plugins() {
    assert!(check(Kind::GlobalRules, &json!({"id": "1"}), &Has(&[])).is_err());
    check(
        Kind::GlobalRules,
        &json!({"id": "1", "plugins": {"ip-restriction": {"blacklist": ["10.0.0.1"]}}}),
        &Has(&[]),
    )
    .unwrap();
}
