use super::*;
use crate::store::MemoryStore;
use futures_util::FutureExt;
use serde_json::json;

// The operations are async for remote stores; an in-memory store's writes
// are done when called, so its futures are ready on the first poll.
fn ready<T>(f: impl std::future::Future<Output = T>) -> T {
    f.now_or_never()
        .expect("an in-memory store answers at once")
}

fn put(
    s: &dyn Store,
    kind: Kind,
    id: Option<&str>,
    conf: Option<Value>,
) -> Result<Reply, AdminError> {
    ready(super::put(s, kind, id, conf))
}

fn post(s: &dyn Store, kind: Kind, conf: Option<Value>) -> Result<Reply, AdminError> {
    ready(super::post(s, kind, conf))
}

fn patch(
    s: &dyn Store,
    kind: Kind,
    id: Option<&str>,
    sub_path: Option<&str>,
    conf: Option<Value>,
) -> Result<Reply, AdminError> {
    ready(super::patch(s, kind, id, sub_path, conf))
}

fn delete(s: &dyn Store, kind: Kind, id: Option<&str>, force: bool) -> Result<Reply, AdminError> {
    ready(super::delete(s, kind, id, force))
}

fn route(uri: &str) -> Value {
    json!({"uri": uri, "upstream": {"type": "roundrobin", "nodes": {"127.0.0.1:1980": 1}}})
}

#[test]
fn put_creates_then_replaces_keeping_create_time() {
    let s = MemoryStore::new();
    let (st, body) = put(&s, Kind::Routes, Some("1"), Some(route("/a"))).unwrap();
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(body["key"], "/apisix/routes/1");
    assert_eq!(body["value"]["id"], "1");
    let created = body["value"]["create_time"].clone();
    assert!(created.is_i64());
    let (st, body) = put(&s, Kind::Routes, Some("1"), Some(route("/b"))).unwrap();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body["value"]["create_time"], created);
    assert_eq!(body["value"]["uri"], "/b");
}

#[test]
fn id_rules() {
    let s = MemoryStore::new();
    let mut with_id = route("/a");
    with_id["id"] = json!("2");
    assert_eq!(
        put(&s, Kind::Routes, Some("1"), Some(with_id.clone()))
            .unwrap_err()
            .body["error_msg"],
        "wrong route id"
    );
    assert_eq!(
        put(&s, Kind::Routes, None, Some(route("/a")))
            .unwrap_err()
            .body["error_msg"],
        "missing route id"
    );
    assert_eq!(
        post(&s, Kind::Routes, Some(with_id.clone()))
            .unwrap_err()
            .body["error_msg"],
        "wrong route id, do not need it"
    );
    let (st, body) = put(&s, Kind::Routes, None, Some(with_id)).unwrap();
    assert_eq!(
        (st, body["key"].as_str()),
        (StatusCode::CREATED, Some("/apisix/routes/2"))
    );
    let mut int_id = route("/i");
    int_id["id"] = json!(7);
    let (_, body) = put(&s, Kind::Routes, Some("7"), Some(int_id)).unwrap();
    assert_eq!(body["value"]["id"], 7);
    assert_eq!(
        put(&s, Kind::Routes, Some("1"), None).unwrap_err().body["error_msg"],
        "missing configurations"
    );
    let mut ct = route("/a");
    ct["create_time"] = json!(1);
    let msg = put(&s, Kind::Routes, Some("1"), Some(ct)).unwrap_err().body["error_msg"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.starts_with("the property is forbidden:") && msg.ends_with("create_time"),
        "{msg}"
    );
}

#[test]
fn post_generates_distinct_ids_and_global_rules_refuse_post() {
    let s = MemoryStore::new();
    let (st, a) = post(&s, Kind::Routes, Some(route("/a"))).unwrap();
    let (_, b) = post(&s, Kind::Routes, Some(route("/b"))).unwrap();
    assert_eq!(st, StatusCode::CREATED);
    assert_ne!(a["value"]["id"], b["value"]["id"]);
    assert_eq!(a["value"]["id"].as_str().unwrap().len(), 20);
    let err = post(&s, Kind::GlobalRules, Some(json!({"plugins": {}}))).unwrap_err();
    assert_eq!(err.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        err.body["error_msg"],
        "not supported `POST` method for global rule"
    );
}

