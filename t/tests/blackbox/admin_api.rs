#![allow(clippy::unwrap_used)]
//! The Admin API over real HTTP: statuses, envelopes, errors, auth, and
//! that rejected input leaves the running gateway as it was.

use harness::serde_json::{json, Value};
use harness::{send, upstream, Gateway, Upstream, KEY};

#[tokio::test]
async fn route_lifecycle_matches_apisix_envelopes() {
    let gw = Gateway::start().await;
    let u1 = Upstream::start("u1").await;
    let body = json!({"uri": "/hello", "upstream": upstream(&[(&u1.node(), 1)])});
    let r = gw.admin("PUT", "routes/1", Some(body.clone())).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("x-api-version"), Some("v3"));
    assert!(r.header("server").unwrap().starts_with("ferrogate"));
    let v = r.json();
    assert_eq!(v["key"], "/apisix/routes/1");
    assert_eq!(v["value"]["id"], "1");
    let created = v["value"]["create_time"].as_i64().unwrap();
    assert_eq!(gw.admin("PUT", "routes/1", Some(body)).await.status, 200);

    let one = gw.admin("GET", "routes/1", None).await.json();
    assert_eq!(one["value"]["create_time"], created);
    assert!(one["createdIndex"].is_u64() && one["modifiedIndex"].is_u64());
    let list = gw.admin("GET", "routes", None).await.json();
    assert_eq!(list["total"], 1);

    let patched = gw
        .admin(
            "PATCH",
            "routes/1",
            Some(json!({"desc": "d", "methods": ["GET"]})),
        )
        .await;
    assert_eq!(patched.status, 200);
    assert_eq!(patched.json()["value"]["desc"], "d");
    let sub = gw
        .admin("PATCH", "routes/1/methods", Some(json!(["POST"])))
        .await;
    assert_eq!(sub.json()["value"]["methods"], json!(["POST"]));

    let posted = gw
        .admin(
            "POST",
            "routes",
            Some(json!({"uri": "/p", "upstream": upstream(&[(&u1.node(), 1)])})),
        )
        .await;
    assert_eq!(posted.status, 201);
    let pid = posted.json()["value"]["id"].as_str().unwrap().to_string();
    assert_eq!(posted.json()["key"], format!("/apisix/routes/{pid}"));

    let del = gw.admin("DELETE", "routes/1", None).await;
    assert_eq!(
        del.json(),
        json!({"deleted": "1", "key": "/apisix/routes/1"})
    );
    let gone = gw.admin("GET", "routes/1", None).await;
    assert_eq!(
        (gone.status.as_u16(), gone.json()),
        (404, json!({"message": "Key not found"}))
    );
    gw.stop().await;
}

