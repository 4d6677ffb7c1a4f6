use serde_json::{json, Value};

use crate::model::health_check::CheckType;
use crate::model::UpstreamConf;
use crate::resource::Kind;
use crate::validate::{check, Lookup};

struct Nothing;

impl Lookup for Nothing {
    fn exists(&self, _: Kind, _: &str) -> bool {
        false
    }
}

fn upstream(field: &str, value: Value) -> Value {
    let mut up = json!({"id": "1", "nodes": {"127.0.0.1:80": 1}});
    up[field] = value;
    up
}

fn check_field(field: &str, value: Value) -> Result<(), String> {
    check(Kind::Upstreams, &upstream(field, value), &Nothing)
}

/// Checks, then parses as the data plane does.
fn accepted(field: &str, value: Value) -> UpstreamConf {
    let up = upstream(field, value);
    check(Kind::Upstreams, &up, &Nothing).unwrap();
    serde_json::from_value(up).unwrap()
}

fn refused(field: &str, value: Value, detail: &str) {
    assert_eq!(
        check_field(field, value.clone()),
        Err(format!(
            "invalid configuration: property \"{field}\" validation failed: {detail}"
        )),
        "{field}: {value}"
    );
}

#[test]
fn checks_with_defaults_applied() {
    let up = accepted("checks", json!({"active": {}}));
    let checks = up.checks.unwrap();
    assert_eq!(checks.active.check_type, CheckType::Http);
    assert_eq!(checks.active.healthy.successes, 2);
    assert_eq!(checks.active.unhealthy.timeouts, 3);
    assert!(checks.passive.is_none());

    let up = accepted(
        "checks",
        json!({
            "active": {"type": "tcp", "port": 8080, "host": "a.example.com",
                       "req_headers": ["User-Agent: probe", "X-Empty:"],
                       "http_method": "HEAD",
                       "healthy": {"interval": 3, "http_statuses": [200, 599]}},
            "passive": {"healthy": {"successes": 0},
                        "unhealthy": {"http_failures": 0, "timeouts": 254}}
        }),
    );
    let checks = up.checks.unwrap();
    assert_eq!(checks.active.check_type, CheckType::Tcp);
    assert_eq!(checks.active.port, Some(8080));
    assert_eq!(checks.active.healthy.interval, 3);
    assert_eq!(checks.active.healthy.successes, 2, "default kept");
    let passive = checks.passive.unwrap();
    assert_eq!(passive.healthy.successes, 0);
    assert_eq!(passive.unhealthy.tcp_failures, 2, "default kept");
    assert_eq!(passive.unhealthy.http_statuses, vec![429, 500, 503]);
}

#[test]
fn checks_need_active() {
    let sets = "object matches none of the required: [\"active\"] or [\"active\",\"passive\"]";
    refused("checks", json!({"passive": {}}), sets);
    refused("checks", json!({}), sets);
    refused(
        "checks",
        json!(true),
        "wrong type: expected object, got boolean",
    );
}