#[test]
fn invalid_input_changes_nothing() {
    let s = MemoryStore::new();
    put(&s, Kind::Routes, Some("1"), Some(route("/a"))).unwrap();
    let rev = s.revision().unwrap();
    let mut bad = route("/b");
    bad["plugins"] = json!({"ip-restriction": {"whitelist": []}});
    assert_eq!(
        put(&s, Kind::Routes, Some("1"), Some(bad))
            .unwrap_err()
            .status,
        StatusCode::BAD_REQUEST
    );
    assert!(patch(
        &s,
        Kind::Routes,
        Some("1"),
        None,
        Some(json!({"methods": ["NOPE"]}))
    )
    .is_err());
    assert_eq!(s.revision().unwrap(), rev);
    assert_eq!(get(&s, Kind::Routes, "1").unwrap().1["value"]["uri"], "/a");
}

#[test]
fn objects_nested_too_deeply_are_refused() {
    let s = MemoryStore::new();
    put(&s, Kind::Routes, Some("1"), Some(route("/a"))).unwrap();
    let rev = s.revision().unwrap();
    let nested = |levels: usize| {
        let mut v = json!(["arg_a", "==", "b"]);
        for _ in 0..levels {
            v = json!(["AND", v]);
        }
        v
    };
    // As deep as a body may be parsed: stored, it could not be read back.
    let mut deep = route("/b");
    deep["vars"] = nested(120);
    let (status, msg) = err(put(&s, Kind::Routes, Some("1"), Some(deep)));
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(msg.contains("nested deeper than 100 levels"), "{msg}");
    // A sub-path of 40,000 levels is refused before anything is built.
    let long = "a/".repeat(40_000);
    let (status, _) = err(patch(
        &s,
        Kind::Routes,
        Some("1"),
        Some(&long),
        Some(json!(1)),
    ));
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // A sub-path and a body each within bounds, too deep together.
    let (status, _) = err(patch(
        &s,
        Kind::Routes,
        Some("1"),
        Some(&"a/".repeat(60)),
        Some(nested(60)),
    ));
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(s.revision().unwrap(), rev);
}

#[test]
fn patch_merges_removes_and_sets_sub_paths() {
    let s = MemoryStore::new();
    let mut r = route("/a");
    r["desc"] = json!("d");
    r["methods"] = json!(["GET", "POST"]);
    r["upstream"]["nodes"]["127.0.0.1:1981"] = json!(1);
    put(&s, Kind::Routes, Some("1"), Some(r)).unwrap();
    let (st, body) = patch(
        &s,
        Kind::Routes,
        Some("1"),
        None,
        Some(json!({"desc": null, "methods": ["PUT"], "upstream": {"nodes": {"127.0.0.1:1980": null}}})),
    )
    .unwrap();
    assert_eq!(st, StatusCode::OK);
    let v = &body["value"];
    assert!(v.get("desc").is_none());
    assert_eq!(v["methods"], json!(["PUT"]));
    assert_eq!(v["upstream"]["nodes"], json!({"127.0.0.1:1981": 1}));
    assert_eq!(v["upstream"]["type"], "roundrobin");
    let (_, body) = patch(
        &s,
        Kind::Routes,
        Some("1"),
        Some("methods"),
        Some(json!(["POST"])),
    )
    .unwrap();
    assert_eq!(body["value"]["methods"], json!(["POST"]));
    assert_eq!(
        patch(&s, Kind::Routes, Some("9"), None, Some(json!({})))
            .unwrap_err()
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        patch(&s, Kind::Routes, Some("1"), None, None)
            .unwrap_err()
            .body["error_msg"],
        "missing new configuration"
    );
}