#[tokio::test]
async fn invalid_input_is_rejected_and_changes_nothing() {
    let gw = Gateway::start().await;
    let u1 = Upstream::start("u1").await;
    gw.put(
        "routes/1",
        json!({"uri": "/keep", "upstream": upstream(&[(&u1.node(), 1)])}),
    )
    .await;
    assert_eq!(gw.get("/keep").await.status, 200);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"uri": "/keep", "upstream": upstream(&[(&u1.node(), 1)]), "plugins": {"ip-restriction": {"whitelist": []}}}),
         "failed to check the configuration of plugin ip-restriction err: property \"whitelist\" validation failed: expect array to have at least 1 items"),
        (json!({"uri": "/keep", "upstream": upstream(&[(&u1.node(), 1)]), "plugins": {"nope": {}}}), "unknown plugin [nope]"),
        (json!({"uri": "/keep", "upstream_id": "missing"}), "failed to fetch upstream info by upstream id [missing], response code: 404"),
        (json!({"uri": "/keep", "upstream": upstream(&[(&u1.node(), 1)]), "methods": ["FETCH"]}),
         "invalid configuration: property \"methods\" validation failed: failed to validate item 1: matches none of the enum values"),
        (json!({"uri": "/keep", "upstream": upstream(&[(&u1.node(), 1)]), "host": "a", "hosts": ["b"]}), "only one of host or hosts is allowed"),
    ];
    for (body, msg) in cases {
        let r = gw.admin("PUT", "routes/1", Some(body)).await;
        assert_eq!(r.status, 400);
        assert_eq!(r.json(), json!({"error_msg": msg}));
    }
    let raw = send(
        gw.admin,
        "PUT",
        "/apisix/admin/routes/1",
        &[("x-api-key", KEY.into())],
        "{\"uri\":".into(),
        None,
    )
    .await;
    assert_eq!(raw.status, 400);
    assert!(raw.json()["error_msg"]
        .as_str()
        .unwrap()
        .starts_with("invalid request body"));
    let nested = send(
        gw.admin,
        "PUT",
        "/apisix/admin/routes/1",
        &[("x-api-key", KEY.into())],
        "[".repeat(100_000),
        None,
    )
    .await;
    assert_eq!(nested.status, 400);
    // Over APISIX's 1.5 MiB limit, with a valid JSON shape.
    let huge = format!(
        "{{\"uri\":\"/keep\",\"desc\":\"{}\"}}",
        "d".repeat(1024 * 1024 * 2)
    );
    let oversized = send(
        gw.admin,
        "PUT",
        "/apisix/admin/routes/1",
        &[("x-api-key", KEY.into())],
        huge,
        None,
    )
    .await;
    assert_eq!(oversized.status, 400);
    assert!(
        oversized.json()["error_msg"]
            .as_str()
            .unwrap()
            .contains("is greater than the maximum size 1572864 allowed"),
        "{}",
        oversized.text()
    );
    // Ill-typed fields.
    for body in [
        json!({"uri": 123, "upstream": upstream(&[(&u1.node(), 1)])}),
        json!({"uri": "/keep", "upstream": {"nodes": "nope"}}),
        json!({"uri": "/keep", "upstream": upstream(&[(&u1.node(), 1)]), "priority": "high"}),
    ] {
        let r = gw.admin("PUT", "routes/1", Some(body.clone())).await;
        assert_eq!(r.status, 400, "{body} -> {}", r.text());
        assert!(r.json()["error_msg"].is_string());
    }
    // The route still serves exactly as before.
    let r = gw.get("/keep").await;
    assert_eq!((r.status.as_u16(), r.upstream()), (200, "u1".to_string()));
    assert_eq!(
        gw.admin("GET", "routes/1", None).await.json()["value"]["uri"],
        "/keep"
    );
    gw.stop().await;
}

#[tokio::test]
async fn keys_roles_and_unknown_resources() {
    let gw = Gateway::start().await;
    let no_key = send(
        gw.admin,
        "GET",
        "/apisix/admin/routes",
        &[],
        String::new(),
        None,
    )
    .await;
    assert_eq!(no_key.status, 401);
    assert_eq!(
        no_key.json(),
        json!({"error_msg": "failed to check token", "description": "missing apikey"})
    );
    let wrong = send(
        gw.admin,
        "GET",
        "/apisix/admin/routes",
        &[("x-api-key", "nope".into())],
        String::new(),
        None,
    )
    .await;
    assert_eq!(wrong.json()["description"], "wrong apikey");
    let by_query = send(
        gw.admin,
        "GET",
        &format!("/apisix/admin/routes?api_key={KEY}"),
        &[],
        String::new(),
        None,
    )
    .await;
    assert_eq!(by_query.status, 200);
    let viewer = [("x-api-key", format!("viewer-{KEY}"))];
    assert_eq!(
        send(
            gw.admin,
            "GET",
            "/apisix/admin/routes",
            &viewer,
            String::new(),
            None
        )
        .await
        .status,
        200
    );
    let denied = send(
        gw.admin,
        "PUT",
        "/apisix/admin/routes/1",
        &viewer,
        "{\"uri\":\"/x\",\"plugins\":{}}".into(),
        None,
    )
    .await;
    assert_eq!(denied.status, 401);
    assert_eq!(
        gw.admin("GET", "routes/1", None).await.status,
        404,
        "viewer write had no effect"
    );
    let unknown = gw.admin("GET", "routs", None).await;
    assert_eq!(
        unknown.json(),
        json!({"error_msg": "Unsupported resource type: routs"})
    );
    // The data plane never serves the Admin API.
    assert_eq!(
        send(
            gw.data,
            "GET",
            "/apisix/admin/routes",
            &[("x-api-key", KEY.into())],
            String::new(),
            None
        )
        .await
        .json(),
        json!({"error_msg": "404 Route Not Found"})
    );
    gw.stop().await;
}

