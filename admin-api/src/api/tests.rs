use super::*;
use crate::auth::{AdminKey, Role};
use crate::store::MemoryStore;
use http_body_util::BodyExt;
use plugins::cidr::IpSet;
use tower::ServiceExt;

const KEY: &str = "k3y";

fn app() -> Router {
    let auth = AuthPolicy {
        keys: vec![AdminKey {
            name: "admin".into(),
            key: KEY.into(),
            role: Role::Admin,
        }],
        key_required: true,
        allow: Some(IpSet::from_entries(&["127.0.0.0/24"]).unwrap()),
    };
    router(Arc::new(AdminState::new(
        Arc::new(MemoryStore::new()),
        auth,
        HeaderValue::from_static("ferrogate/test"),
    )))
}

async fn call(
    app: &Router,
    method: &str,
    path: &str,
    body: &str,
    key: Option<&str>,
) -> (StatusCode, http::HeaderMap, Value) {
    let mut req = http::Request::builder().method(method).uri(path);
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    let mut req = req.body(Body::from(body.to_string())).unwrap();
    req.extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 5555))));
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        bytes.ends_with(b"\n") || bytes.is_empty(),
        "body ends with newline: {bytes:?}"
    );
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, value)
}

#[tokio::test]
async fn crud_round_trip_with_headers() {
    let app = app();
    let body = r#"{"uri":"/hello","upstream":{"type":"roundrobin","nodes":{"127.0.0.1:1980":1}}}"#;
    let (st, h, v) = call(&app, "PUT", "/apisix/admin/routes/1", body, Some(KEY)).await;
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(h["x-api-version"], "v3");
    assert_eq!(h["server"], "ferrogate/test");
    assert_eq!(v["key"], "/apisix/routes/1");
    let (st, _, v) = call(&app, "GET", "/apisix/admin/routes/1", "", Some(KEY)).await;
    assert_eq!(st, StatusCode::OK);
    assert!(v["createdIndex"].is_u64());
    let (_, _, v) = call(&app, "GET", "/apisix/admin/routes", "", Some(KEY)).await;
    assert_eq!(v["total"], 1);
    let (st, _, _) = call(
        &app,
        "PATCH",
        "/apisix/admin/routes/1/methods",
        r#"["GET"]"#,
        Some(KEY),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _, v) = call(&app, "DELETE", "/apisix/admin/routes/1", "", Some(KEY)).await;
    assert_eq!(
        (st, v),
        (
            StatusCode::OK,
            json!({"deleted": "1", "key": "/apisix/routes/1"})
        )
    );
    let (st, _, v) = call(&app, "GET", "/apisix/admin/routes/1", "", Some(KEY)).await;
    assert_eq!(
        (st, v),
        (StatusCode::NOT_FOUND, json!({"message": "Key not found"}))
    );
}

#[tokio::test]
async fn malformed_and_oversized_bodies() {
    let app = app();
    let (st, _, v) = call(
        &app,
        "PUT",
        "/apisix/admin/routes/1",
        r#"{"uri": "/x", "#,
        Some(KEY),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(v["error_msg"]
        .as_str()
        .unwrap()
        .starts_with("invalid request body"));
    let (_, _, v) = call(&app, "PUT", "/apisix/admin/routes/1", "", Some(KEY)).await;
    assert_eq!(v["error_msg"], "missing configurations");
    let deep = "[".repeat(10_000);
    let (st, _, _) = call(&app, "PUT", "/apisix/admin/routes/1", &deep, Some(KEY)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let huge = format!("{{\"desc\":\"{}\"}}", "x".repeat(MAX_BODY_BYTES));
    let (st, _, v) = call(&app, "PUT", "/apisix/admin/routes/1", &huge, Some(KEY)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(v["error_msg"]
        .as_str()
        .unwrap()
        .contains("greater than the maximum size 1572864"));
    let (_, _, v) = call(&app, "GET", "/apisix/admin/routes", "", Some(KEY)).await;
    assert_eq!(v, json!({"list": [], "total": 0}));
}

#[tokio::test]
async fn auth_and_unknown_resources() {
    let app = app();
    let (st, _, v) = call(&app, "GET", "/apisix/admin/routes", "", None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(
        v,
        json!({"error_msg": "failed to check token", "description": "missing apikey"})
    );
    let (st, _, v) = call(&app, "GET", "/apisix/admin/routs", "", Some(KEY)).await;
    assert_eq!(
        (st, v),
        (
            StatusCode::NOT_FOUND,
            json!({"error_msg": "Unsupported resource type: routs"})
        )
    );
    let (st, _, v) = call(&app, "GET", "/apisix/admin/plugins/list", "", Some(KEY)).await;
    assert_eq!(st, StatusCode::OK);
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    // Sorted by priority, highest first, as APISIX lists them.
    assert_eq!(names[..3], ["real-ip", "request-id", "opentelemetry"]);
    let key_auth = names.iter().position(|n| *n == "key-auth").unwrap();
    let basic_auth = names.iter().position(|n| *n == "basic-auth").unwrap();
    assert!(basic_auth < key_auth, "{names:?}");
    let (st, _, v) = call(
        &app,
        "GET",
        "/apisix/admin/schema/plugins/ip-restriction",
        "",
        Some(KEY),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["priority"], 3000);
    let (st, _, _) = call(&app, "HEAD", "/apisix/admin", "", None).await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test]
async fn ssl_schema_is_served() {
    let app = app();
    let (st, _, v) = call(&app, "GET", "/apisix/admin/schema/ssl", "", Some(KEY)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["properties"]["cert"]["minLength"], 128);
    assert_eq!(v["else"]["required"], serde_json::json!(["key", "cert"]));
}