#[test]
fn bad_active_checks_are_refused() {
    let cases = [
        (
            json!({"type": "udp"}),
            "property \"active\" validation failed: property \"type\" validation failed: matches none of the enum values",
        ),
        (
            json!({"timeout": "1"}),
            "property \"active\" validation failed: property \"timeout\" validation failed: wrong type: expected number, got string",
        ),
        (
            json!({"concurrency": 1.5}),
            "property \"active\" validation failed: property \"concurrency\" validation failed: wrong type: expected integer, got number",
        ),
        (
            json!({"port": 0}),
            "property \"active\" validation failed: property \"port\" validation failed: expected 0 to be at least 1",
        ),
        (
            json!({"port": 65536}),
            "property \"active\" validation failed: property \"port\" validation failed: expected 65536 to be at most 65535",
        ),
        (
            json!({"host": "a b"}),
            "property \"active\" validation failed: property \"host\" validation failed: failed to match pattern \"^\\\\*?[0-9a-zA-Z-._\\\\[\\\\]:]+$\" with \"a b\"",
        ),
        (
            json!({"http_method": "FETCH"}),
            "property \"active\" validation failed: property \"http_method\" validation failed: matches none of the enum values",
        ),
        (
            json!({"https_verify_certificate": "no"}),
            "property \"active\" validation failed: property \"https_verify_certificate\" validation failed: wrong type: expected boolean, got string",
        ),
        (
            json!({"req_headers": []}),
            "property \"active\" validation failed: property \"req_headers\" validation failed: expect array to have at least 1 items",
        ),
        (
            json!({"req_headers": [1]}),
            "property \"active\" validation failed: property \"req_headers\" validation failed: failed to validate item 1: wrong type: expected string, got number",
        ),
        (
            json!({"healthy": {"interval": 0}}),
            "property \"active\" validation failed: property \"healthy\" validation failed: property \"interval\" validation failed: expected 0 to be at least 1",
        ),
        (
            json!({"healthy": {"http_statuses": [199]}}),
            "property \"active\" validation failed: property \"healthy\" validation failed: property \"http_statuses\" validation failed: failed to validate item 1: expected 199 to be at least 200",
        ),
        (
            json!({"healthy": {"http_statuses": [200, 200]}}),
            "property \"active\" validation failed: property \"healthy\" validation failed: property \"http_statuses\" validation failed: expected unique items but items 1 and 2 are equal",
        ),
        (
            json!({"healthy": {"http_statuses": []}}),
            "property \"active\" validation failed: property \"healthy\" validation failed: property \"http_statuses\" validation failed: expect array to have at least 1 items",
        ),
        (
            json!({"healthy": {"successes": 0}}),
            "property \"active\" validation failed: property \"healthy\" validation failed: property \"successes\" validation failed: expected 0 to be at least 1",
        ),
        (
            json!({"unhealthy": {"http_statuses": [600]}}),
            "property \"active\" validation failed: property \"unhealthy\" validation failed: property \"http_statuses\" validation failed: failed to validate item 1: expected 600 to be at most 599",
        ),
        (
            json!({"unhealthy": {"http_failures": 255}}),
            "property \"active\" validation failed: property \"unhealthy\" validation failed: property \"http_failures\" validation failed: expected 255 to be at most 254",
        ),
        (
            json!({"unhealthy": {"tcp_failures": 0}}),
            "property \"active\" validation failed: property \"unhealthy\" validation failed: property \"tcp_failures\" validation failed: expected 0 to be at least 1",
        ),
        (
            json!({"unhealthy": {"timeouts": "3"}}),
            "property \"active\" validation failed: property \"unhealthy\" validation failed: property \"timeouts\" validation failed: wrong type: expected integer, got string",
        ),
    ];
    for (active, detail) in cases {
        refused("checks", json!({ "active": active }), detail);
    }
}

#[test]
fn bad_passive_checks_are_refused() {
    let cases = [
        (
            json!({"type": "grpc"}),
            "property \"passive\" validation failed: property \"type\" validation failed: matches none of the enum values",
        ),
        (
            json!({"healthy": {"successes": -1}}),
            "property \"passive\" validation failed: property \"healthy\" validation failed: property \"successes\" validation failed: expected -1 to be at least 0",
        ),
        (
            json!({"healthy": {"http_statuses": [302, 302]}}),
            "property \"passive\" validation failed: property \"healthy\" validation failed: property \"http_statuses\" validation failed: expected unique items but items 1 and 2 are equal",
        ),
        (
            json!({"unhealthy": {"timeouts": 255}}),
            "property \"passive\" validation failed: property \"unhealthy\" validation failed: property \"timeouts\" validation failed: expected 255 to be at most 254",
        ),
        (
            json!({"unhealthy": {"http_statuses": "500"}}),
            "property \"passive\" validation failed: property \"unhealthy\" validation failed: property \"http_statuses\" validation failed: wrong type: expected array, got string",
        ),
    ];
    for (passive, detail) in cases {
        refused("checks", json!({"active": {}, "passive": passive}), detail);
    }
}

#[test]
fn probe_headers_must_be_headers() {
    assert_eq!(
        check_field("checks", json!({"active": {"req_headers": ["X-A: 1", "no colon"]}})),
        Err("invalid configuration: property \"checks\" validation failed: req_headers item 2 is not a `Name: value` header".into())
    );
    assert!(check_field(
        "checks",
        json!({"active": {"req_headers": ["bad name: 1"]}})
    )
    .is_err());
}