#[test]
fn delete_guards_references_unless_forced() {
    let s = MemoryStore::new();
    put(
        &s,
        Kind::Upstreams,
        Some("u"),
        Some(json!({"nodes": {"127.0.0.1:1980": 1}})),
    )
    .unwrap();
    put(
        &s,
        Kind::Routes,
        Some("r"),
        Some(json!({"uri": "/x", "upstream_id": "u"})),
    )
    .unwrap();
    let err = delete(&s, Kind::Upstreams, Some("u"), false).unwrap_err();
    assert_eq!(
        err.body["error_msg"],
        "can not delete this upstream, route [r] is still using it now"
    );
    let (st, body) = delete(&s, Kind::Upstreams, Some("u"), true).unwrap();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body, json!({"deleted": "1", "key": "/apisix/upstreams/u"}));
    assert_eq!(
        delete(&s, Kind::Upstreams, Some("u"), false).unwrap_err(),
        AdminError::key_not_found()
    );
}

#[test]
fn list_envelope_and_paging() {
    let s = MemoryStore::new();
    assert_eq!(
        list(&s, Kind::Routes, None, &ListQuery::default())
            .unwrap()
            .1,
        json!({"list": [], "total": 0})
    );
    for i in 0..12 {
        put(
            &s,
            Kind::Routes,
            Some(&format!("r{i:02}")),
            Some(route(&format!("/p{i}"))),
        )
        .unwrap();
    }
    let (_, all) = list(&s, Kind::Routes, None, &ListQuery::default()).unwrap();
    assert_eq!(all["total"], 12);
    assert!(all["list"][0]["createdIndex"].is_u64());
    let q = ListQuery {
        page: Some(2),
        page_size: Some(10),
        ..Default::default()
    };
    assert_eq!(
        list(&s, Kind::Routes, None, &q).unwrap().1["list"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let q = ListQuery {
        page_size: Some(5),
        ..Default::default()
    };
    assert!(list(&s, Kind::Routes, None, &q).is_err());
    let q = ListQuery {
        uri: Some("^/p1[01]$".into()),
        ..Default::default()
    };
    assert_eq!(list(&s, Kind::Routes, None, &q).unwrap().1["total"], 2);
    let q = ListQuery {
        uri: Some("(".into()),
        ..Default::default()
    };
    assert_eq!(
        list(&s, Kind::Routes, None, &q).unwrap_err().status,
        StatusCode::BAD_REQUEST
    );
}

fn err(r: Result<Reply, AdminError>) -> (StatusCode, String) {
    let e = r.unwrap_err();
    (
        e.status,
        e.body["error_msg"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn consumers_are_keyed_by_username() {
    let s = MemoryStore::new();
    let (st, body) = put(&s, Kind::Consumers, None, Some(json!({"username": "jack"}))).unwrap();
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(body["key"], "/apisix/consumers/jack");
    assert!(body["value"].get("id").is_none());
    let (st, _) = put(
        &s,
        Kind::Consumers,
        Some("jack"),
        Some(json!({"username": "jack", "desc": "x"})),
    )
    .unwrap();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        err(put(
            &s,
            Kind::Consumers,
            Some("rose"),
            Some(json!({"username": "jack"}))
        )),
        (StatusCode::BAD_REQUEST, "wrong username".into())
    );
    assert_eq!(
        err(put(&s, Kind::Consumers, None, Some(json!({"desc": "x"})))),
        (
            StatusCode::BAD_REQUEST,
            "invalid configuration: property \"username\" is required".into()
        )
    );
    assert_eq!(
        err(post(&s, Kind::Consumers, Some(json!({"username": "a"})))),
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "not supported `POST` method for consumer".into()
        )
    );
    assert_eq!(
        err(patch(
            &s,
            Kind::Consumers,
            Some("jack"),
            None,
            Some(json!({}))
        ))
        .0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        err(put(
            &s,
            Kind::Consumers,
            None,
            Some(json!({"username": "bob", "group_id": "g1"}))
        ))
        .1,
        "failed to fetch consumer group info by consumer group id [g1], response code: 404"
    );
}

#[test]
fn credentials_need_their_consumer_and_go_with_it() {
    let s = MemoryStore::new();
    assert_eq!(
        err(put(
            &s,
            Kind::Credentials,
            Some("jack/credentials/a"),
            Some(json!({"plugins": {}}))
        )),
        (StatusCode::NOT_FOUND, "consumer not found".into())
    );
    put(&s, Kind::Consumers, None, Some(json!({"username": "jack"}))).unwrap();
    let (st, body) = put(
        &s,
        Kind::Credentials,
        Some("jack/credentials/a"),
        Some(json!({"plugins": {}})),
    )
    .unwrap();
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(body["key"], "/apisix/consumers/jack/credentials/a");
    assert_eq!(
        err(put(
            &s,
            Kind::Credentials,
            Some("jack/credentials/b"),
            Some(json!({"plugins": {"ip-restriction": {"whitelist": ["1.1.1.1"]}}}))
        ))
        .1,
        "only supports auth type plugins in consumer credential"
    );
    // Consumers and credentials share a prefix but not a list.
    let (_, consumers) = list(&s, Kind::Consumers, None, &ListQuery::default()).unwrap();
    assert_eq!(consumers["total"], 1);
    let (_, creds) = list(&s, Kind::Credentials, Some("jack"), &ListQuery::default()).unwrap();
    assert_eq!(creds["total"], 1);
    delete(&s, Kind::Consumers, Some("jack"), false).unwrap();
    assert!(s
        .get("/apisix/consumers/jack/credentials/a")
        .unwrap()
        .is_none());
}

#[test]
fn plugin_configs_and_groups_refuse_delete_while_used() {
    let s = MemoryStore::new();
    let pc = json!({"plugins": {"ip-restriction": {"whitelist": ["1.1.1.1"]}}});
    assert_eq!(
        err(post(&s, Kind::PluginConfigs, Some(pc.clone()))).0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    put(&s, Kind::PluginConfigs, Some("pc"), Some(pc.clone())).unwrap();
    let mut r = route("/a");
    r["plugin_config_id"] = json!("missing");
    assert_eq!(
        err(put(&s, Kind::Routes, Some("1"), Some(r.clone()))).1,
        "failed to fetch plugin config info by plugin config id [missing], response code: 404"
    );
    r["plugin_config_id"] = json!("pc");
    put(&s, Kind::Routes, Some("1"), Some(r)).unwrap();
    assert_eq!(
        err(delete(&s, Kind::PluginConfigs, Some("pc"), false)).1,
        "can not delete this plugin config, route [1] is still using it now"
    );
    put(&s, Kind::ConsumerGroups, Some("g"), Some(pc)).unwrap();
    put(
        &s,
        Kind::Consumers,
        None,
        Some(json!({"username": "jack", "group_id": "g"})),
    )
    .unwrap();
    assert_eq!(
        err(delete(&s, Kind::ConsumerGroups, Some("g"), false)).1,
        "can not delete this consumer group, consumer [jack] is still using it now"
    );
}

#[test]
fn plugin_metadata_is_keyed_by_plugin_name() {
    let s = MemoryStore::new();
    assert_eq!(
        err(put(
            &s,
            Kind::PluginMetadata,
            Some("no-such-plugin"),
            Some(json!({}))
        ))
        .1,
        "invalid plugin name"
    );
    let (st, body) = put(
        &s,
        Kind::PluginMetadata,
        Some("ip-restriction"),
        Some(json!({})),
    )
    .unwrap();
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(body["key"], "/apisix/plugin_metadata/ip-restriction");
}

#[test]
fn ssls_are_stored_shown_without_keys_and_deleted() {
    let s = MemoryStore::new();
    let pem = crate::testcerts::ecdsa("test.com");
    let conf = json!({"sni": "test.com", "cert": pem.cert, "key": pem.key,
        "certs": [pem.cert], "keys": [pem.key]});
    let (st, body) = put(&s, Kind::Ssls, Some("1"), Some(conf.clone())).unwrap();
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(body["key"], "/apisix/ssls/1");
    assert_eq!(body["value"]["sni"], "test.com");
    // The store keeps the keys: the data plane needs them.
    let stored = s.get("/apisix/ssls/1").unwrap().unwrap().value;
    assert_eq!(stored["key"], pem.key.as_str());
    assert_eq!(stored["keys"][0], pem.key.as_str());
    // GET, one or listed, shows no private key.
    let (st, body) = get(&s, Kind::Ssls, "1").unwrap();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body["value"]["cert"], pem.cert.as_str());
    assert!(body["value"].get("key").is_none() && body["value"].get("keys").is_none());
    assert!(body["modifiedIndex"].is_u64());
    let (_, body) = list(&s, Kind::Ssls, None, &ListQuery::default()).unwrap();
    assert_eq!(body["total"], 1);
    let item = &body["list"][0]["value"];
    assert!(item.get("key").is_none() && item.get("keys").is_none());
    assert_eq!(item["certs"][0], pem.cert.as_str());
    // PATCH checks the merged object: a key of another certificate.
    let other = crate::testcerts::ecdsa("test.com");
    assert_eq!(
        err(patch(
            &s,
            Kind::Ssls,
            Some("1"),
            None,
            Some(json!({"key": other.key}))
        )),
        (
            StatusCode::BAD_REQUEST,
            "failed to parse key: the key does not match the certificate".into()
        )
    );
    let (st, _) = patch(&s, Kind::Ssls, Some("1"), None, Some(json!({"status": 0}))).unwrap();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(s.get("/apisix/ssls/1").unwrap().unwrap().value["status"], 0);
    // Invalid objects are not stored.
    let mut no_sni = conf.clone();
    no_sni.as_object_mut().unwrap().remove("sni");
    assert_eq!(
        err(put(&s, Kind::Ssls, Some("2"), Some(no_sni))),
        (
            StatusCode::BAD_REQUEST,
            "invalid configuration: then clause did not match".into()
        )
    );
    assert!(s.get("/apisix/ssls/2").unwrap().is_none());
    let (st, body) = delete(&s, Kind::Ssls, Some("1"), false).unwrap();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body, json!({"deleted": "1", "key": "/apisix/ssls/1"}));
    assert_eq!(
        get(&s, Kind::Ssls, "1").unwrap_err().status,
        StatusCode::NOT_FOUND
    );
}

#[test]
fn upstreams_refer_to_client_ssls_by_id() {
    let s = MemoryStore::new();
    let pem = crate::testcerts::ecdsa("client");
    let server = json!({"sni": "test.com", "cert": pem.cert, "key": pem.key});
    let client = json!({"type": "client", "cert": pem.cert, "key": pem.key});
    put(&s, Kind::Ssls, Some("server"), Some(server)).unwrap();
    let (_, body) = post(&s, Kind::Ssls, Some(client)).unwrap();
    let client_id = body["value"]["id"].as_str().unwrap().to_string();
    let upstream = |id: &str| {
        json!({"type": "roundrobin", "scheme": "https", "nodes": {"127.0.0.1:1983": 1},
            "tls": {"client_cert_id": id}})
    };
    let (st, _) = put(&s, Kind::Upstreams, Some("1"), Some(upstream(&client_id))).unwrap();
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(
        err(put(
            &s,
            Kind::Upstreams,
            Some("2"),
            Some(upstream("server"))
        )),
        (
            StatusCode::BAD_REQUEST,
            "failed to fetch ssl info by ssl id [server], wrong ssl type".into()
        )
    );
    assert_eq!(
        err(post(
            &s,
            Kind::Upstreams,
            Some(json!({"nodes": {"127.0.0.1:8080": 1},
            "type": "roundrobin", "tls": {"client_cert_id": 9999999}}))
        )),
        (
            StatusCode::BAD_REQUEST,
            "failed to fetch ssl info by ssl id [9999999], response code: 404".into()
        )
    );
    let mut route_conf = route("/hello");
    route_conf["upstream"] = upstream("server");
    assert_eq!(
        err(put(&s, Kind::Routes, Some("1"), Some(route_conf))),
        (
            StatusCode::BAD_REQUEST,
            "failed to fetch ssl info by ssl id [server], wrong ssl type".into()
        )
    );
    let mut route_conf = route("/hello");
    route_conf["upstream"] = upstream(&client_id);
    put(&s, Kind::Routes, Some("1"), Some(route_conf)).unwrap();
    // Inline client certificates, checked like an ssl object's.
    let mut inline = route("/inline");
    inline["upstream"]["tls"] = json!({"client_cert": pem.cert, "client_key": "AAA".repeat(128)});
    assert_eq!(
        err(put(&s, Kind::Routes, Some("2"), Some(inline))),
        (
            StatusCode::BAD_REQUEST,
            "failed to decrypt previous encrypted key".into()
        )
    );
}
