use super::*;
use crate::consumer::ConsumerIndex;
use crate::registry::PluginError;
use crate::testing::{self, send};
use serde_json::json;

const PREFIX: &str = "failed to check the configuration of plugin ip-restriction err: ";

fn compile_plugin(name: &str, conf: &Value) -> Result<crate::PluginSet, PluginError> {
    testing::compile(&json!({ name: conf }))
}

fn check_err(conf: Value) -> String {
    match compile_plugin(NAME, &conf) {
        Err(PluginError::Invalid { reason, .. }) => reason,
        other => panic!("expected an invalid configuration, got {other:?}"),
    }
}

#[test]
fn schema_errors_use_apisix_wording() {
    assert_eq!(
        check_err(json!({"whitelist": ["127.0.0.1"], "blacklist": ["10.0.0.1"]})),
        "value should match only one schema, but matches both schemas 1 and 2"
    );
    assert_eq!(
        check_err(json!({"message": "x"})),
        "value should match only one schema, but matches none"
    );
    assert!(check_err(json!({"blacklist": []})).contains("expect array to have at least 1 items"));
    assert!(check_err(json!({"whitelist": ["10.255.256.0/24"]}))
        .contains("failed to validate item 1: object matches none of the required"));
    assert!(check_err(json!({"whitelist": ["1.1.1.1", "::ffgg"]}))
        .contains("failed to validate item 2"));
    assert!(check_err(json!({"whitelist": ["::1/129"]}))
        .contains("object matches none of the required"));
    assert!(check_err(json!({"whitelist": ["1.1.1.1"], "message": ""}))
        .contains("string too short, expected at least 1, got 0"));
    assert!(
        check_err(json!({"whitelist": ["1.1.1.1"], "message": "m".repeat(1025)}))
            .contains("string too long, expected at most 1024, got 1025")
    );
    assert_eq!(
        check_err(json!({"whitelist": ["1.1.1.1"], "response_code": 409})),
        "property \"response_code\" validation failed: expected 409 to be at most 404"
    );
    let full = compile_plugin(NAME, &json!({"whitelist": []}))
        .unwrap_err()
        .to_string();
    assert!(full.starts_with(PREFIX), "{full}");
}

#[test]
fn accepts_all_address_forms() {
    let conf = json!({"whitelist": ["10.0.0.1", "10.0.0.0/8", "::1", "fe80::/10"], "response_code": 404, "message": "no"});
    assert!(check(&conf).is_ok());
}

fn ip(s: &str) -> Option<ClientIp> {
    Some(ClientIp(s.parse().unwrap()))
}

#[test]
fn whitelist_and_blacklist_decisions() {
    let allow = compile(&json!({"whitelist": ["127.0.0.0/30"]})).unwrap();
    assert!(!allow.blocks(ip("127.0.0.3")));
    assert!(allow.blocks(ip("127.0.0.5")));
    assert!(
        allow.blocks(None),
        "unknown address fails closed on a whitelist"
    );

    let deny = compile(&json!({"blacklist": ["127.0.0.2", "::1"]})).unwrap();
    assert!(deny.blocks(ip("127.0.0.2")));
    assert!(deny.blocks(ip("::1")));
    assert!(!deny.blocks(ip("127.0.0.1")));
    assert!(!deny.blocks(None));
}

async fn call(set: crate::PluginSet, client: &str) -> (StatusCode, String) {
    let chain = testing::chain(Vec::new(), set, ConsumerIndex::default());
    let answer = send(chain, testing::request(client, "/", &[])).await;
    let body = if answer.status == StatusCode::OK {
        "upstream".to_string()
    } else {
        answer.body
    };
    (answer.status, body)
}

#[tokio::test]
async fn blocks_before_the_upstream() {
    let set = compile_plugin(
        NAME,
        &json!({"blacklist": ["10.0.0.0/8"], "message": "Go away"}),
    )
    .unwrap();
    assert_eq!(
        call(set.clone(), "10.1.2.3").await,
        (
            StatusCode::FORBIDDEN,
            "{\"message\":\"Go away\"}\n".to_string()
        )
    );
    assert_eq!(
        call(set, "192.0.2.1").await,
        (StatusCode::OK, "upstream".to_string())
    );
}

#[tokio::test]
async fn custom_response_code_and_default_message() {
    let set = compile_plugin(NAME, &json!({"whitelist": ["::1"], "response_code": 404})).unwrap();
    assert_eq!(
        call(set, "127.0.0.1").await,
        (
            StatusCode::NOT_FOUND,
            "{\"message\":\"Your IP address is not allowed\"}\n".to_string()
        )
    );
}