#[test]
fn tls_is_checked() {
    let up = accepted("tls", json!({"verify": false}));
    assert_eq!(up.tls.and_then(|t| t.verify), Some(false));
    let up = accepted("tls", json!({}));
    assert_eq!(up.tls.and_then(|t| t.verify), None);

    refused(
        "tls",
        json!({"verify": "yes"}),
        "property \"verify\" validation failed: wrong type: expected boolean, got string",
    );
    refused(
        "tls",
        json!({"client_cert": "short", "client_key": "k".repeat(64)}),
        "property \"client_cert\" validation failed: string too short, expected at least 128, got 5",
    );
    refused(
        "tls",
        json!({"client_key": "short"}),
        "property \"client_key\" validation failed: string too short, expected at least 64, got 5",
    );
    refused(
        "tls",
        json!({"client_cert": "c".repeat(128)}),
        "failed to validate dependent schema for \"client_cert\": property \"client_key\" is required",
    );
    refused(
        "tls",
        json!({"client_key": "k".repeat(64)}),
        "failed to validate dependent schema for \"client_key\": property \"client_cert\" is required",
    );
    refused(
        "tls",
        json!({"client_cert_id": "1", "client_cert": "c".repeat(128), "client_key": "k".repeat(64)}),
        "failed to validate dependent schema for \"client_cert_id\": value wasn't supposed to match schema",
    );
    refused(
        "tls",
        json!({"client_cert_id": "bad id!"}),
        "property \"client_cert_id\" validation failed: object matches none of the required",
    );
    refused("tls", json!([]), "wrong type: expected object, got array");
}

