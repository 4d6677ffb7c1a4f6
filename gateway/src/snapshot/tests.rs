use super::*;

fn put(key: &str, value: Value, index: u64) -> Event {
    Event::Put(Entry {
        key: key.into(),
        value,
        created_index: index,
        modified_index: index,
    })
}

fn route(uri: &str) -> Value {
    json!({"uri": uri, "upstream": {"nodes": {"127.0.0.1:1980": 1}}})
}

fn compiled<'a>(c: &'a Compiler, id: &str) -> &'a CompiledRoute {
    c.routes[id].compiled.as_deref().expect("compiled")
}

#[test]
fn a_batch_becomes_exactly_one_snapshot() {
    let mut c = Compiler::new(ProxyOptions::default());
    let first = c.apply_all(&[put("/apisix/routes/1", route("/a"), 1)]);
    let events: Vec<Event> = (2..12)
        .map(|i| put(&format!("/apisix/routes/{i}"), route(&format!("/r{i}")), i))
        .chain([Event::Delete {
            key: "/apisix/routes/1".into(),
        }])
        .collect();
    let next = c.apply_all(&events);
    assert_eq!(next.version, first.version + 1);
    assert_eq!(next.routes, 10);
}

#[test]
fn a_route_that_no_longer_compiles_keeps_its_previous_version() {
    let mut c = Compiler::new(ProxyOptions::default());
    c.apply(&put("/apisix/routes/1", route("/a"), 1));
    // Only a store written by something else holds this: the Admin API
    // refuses unknown plugins.
    let mut bad = route("/b");
    bad["plugins"] = json!({"no-such-plugin": {}});
    let snap = c.apply(&put("/apisix/routes/1", bad, 2));
    assert_eq!(snap.routes, 1);
    assert_eq!(compiled(&c, "1").uris, vec!["/a".to_string()]);
}

#[test]
fn plugins_merge_service_then_plugin_config_then_route() {
    let mut c = Compiler::new(ProxyOptions::default());
    let deny = |ip: &str| json!({"blacklist": [ip]});
    c.apply_all(&[
        put(
            "/apisix/services/s",
            json!({"plugins": {"ip-restriction": deny("10.0.0.1")}}),
            1,
        ),
        put(
            "/apisix/plugin_configs/pc",
            json!({"id": "pc", "plugins": {"ip-restriction": deny("10.0.0.2")}}),
            2,
        ),
    ]);
    let mut r = route("/a");
    r["service_id"] = json!("s");
    r["plugin_config_id"] = json!("pc");
    c.apply(&put("/apisix/routes/1", r, 3));
    let set = &compiled(&c, "1").plugins;
    assert_eq!(set.entries().len(), 1);
    assert_eq!(compiled(&c, "1").service_id.as_deref(), Some("s"));
    // A plugin config change reaches the routes that use it.
    let before = Arc::as_ptr(&compiled(&c, "1").plugins);
    c.apply(&put(
        "/apisix/plugin_configs/pc",
        json!({"id": "pc", "plugins": {}}),
        4,
    ));
    assert!(!std::ptr::eq(
        before,
        Arc::as_ptr(&compiled(&c, "1").plugins)
    ));
}

#[test]
fn consumers_carry_their_group_and_own_plugins() {
    let mut c = Compiler::new(ProxyOptions::default());
    c.apply_all(&[
        put(
            "/apisix/consumer_groups/g",
            json!({"id": "g", "plugins": {"ip-restriction": {"blacklist": ["10.0.0.1"]}}}),
            1,
        ),
        put(
            "/apisix/consumers/jack",
            json!({"username": "jack", "group_id": "g", "labels": {"custom_id": "c-1"}}),
            2,
        ),
    ]);
    let jack = c.consumer_index.consumer("jack").expect("jack");
    assert_eq!(jack.plugins.entries().len(), 1);
    assert_eq!(jack.custom_id.as_deref(), Some("c-1"));
    c.apply(&Event::Delete {
        key: "/apisix/consumers/jack".into(),
    });
    assert!(c.consumer_index.consumer("jack").is_none());
}

#[test]
fn global_rules_compile_on_their_own() {
    let mut c = Compiler::new(ProxyOptions::default());
    c.apply(&put(
        "/apisix/global_rules/1",
        json!({"id": "1", "plugins": {"ip-restriction": {"blacklist": ["10.0.0.1"]}}}),
        1,
    ));
    assert_eq!(c.globals.rules.len(), 1);
    c.apply(&Event::Delete {
        key: "/apisix/global_rules/1".into(),
    });
    assert!(c.globals.rules.is_empty());
}