#[tokio::test]
async fn allow_admin_limits_peers() {
    if !harness::need_alt_loopback("allow_admin_limits_peers").await {
        return;
    }
    let gw = Gateway::start().await;
    let key = [("x-api-key", KEY.to_string())];
    let outside = send(
        gw.admin,
        "GET",
        "/apisix/admin/routes",
        &key,
        String::new(),
        Some("127.0.1.9".parse().unwrap()),
    )
    .await;
    assert_eq!(outside.status, 403);
    let inside = send(
        gw.admin,
        "GET",
        "/apisix/admin/routes",
        &key,
        String::new(),
        Some("127.0.0.9".parse().unwrap()),
    )
    .await;
    assert_eq!(inside.status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn references_between_objects() {
    let gw = Gateway::start().await;
    let u1 = Upstream::start("u1").await;
    gw.put("upstreams/up", upstream(&[(&u1.node(), 1)])).await;
    gw.put("services/svc", json!({"upstream_id": "up"})).await;
    gw.put("routes/r", json!({"uri": "/s", "service_id": "svc"}))
        .await;
    assert_eq!(gw.get("/s").await.upstream(), "u1");
    let r = gw.admin("DELETE", "upstreams/up", None).await;
    assert_eq!(
        r.json()["error_msg"],
        "can not delete this upstream, service [svc] is still using it now"
    );
    let r = gw.admin("DELETE", "services/svc", None).await;
    assert_eq!(
        r.json()["error_msg"],
        "can not delete this service directly, route [r] is still using it now"
    );
    assert_eq!(
        gw.admin("DELETE", "services/svc?force=true", None)
            .await
            .status,
        200
    );
    gw.stop().await;
}

/// The Admin API lives on its own listener only: on the data plane,
/// `/apisix/admin/...` is an ordinary path (404 without a route; with a
/// catch-all route it goes to the upstream), even with the admin key.
#[tokio::test]
async fn data_plane_never_serves_the_admin_api() {
    let gw = Gateway::start().await;
    let key = [("x-api-key", KEY.to_string())];
    let r = send(
        gw.data,
        "GET",
        "/apisix/admin/routes",
        &key,
        String::new(),
        None,
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json(), json!({"error_msg": "404 Route Not Found"}));
    let u1 = Upstream::start("u1").await;
    gw.put(
        "routes/all",
        json!({"uri": "/*", "upstream": upstream(&[(&u1.node(), 1)])}),
    )
    .await;
    let r = send(
        gw.data,
        "PUT",
        "/apisix/admin/routes/evil",
        &key,
        json!({"uri": "/evil"}).to_string(),
        None,
    )
    .await;
    assert_eq!((r.status.as_u16(), r.upstream()), (200, "u1".to_string()));
    assert_eq!(
        gw.admin("GET", "routes/evil", None).await.status,
        404,
        "nothing was written"
    );
    gw.stop().await;
}

/// `deployment.admin.admin_key_required: false` lets keyless requests in
/// (APISIX's switch for trusted networks); `allow_admin` still applies.
#[tokio::test]
async fn admin_key_required_false_opens_the_api_to_allowed_peers() {
    let keyless = |gw: &Gateway| {
        let admin = gw.admin;
        async move {
            send(
                admin,
                "GET",
                "/apisix/admin/routes",
                &[],
                String::new(),
                None,
            )
            .await
            .status
        }
    };
    let gw = Gateway::start().await;
    assert_eq!(keyless(&gw).await, 401);
    gw.stop().await;
    let gw = Gateway::start_with("    admin_key_required: false\n").await;
    assert_eq!(keyless(&gw).await, 200);
    gw.stop().await;
    let gw = Gateway::start_with(
        "    admin_key_required: false\n    allow_admin:\n      - 10.0.0.0/8\n",
    )
    .await;
    assert_eq!(keyless(&gw).await, 403, "loopback is not in allow_admin");
    gw.stop().await;
}