/// ssl objects by id, as stored.
struct Ssls(Vec<(&'static str, Value)>);

impl Lookup for Ssls {
    fn exists(&self, kind: Kind, id: &str) -> bool {
        self.get(kind, id).is_some()
    }

    fn get(&self, kind: Kind, id: &str) -> Option<Value> {
        let found = self.0.iter().find(|(i, _)| *i == id);
        found.filter(|_| kind == Kind::Ssls).map(|(_, v)| v.clone())
    }
}

/// Knows that objects exist, not what they hold.
struct ExistsOnly;

impl Lookup for ExistsOnly {
    fn exists(&self, _: Kind, _: &str) -> bool {
        true
    }
}

#[test]
fn tls_client_cert_id_must_name_a_client_ssl_object() {
    let pem = crate::testcerts::ecdsa("client");
    let ssls = Ssls(vec![
        (
            "c",
            json!({"type": "client", "cert": pem.cert, "key": pem.key}),
        ),
        (
            "s",
            json!({"type": "server", "sni": "a.com", "cert": pem.cert, "key": pem.key}),
        ),
        (
            "untyped",
            json!({"sni": "a.com", "cert": pem.cert, "key": pem.key}),
        ),
        ("7", json!({"type": "client"})),
    ]);
    let with_tls = |tls: Value| upstream("tls", tls);
    let verdict = |tls: Value, lookup: &dyn Lookup| check(Kind::Upstreams, &with_tls(tls), lookup);
    assert_eq!(verdict(json!({"client_cert_id": "c"}), &ssls), Ok(()));
    assert_eq!(
        verdict(json!({"client_cert_id": 7}), &ssls),
        Ok(()),
        "an integer id"
    );
    assert_eq!(
        verdict(json!({"client_cert_id": 9999999}), &ssls),
        Err("failed to fetch ssl info by ssl id [9999999], response code: 404".into())
    );
    assert_eq!(
        verdict(json!({"client_cert_id": 7}), &Nothing),
        Err("failed to fetch ssl info by ssl id [7], response code: 404".into())
    );
    for id in ["s", "untyped"] {
        assert_eq!(
            verdict(json!({"client_cert_id": id}), &ssls),
            Err(format!(
                "failed to fetch ssl info by ssl id [{id}], wrong ssl type"
            )),
        );
    }
    // A lookup that cannot show contents only checks existence.
    assert_eq!(verdict(json!({"client_cert_id": "s"}), &ExistsOnly), Ok(()));
    // Inline upstreams of routes and services are checked alike.
    let route = |id: &str| {
        json!({"id": "1", "uri": "/a", "upstream": {"nodes": {"127.0.0.1:80": 1},
            "scheme": "https", "tls": {"client_cert_id": id}}})
    };
    assert_eq!(check(Kind::Routes, &route("c"), &ssls), Ok(()));
    assert_eq!(
        check(Kind::Routes, &route("s"), &ssls),
        Err("failed to fetch ssl info by ssl id [s], wrong ssl type".into())
    );
    let service = json!({"id": "1", "upstream": {"nodes": {"127.0.0.1:80": 1},
        "tls": {"client_cert_id": "nope"}}});
    assert_eq!(
        check(Kind::Services, &service, &ssls),
        Err("failed to fetch ssl info by ssl id [nope], response code: 404".into())
    );
}

#[test]
fn tls_client_cert_is_checked_as_an_ssl_certificate() {
    let pem = crate::testcerts::ecdsa("client");
    let rsa = crate::testcerts::rsa("client");
    let tls = |cert: &str, key: &str| json!({"client_cert": cert, "client_key": key});
    let up = accepted("tls", tls(&pem.cert, &pem.key));
    let tls_conf = up.tls.unwrap();
    assert_eq!(tls_conf.client_cert.as_deref(), Some(pem.cert.as_str()));
    assert_eq!(tls_conf.client_key.as_deref(), Some(pem.key.as_str()));
    accepted("tls", tls(&rsa.cert, &rsa.key));
    let cases = [
        (
            tls(&"c".repeat(128), &pem.key),
            "failed to parse cert: PEM_read_bio_X509_AUX() failed",
        ),
        (
            tls(&pem.cert, &"-".repeat(64)),
            "failed to parse key: PEM_read_bio_PrivateKey() failed",
        ),
        (
            tls(&pem.cert, &"AAA".repeat(128)),
            "failed to decrypt previous encrypted key",
        ),
        (
            tls(&pem.cert, &rsa.key),
            "failed to parse key: the key does not match the certificate",
        ),
    ];
    for (value, msg) in cases {
        assert_eq!(check_field("tls", value), Err(msg.to_string()));
    }
    // The same inside a route, without a prefix, as APISIX answers.
    let route = json!({"id": "1", "uri": "/a", "upstream": {"nodes": {"127.0.0.1:80": 1},
        "tls": tls(&pem.cert, &"AAA".repeat(128))}});
    assert_eq!(
        check(Kind::Routes, &route, &Nothing),
        Err("failed to decrypt previous encrypted key".into())
    );
    // Still both or neither, from the schema.
    let route = json!({"id": "1", "uri": "/a", "upstream": {"nodes": {"127.0.0.1:80": 1},
        "tls": {"client_cert": pem.cert}}});
    assert_eq!(
        check(Kind::Routes, &route, &Nothing),
        Err("invalid configuration: property \"upstream\" validation failed: property \"tls\" validation failed: failed to validate dependent schema for \"client_cert\": property \"client_key\" is required".into())
    );
}

#[test]
fn keepalive_pool_with_defaults_applied() {
    let pool = accepted("keepalive_pool", json!({})).keepalive_pool;
    assert_eq!(
        (pool.size, pool.idle_timeout, pool.requests),
        (320, 60.0, 1000)
    );
    let pool = accepted("keepalive_pool", json!({"idle_timeout": 0.5})).keepalive_pool;
    assert_eq!(
        (pool.size, pool.idle_timeout, pool.requests),
        (320, 0.5, 1000)
    );
    let pool = accepted(
        "keepalive_pool",
        json!({"size": 1, "idle_timeout": 0, "requests": 1}),
    )
    .keepalive_pool;
    assert_eq!((pool.size, pool.idle_timeout, pool.requests), (1, 0.0, 1));
}

#[test]
fn bad_keepalive_pools_are_refused() {
    refused(
        "keepalive_pool",
        json!({"size": 0}),
        "property \"size\" validation failed: expected 0 to be at least 1",
    );
    refused(
        "keepalive_pool",
        json!({"size": 1.5}),
        "property \"size\" validation failed: wrong type: expected integer, got number",
    );
    refused(
        "keepalive_pool",
        json!({"idle_timeout": -1}),
        "property \"idle_timeout\" validation failed: expected -1 to be at least 0",
    );
    refused(
        "keepalive_pool",
        json!({"requests": 0}),
        "property \"requests\" validation failed: expected 0 to be at least 1",
    );
    refused(
        "keepalive_pool",
        json!(5),
        "wrong type: expected object, got number",
    );
}

#[test]
fn inline_upstreams_are_checked_the_same() {
    let route = json!({"id": "1", "uri": "/a", "upstream": {
        "nodes": {"127.0.0.1:80": 1}, "checks": {"passive": {}}
    }});
    assert_eq!(
        check(Kind::Routes, &route, &Nothing),
        Err("invalid configuration: property \"upstream\" validation failed: property \"checks\" validation failed: object matches none of the required: [\"active\"] or [\"active\",\"passive\"]".into())
    );
}

#[test]
fn enums_are_refused_by_name() {
    for field in ["type", "scheme", "pass_host", "hash_on"] {
        refused(field, json!("nope"), "matches none of the enum values");
    }
}

#[test]
fn chash_keys_are_checked() {
    let chash = |extra: Value| {
        let mut up = upstream("type", json!("chash"));
        for (k, v) in extra.as_object().into_iter().flatten() {
            up[k] = v.clone();
        }
        check(Kind::Upstreams, &up, &Nothing)
    };
    assert_eq!(chash(json!({})), Err("missing key".into()));
    assert_eq!(
        chash(json!({"hash_on": "header"})),
        Err("missing key".into())
    );
    assert_eq!(chash(json!({"hash_on": "consumer"})), Ok(()));
    for key in ["remote_addr", "uri", "arg_user", "arg_a-b_C"] {
        assert_eq!(chash(json!({ "key": key })), Ok(()), "{key}");
    }
    assert_eq!(
        chash(json!({"key": "http_x_user"})),
        Err(format!(
            "invalid configuration: failed to match pattern {:?} with \"http_x_user\"",
            super::HASH_VARS_PATTERN
        ))
    );
    assert_eq!(chash(json!({"hash_on": "header", "key": "x-user"})), Ok(()));
    assert_eq!(chash(json!({"hash_on": "cookie", "key": "sid_1"})), Ok(()));
    assert_eq!(
        chash(json!({"hash_on": "header", "key": "x user"})),
        Err(
            "invalid configuration: failed to match pattern \"^[a-zA-Z0-9-_]+$\" with \"x user\""
                .into()
        )
    );
    assert_eq!(
        chash(json!({"hash_on": "vars_combinations", "key": "$host$uri"})),
        Ok(())
    );
    // Only chash upstreams use the key.
    assert_eq!(check_field("hash_on", json!("header")), Ok(()));
}

#[test]
fn original_dst_upstreams_list_no_nodes() {
    let ok = |v: Value| check(Kind::Upstreams, &v, &Nothing);
    ok(json!({"id": "1", "discovery_type": "original_dst"})).unwrap();
    let up: UpstreamConf = serde_json::from_value(
        json!({"discovery_type": "original_dst", "tproxy": {"source": "client"}}),
    )
    .unwrap();
    assert!(up.is_original_dst() && up.source_is_client());
    // Any other discovery type still needs its service name, as in APISIX.
    assert_eq!(
        ok(json!({"id": "1", "discovery_type": "dns"})),
        Err("invalid configuration: value should match only one schema, but matches none".into())
    );
    let with_nodes = ok(json!({"id": "1", "discovery_type": "original_dst",
        "nodes": {"127.0.0.1:80": 1}}));
    assert!(with_nodes.unwrap_err().contains("lists no `nodes`"));
    let with_checks = ok(json!({"id": "1", "discovery_type": "original_dst",
        "checks": {"active": {}}}));
    assert!(with_checks.unwrap_err().contains("remove `checks`"));
}

#[test]
fn tproxy_source() {
    assert!(!accepted("tproxy", json!({})).source_is_client());
    assert!(!accepted("tproxy", json!({"source": "gateway"})).source_is_client());
    assert!(accepted("tproxy", json!({"source": "client"})).source_is_client());
    refused(
        "tproxy",
        json!({"source": "somewhere"}),
        "property \"source\" validation failed: matches none of the enum values",
    );
    let grpc = json!({"id": "1", "nodes": {"127.0.0.1:80": 1}, "scheme": "grpc",
        "tproxy": {"source": "client"}});
    assert!(check(Kind::Upstreams, &grpc, &Nothing)
        .unwrap_err()
        .contains("not `grpc`"));
}
