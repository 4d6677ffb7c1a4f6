use super::*;
use crate::consumer::{index_for_tests, Consumer, ConsumerIndex};
use crate::registry::PluginError;
use crate::testing::{self, send, Answer};
use crate::vars::ConnInfo;
use crate::PluginSet;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

// Key pairs made for these tests only (openssl genpkey).
const RSA_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQDIPj6cBq5dE5D4
t9I+r77hocqGeQ1jORjTNxHuLxD8JOlujb/wJBjyGEYr+Ecntj6e7VUvK5yrxzj8
4rh7nT99rO2aB8pgdGU61e7ktQx843nRB3wVz6eh0Yy6XEsyv3gFeWl2GvYGefkt
JEgGltO/pc8OT2b4xtCi2UfdBWyf3dmO25BTdQ9Cc2KbBiMtz9O7ZoEqtjIwyOj2
QApPqcQuMM2VhCDGU3VR4CQKQRg4Olq/cOl+0nrI8iE/13FC5lH6ADeezpg/aLU0
t3yMXfjtiXMpO+CxQdKdQCmfw56Or8mCrRKfvVoX8cok1dDH3uxVMGe1itL/VCOq
cNVA6pS/AgMBAAECggEAFdGadtvPgfrQ0BkPgp8ZuHItpCtqhwZAqzsT7BUaz66h
9NbjNCJqyW5VrxLVhgE4n46SupoQ7zK9BekaWvXOZj5CgYcZyRrFsPyAlFEZ9D3B
F0KuhZ3j0SEJKYFG/Feal1YcZK8ZYalGumF6q6Uhm39QqWmDedYIA8aTKwUdSenr
6mWNeW+KcuflLQipoSiHbmZov6eLJTzQpxL4Cywpbkr1kcpbD9VqcRedXeHCFUrq
8aXif4/3Yry3xmafrM7tMdfW8PJxdMuT+x1ZGSeWcdihOKGO3Fsg0rrJ1tnPpLu5
CT4ghLfMKVv2q/tldSjbCSS6gvgZiHcLakVAHZfoQQKBgQD5L+K6ec8iKSdG+R1y
J120lorC3brc1g494Fhlpl+Qz71a9N0L/w0DrgLHHhpWAl/xY7MzUsp45KTSMTT4
m+6GJrsMMtkfTKd2QOylMwxH/33yokcJXTCUYKA5hFyoUZ0gj5UQN5u+Xougl+Oj
/G4s+QBIkE8T2CXz42hOYE4UYQKBgQDNt8ozM8XWEUpiXZ8tNrF7bDRJLb8dHVtG
9l77O3nbzwD8Xp7y27ExfMlzPSFrGD3ZXgF2KjjfM0Y6Z1jxDfoyr2tttvpMMyOW
r8Y+rzmvuzU6brG/2aRvGsLVsvMmnZobYcE6DOtWNO5sqZZQMaK25lLoahP4x0xy
oAqOcns9HwKBgCUHq67AaTqPWQnf/TM4jGFIucgpgRpOKQGi9B/u8GapqF764lpl
BX8Vfc4vOASuB6nsgfXPiM0cVS3zKAcFzRVcbhFrAP74ui4FieUmx91vJz1GRj4q
/gweq9DATbCpqCrti15ElT1d+WvdBnQZEBpYymT+JPIy/bjXg2maQCAhAoGAU9XW
nU84DKk3OycUO4TSh43tMPVnsSHJlP3Kb3AplR6jNDYLaMWHTLeiEUiUWeSjL/ZT
eihyzONEd4Cuim47zHQYv7mV/3/HvR0dGWanh6ovYwTBg4HatTyesiAfX1lS+F26
NUIWlic0Eyx5iWzw9sCegQDZ6sStrvjx1GNrPdkCgYB2KEkcJAMqAeDpN9+OIXwI
nuQGi9G0OSqWhdVDaYKlZ7AUUlU2ccMbXCCJ7l/VPlDsV8I4svGYb46Hg8Bg9EIx
AjEJQ4CZxenW+EXg0qU5c1Hvz3c5EXmBizZxakx1XytmB99ZeB72MivIExEP8Yl/
7sD44XpXpxc1kV1iMMd98Q==
-----END PRIVATE KEY-----
";

const RSA_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAyD4+nAauXROQ+LfSPq++
4aHKhnkNYzkY0zcR7i8Q/CTpbo2/8CQY8hhGK/hHJ7Y+nu1VLyucq8c4/OK4e50/
faztmgfKYHRlOtXu5LUMfON50Qd8Fc+nodGMulxLMr94BXlpdhr2Bnn5LSRIBpbT
v6XPDk9m+MbQotlH3QVsn93ZjtuQU3UPQnNimwYjLc/Tu2aBKrYyMMjo9kAKT6nE
LjDNlYQgxlN1UeAkCkEYODpav3DpftJ6yPIhP9dxQuZR+gA3ns6YP2i1NLd8jF34
7YlzKTvgsUHSnUApn8Oejq/Jgq0Sn71aF/HKJNXQx97sVTBntYrS/1QjqnDVQOqU
vwIDAQAB
-----END PUBLIC KEY-----
";

const EC256_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgyWw8cYUe8GOuqUb4
pMZZQlne3rLkc5fdml2AorKHLY2hRANCAATdjB0iQCik3QEfmBHlq9KKSKmicxxa
iHLTcXamVtbscB/sab/Gmm6Jq71piLPiezqsm5C5eZ8s6nw/P0hiHbfe
-----END PRIVATE KEY-----
";

const EC256_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE3YwdIkAopN0BH5gR5avSikiponMc
Wohy03F2plbW7HAf7Gm/xppuiau9aYiz4ns6rJuQuXmfLOp8Pz9IYh233g==
-----END PUBLIC KEY-----
";

const EC384_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIG2AgEAMBAGByqGSM49AgEGBSuBBAAiBIGeMIGbAgEBBDDKQw3LBooqMzT9aJkJ
0ZpyUBlUHQUWVptpmpeJzToaEwogPRX/4lvgIKHBphCK3UuhZANiAASM2xV2bjOU
EDRu83lvvyD+Awo1wum+8RGJwAzJ1dWEa2K2hGkggqYhRkKYQUTFRsXzVmqgzi85
qWxr5tx0uX2qvVewNLzc386lzH5cD8hCy1nC8JvbluSsqGcAFHgYjHw=
-----END PRIVATE KEY-----
";

const EC384_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEjNsVdm4zlBA0bvN5b78g/gMKNcLpvvER
icAMydXVhGtitoRpIIKmIUZCmEFExUbF81ZqoM4vOalsa+bcdLl9qr1XsDS83N/O
pcx+XA/IQstZwvCb25bkrKhnABR4GIx8
-----END PUBLIC KEY-----
";

const ED_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIAxciJ5gAzCzvSrloVVtA7eUMyPIXp61sdLt8gEZ0BlN
-----END PRIVATE KEY-----
";

const ED_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAcXOuhiU//P/8YMA4tsH5HYsemQG41NySoreR9Gjr4qs=
-----END PUBLIC KEY-----
";

const SECRET: &str = "my-secret-key";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

fn sign_hs(alg: Algorithm, secret: &str, claims: &Value) -> String {
    sign(alg, &EncodingKey::from_secret(secret.as_bytes()), claims)
}

/// `{"key": "user-key"}` signed HS256 with [`SECRET`].
fn user_token() -> String {
    sign_hs(Algorithm::HS256, SECRET, &json!({"key": "user-key"}))
}

/// A token put together by hand: header and payload JSON, raw signature.
fn raw_token(header: &Value, payload: &Value, signature: &str) -> String {
    let enc = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.{signature}", enc(header), enc(payload))
}

fn jack(conf: Value) -> ConsumerIndex {
    index_for_tests(&[(NAME, "jack", conf)]).unwrap()
}

fn hs256_jack() -> ConsumerIndex {
    jack(json!({"key": "user-key", "secret": SECRET}))
}

fn route(conf: Value) -> PluginSet {
    testing::compile(&json!({ NAME: conf })).unwrap()
}

async fn call(conf: Value, index: ConsumerIndex, uri: &str, headers: &[(&str, &str)]) -> Answer {
    let chain = testing::chain(Vec::new(), route(conf), index);
    send(chain, testing::request("127.0.0.1", uri, headers)).await
}

fn assert_passed(answer: &Answer, consumer: &str) {
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(
        answer.upstream_header("x-consumer-username").as_deref(),
        Some(consumer)
    );
}

fn assert_refused(answer: &Answer, message: &str) {
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.body);
    assert_eq!(answer.json(), json!({ "message": message }));
    assert_eq!(
        answer.headers.get(WWW_AUTHENTICATE).unwrap(),
        "Bearer realm=\"jwt\""
    );
}

fn consumer_err(conf: Value) -> String {
    JwtAuthSpec
        .check(&conf, SchemaType::Consumer)
        .expect_err("the configuration should be refused")
}

fn route_err(conf: Value) -> String {
    match testing::compile(&json!({ NAME: conf })) {
        Err(PluginError::Invalid { reason, .. }) => reason,
        other => panic!("expected an invalid configuration, got {:?}", other.err()),
    }
}

// ---------------------------------------------------------------------------
// Schemas

#[test]
fn spec_is_an_auth_plugin_in_rewrite() {
    let spec = crate::registry::find(NAME).unwrap();
    assert_eq!(spec.priority(), 2510);
    assert_eq!(spec.kind(), PluginKind::Auth);
    assert_eq!(spec.key_attr(), "key");
    assert!(spec.consumer_schema().is_some());
    assert_eq!(compile(&json!({})).unwrap().phases(), Phases::REWRITE);
}

#[test]
fn route_schema_accepts_apisix_fields() {
    for conf in [
        json!({}),
        json!({"header": "x-token", "query": "t", "cookie": "c", "hide_credentials": true,
               "key_claim_name": "iss", "store_in_ctx": true, "realm": "my realm!",
               "anonymous_consumer": "guest", "claims_to_verify": ["exp", "nbf"]}),
        json!({"claims_to_verify": []}),
    ] {
        JwtAuthSpec.check(&conf, SchemaType::Route).unwrap();
    }
}

#[test]
fn route_schema_errors_use_apisix_wording() {
    assert_eq!(
        route_err(json!({"key_claim_name": ""})),
        "property \"key_claim_name\" validation failed: string too short, expected at least 1, got 0"
    );
    assert_eq!(
        route_err(json!({"hide_credentials": "yes"})),
        "property \"hide_credentials\" validation failed: wrong type: expected boolean, got string"
    );
    assert_eq!(
        route_err(json!({"claims_to_verify": ["iat"]})),
        "property \"claims_to_verify\" validation failed: failed to validate item 1: matches none of the enum values"
    );
    assert_eq!(
        route_err(json!({"claims_to_verify": ["exp", "exp"]})),
        "property \"claims_to_verify\" validation failed: expected unique items but items 1 and 2 are equal"
    );
    assert_eq!(
        route_err(json!({"anonymous_consumer": ""})),
        "property \"anonymous_consumer\" validation failed: string too short, expected at least 1, got 0"
    );
    assert!(route_err(json!({"realm": "a\"b"}))
        .starts_with("property \"realm\" validation failed: failed to match pattern"));
    assert!(route_err(json!({"realm": "a".repeat(129)})).contains("expected at most 128"));
    assert!(route_err(json!({"realm": ""})).contains("expected at least 1"));
}

#[test]
fn consumer_schema_errors_use_apisix_wording() {
    assert_eq!(
        consumer_err(json!({"secret": SECRET})),
        "property \"key\" is required"
    );
    assert_eq!(
        consumer_err(json!({"key": ""})),
        "property \"key\" validation failed: string too short, expected at least 1, got 0"
    );
    assert_eq!(
        consumer_err(json!({"key": "k", "secret": SECRET, "algorithm": "none"})),
        "property \"algorithm\" validation failed: matches none of the enum values"
    );
    assert_eq!(
        consumer_err(json!({"key": "k", "secret": SECRET, "exp": 0})),
        "property \"exp\" validation failed: expected 0 to be at least 1"
    );
    assert_eq!(
        consumer_err(json!({"key": "k", "secret": SECRET, "lifetime_grace_period": -1})),
        "property \"lifetime_grace_period\" validation failed: expected -1 to be at least 0"
    );
    // HS without a secret, default algorithm or not.
    let no_secret = "property \"secret\" is required when using HS based algorithms";
    assert_eq!(consumer_err(json!({"key": "k"})), no_secret);
    assert_eq!(
        consumer_err(json!({"key": "k", "algorithm": "HS512"})),
        no_secret
    );
    // Key algorithms without a public key fail the dependent schema.
    let no_public_key = "failed to validate dependent schema for \"algorithm\": value should match only one schema, but matches none";
    for alg in ["RS256", "ES256", "PS384", "EdDSA"] {
        assert_eq!(
            consumer_err(json!({"key": "k", "algorithm": alg})),
            no_public_key,
            "{alg}"
        );
        assert_eq!(
            consumer_err(json!({"key": "k", "algorithm": alg, "public_key": ""})),
            no_public_key,
            "{alg}"
        );
    }
    assert_eq!(
        consumer_err(json!({"key": "k", "secret": "{^c0j4&]2!=J=", "base64_secret": true})),
        "base64_secret required but the secret is not in base64 format"
    );
}

#[test]
fn consumer_schema_accepts_what_apisix_accepts() {
    for conf in [
        json!({"key": "k", "secret": SECRET}),
        json!({"key": "k", "secret": SECRET, "algorithm": "HS384", "exp": 10, "lifetime_grace_period": 5}),
        json!({"key": "k", "secret": "bXktc2VjcmV0LWtleQ==", "base64_secret": true}),
        json!({"key": "k", "secret": "bXktc2VjcmV0LWtleQ", "base64_secret": true}),
        json!({"key": "k", "secret": "$env://JWT_SECRET", "base64_secret": true}),
        // Key validity is not checked (APISIX accepts a private key here).
        json!({"key": "k", "algorithm": "RS256", "public_key": "not a key"}),
        json!({"key": "k", "algorithm": "ES512", "public_key": EC256_PUBLIC}),
        json!({"key": "k", "algorithm": "EdDSA", "public_key": ED_PUBLIC, "private_key": "x"}),
        // A public key beside an HS algorithm is allowed.
        json!({"key": "k", "secret": SECRET, "algorithm": "HS256", "public_key": RSA_PUBLIC}),
    ] {
        JwtAuthSpec
            .check(&conf, SchemaType::Consumer)
            .unwrap_or_else(|e| panic!("{conf}: {e}"));
    }
}

#[test]
fn consumer_schema_prints_its_dependencies() {
    let doc = consumer_schema().to_json();
    assert_eq!(doc["required"], json!(["key"]));
    assert_eq!(doc["properties"]["algorithm"]["enum"], json!(ALGORITHMS));
    assert_eq!(
        doc["dependencies"]["algorithm"]["oneOf"][1]["required"],
        json!(["public_key"])
    );
    assert_eq!(schema().to_json()["properties"]["realm"]["maxLength"], 128);
}

#[test]
fn compiled_credentials_keep_secrets_out_of_debug() {
    let key = compile_credential(&json!({"key": "user-key", "secret": "s3cr3t-value"})).unwrap();
    assert_eq!(key.key, "user-key");
    let cred = key.data.downcast_ref::<JwtCredential>().unwrap();
    assert_eq!(cred.algorithm(), "HS256");
    let shown = format!("{cred:?}");
    assert!(!shown.contains("s3cr3t"), "{shown}");
    let rsa =
        compile_credential(&json!({"key": "k", "algorithm": "RS256", "public_key": RSA_PUBLIC}))
            .unwrap();
    let shown = format!("{:?}", rsa.data.downcast_ref::<JwtCredential>().unwrap());
    assert!(!shown.contains("MIIB"), "{shown}");
    assert!(shown.contains("usable: true"), "{shown}");
}

// ---------------------------------------------------------------------------
// Where the token comes from

#[tokio::test]
async fn token_in_header_with_or_without_bearer() {
    let token = user_token();
    for value in [
        format!("Bearer {token}"),
        format!("bearer {token}"),
        token.clone(),
    ] {
        let answer = call(json!({}), hs256_jack(), "/", &[("authorization", &value)]).await;
        assert_passed(&answer, "jack");
        // Credentials are kept unless hide_credentials is set.
        assert_eq!(
            answer.upstream_header("authorization").as_deref(),
            Some(value.as_str())
        );
    }
    // Only "Bearer " and "bearer " are prefixes.
    let answer = call(
        json!({}),
        hs256_jack(),
        "/",
        &[("authorization", &format!("BEARER {token}"))],
    )
    .await;
    assert_refused(&answer, MSG_INVALID_TOKEN);
}

#[tokio::test]
async fn token_in_query_and_cookie() {
    let token = user_token();
    let answer = call(json!({}), hs256_jack(), &format!("/x?a=1&jwt={token}"), &[]).await;
    assert_passed(&answer, "jack");
    let answer = call(
        json!({}),
        hs256_jack(),
        "/x",
        &[("cookie", &format!("a=b; jwt={token}"))],
    )
    .await;
    assert_passed(&answer, "jack");
}

#[tokio::test]
async fn custom_places() {
    let token = user_token();
    let conf = json!({"header": "X-Auth_Token", "query": "tok", "cookie": "sess"});
    let answer = call(conf.clone(), hs256_jack(), "/", &[("x-auth-token", &token)]).await;
    assert_passed(&answer, "jack");
    let answer = call(conf.clone(), hs256_jack(), &format!("/?tok={token}"), &[]).await;
    assert_passed(&answer, "jack");
    let answer = call(
        conf.clone(),
        hs256_jack(),
        "/",
        &[("cookie", &format!("sess={token}"))],
    )
    .await;
    assert_passed(&answer, "jack");
    // The default places are not looked at any more.
    let answer = call(conf, hs256_jack(), &format!("/?jwt={token}"), &[]).await;
    assert_refused(&answer, MSG_MISSING_TOKEN);
}

#[tokio::test]
async fn header_wins_over_query_and_cookie() {
    let good = user_token();
    let answer = call(
        json!({}),
        hs256_jack(),
        &format!("/?jwt={good}"),
        &[("authorization", "garbage")],
    )
    .await;
    assert_refused(&answer, MSG_INVALID_TOKEN);
    let answer = call(
        json!({}),
        hs256_jack(),
        "/?jwt=garbage",
        &[("cookie", &format!("jwt={good}"))],
    )
    .await;
    assert_refused(&answer, MSG_INVALID_TOKEN);
}

#[tokio::test]
async fn hide_credentials_removes_the_token_where_it_was() {
    let token = user_token();
    let conf = json!({"hide_credentials": true});

    let answer = call(
        conf.clone(),
        hs256_jack(),
        "/",
        &[
            ("authorization", &format!("Bearer {token}")),
            ("x-other", "1"),
        ],
    )
    .await;
    assert_passed(&answer, "jack");
    assert_eq!(answer.upstream_header("authorization"), None);
    assert_eq!(answer.upstream_header("x-other").as_deref(), Some("1"));

    let answer = call(
        conf.clone(),
        hs256_jack(),
        &format!("/p?a=1&jwt={token}&b=x%20y"),
        &[],
    )
    .await;
    assert_passed(&answer, "jack");
    assert_eq!(answer.json()["uri"], "/p?a=1&b=x%20y");

    let answer = call(conf.clone(), hs256_jack(), &format!("/p?jwt={token}"), &[]).await;
    assert_passed(&answer, "jack");
    assert_eq!(answer.json()["uri"], "/p");

    let answer = call(
        conf.clone(),
        hs256_jack(),
        "/",
        &[("cookie", &format!("a=1; jwt={token}; b=2"))],
    )
    .await;
    assert_passed(&answer, "jack");
    assert_eq!(
        answer.upstream_header("cookie").as_deref(),
        Some("a=1; b=2")
    );

    let answer = call(
        conf,
        hs256_jack(),
        "/",
        &[("cookie", &format!("jwt={token}"))],
    )
    .await;
    assert_passed(&answer, "jack");
    assert_eq!(answer.upstream_header("cookie"), None);

    // Without hide_credentials the query stays as it was.
    let answer = call(json!({}), hs256_jack(), &format!("/p?jwt={token}"), &[]).await;
    assert_eq!(answer.json()["uri"], format!("/p?jwt={token}"));
}

// ---------------------------------------------------------------------------
// Refusals

#[tokio::test]
async fn each_refusal_message() {
    let none = call(json!({}), hs256_jack(), "/", &[]).await;
    assert_refused(&none, MSG_MISSING_TOKEN);

    for bad in ["", "abc", "a.b", "a.b.c.d", "!!.!!.!!", "e30.bm90IGpzb24.x"] {
        let answer = call(json!({}), hs256_jack(), "/", &[("authorization", bad)]).await;
        assert_refused(&answer, MSG_INVALID_TOKEN);
    }
    let answer = call(json!({}), hs256_jack(), "/?jwt=", &[]).await;
    assert_refused(&answer, MSG_INVALID_TOKEN);

    let no_key = sign_hs(Algorithm::HS256, SECRET, &json!({"sub": "x"}));
    let answer = call(json!({}), hs256_jack(), "/", &[("authorization", &no_key)]).await;
    assert_refused(&answer, MSG_MISSING_KEY);
    let false_key = sign_hs(Algorithm::HS256, SECRET, &json!({"key": false}));
    let answer = call(
        json!({}),
        hs256_jack(),
        "/",
        &[("authorization", &false_key)],
    )
    .await;
    assert_refused(&answer, MSG_MISSING_KEY);

    for key in [json!("other-key"), json!(123), Value::Null] {
        let token = sign_hs(Algorithm::HS256, SECRET, &json!({ "key": key }));
        let answer = call(json!({}), hs256_jack(), "/", &[("authorization", &token)]).await;
        assert_refused(&answer, MSG_INVALID_KEY);
    }

    let wrong_secret = sign_hs(
        Algorithm::HS256,
        "not-the-secret",
        &json!({"key": "user-key"}),
    );
    let answer = call(
        json!({}),
        hs256_jack(),
        "/",
        &[("authorization", &wrong_secret)],
    )
    .await;
    assert_refused(&answer, MSG_VERIFY_FAILED);

    // A tampered payload no longer matches its signature.
    let good = user_token();
    let mut parts: Vec<&str> = good.split('.').collect();
    let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"key": "user-key", "admin": true}).to_string());
    parts[1] = &forged;
    let answer = call(
        json!({}),
        hs256_jack(),
        "/",
        &[("authorization", &parts.join("."))],
    )
    .await;
    assert_refused(&answer, MSG_VERIFY_FAILED);
}

#[tokio::test]
async fn refusals_carry_the_configured_realm() {
    let answer = call(json!({"realm": "apis"}), hs256_jack(), "/", &[]).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        answer.headers.get(WWW_AUTHENTICATE).unwrap(),
        "Bearer realm=\"apis\""
    );
    assert_eq!(
        answer.headers.get(http::header::CONTENT_TYPE).unwrap(),
        "application/json"
    );
    assert_eq!(
        answer.body,
        "{\"message\":\"Missing JWT token in request\"}\n"
    );
}

#[tokio::test]
async fn algorithm_must_be_the_consumers() {
    // Right secret, wrong algorithm.
    let hs512 = sign_hs(Algorithm::HS512, SECRET, &json!({"key": "user-key"}));
    let answer = call(json!({}), hs256_jack(), "/", &[("authorization", &hs512)]).await;
    assert_refused(&answer, MSG_VERIFY_FAILED);

    // "none" with an empty signature.
    let none = raw_token(
        &json!({"alg": "none", "typ": "JWT"}),
        &json!({"key": "user-key"}),
        "",
    );
    let answer = call(json!({}), hs256_jack(), "/", &[("authorization", &none)]).await;
    assert_refused(&answer, MSG_VERIFY_FAILED);

    // The RS256 consumer's public key used as an HMAC secret (key confusion).
    let index = jack(json!({"key": "user-key", "algorithm": "RS256", "public_key": RSA_PUBLIC}));
    let confused = sign_hs(Algorithm::HS256, RSA_PUBLIC, &json!({"key": "user-key"}));
    let answer = call(json!({}), index, "/", &[("authorization", &confused)]).await;
    assert_refused(&answer, MSG_VERIFY_FAILED);

    // No alg at all.
    let no_alg = raw_token(&json!({"typ": "JWT"}), &json!({"key": "user-key"}), "AAAA");
    let answer = call(json!({}), hs256_jack(), "/", &[("authorization", &no_alg)]).await;
    assert_refused(&answer, MSG_VERIFY_FAILED);
}

// ---------------------------------------------------------------------------
// Algorithms

#[tokio::test]
async fn hmac_algorithms() {
    for (alg, name) in [
        (Algorithm::HS256, "HS256"),
        (Algorithm::HS384, "HS384"),
        (Algorithm::HS512, "HS512"),
    ] {
        let index = jack(json!({"key": "user-key", "secret": SECRET, "algorithm": name}));
        let token = sign_hs(alg, SECRET, &json!({"key": "user-key", "exp": now() + 60}));
        let answer = call(json!({}), index, "/", &[("authorization", &token)]).await;
        assert_passed(&answer, "jack");
    }
}

#[tokio::test]
async fn base64_secret_is_decoded() {
    let raw = b"\x00\x01binary secret\xff";
    let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
    let index = jack(json!({"key": "user-key", "secret": encoded, "base64_secret": true}));
    let token = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(raw),
        &json!({"key": "user-key"}),
    );
    let answer = call(json!({}), index, "/", &[("authorization", &token)]).await;
    assert_passed(&answer, "jack");
    // Signed with the base64 text itself: refused.
    let index = jack(json!({"key": "user-key", "secret": encoded, "base64_secret": true}));
    let token = sign_hs(Algorithm::HS256, &encoded, &json!({"key": "user-key"}));
    let answer = call(json!({}), index, "/", &[("authorization", &token)]).await;
    assert_refused(&answer, MSG_VERIFY_FAILED);
}

#[tokio::test]
async fn key_algorithms() {
    let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
    let ec256 = EncodingKey::from_ec_pem(EC256_PRIVATE.as_bytes()).unwrap();
    let ec384 = EncodingKey::from_ec_pem(EC384_PRIVATE.as_bytes()).unwrap();
    let ed = EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).unwrap();
    let cases = [
        (Algorithm::RS256, "RS256", &rsa, RSA_PUBLIC),
        (Algorithm::RS384, "RS384", &rsa, RSA_PUBLIC),
        (Algorithm::RS512, "RS512", &rsa, RSA_PUBLIC),
        (Algorithm::PS256, "PS256", &rsa, RSA_PUBLIC),
        (Algorithm::PS384, "PS384", &rsa, RSA_PUBLIC),
        (Algorithm::PS512, "PS512", &rsa, RSA_PUBLIC),
        (Algorithm::ES256, "ES256", &ec256, EC256_PUBLIC),
        (Algorithm::ES384, "ES384", &ec384, EC384_PUBLIC),
        (Algorithm::EdDSA, "EdDSA", &ed, ED_PUBLIC),
    ];
    for (alg, name, private, public) in cases {
        let conf = json!({"key": "user-key", "algorithm": name, "public_key": public});
        let token = sign(alg, private, &json!({"key": "user-key", "exp": now() + 60}));
        let answer = call(
            json!({}),
            jack(conf.clone()),
            "/",
            &[("authorization", &token)],
        )
        .await;
        assert_passed(&answer, "jack");
        // Same token, signature bytes changed.
        let (head, sig) = token.rsplit_once('.').unwrap();
        let flipped = if sig.starts_with('A') { "B" } else { "A" };
        let bad = format!("{head}.{flipped}{}", &sig[1..]);
        let answer = call(json!({}), jack(conf), "/", &[("authorization", &bad)]).await;
        assert_refused(&answer, MSG_VERIFY_FAILED);
    }
}

#[tokio::test]
async fn unusable_keys_refuse_tokens() {
    let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
    let token = sign(Algorithm::RS256, &rsa, &json!({"key": "user-key"}));
    // Not a key, a private key, a key of another type.
    for public in ["not a key", RSA_PRIVATE, EC256_PUBLIC] {
        let index = jack(json!({"key": "user-key", "algorithm": "RS256", "public_key": public}));
        let answer = call(json!({}), index, "/", &[("authorization", &token)]).await;
        assert_refused(&answer, MSG_VERIFY_FAILED);
    }
    // ES512 passes the schema but has no verifier here.
    let es512 = raw_token(
        &json!({"alg": "ES512", "typ": "JWT"}),
        &json!({"key": "user-key"}),
        "AAAA",
    );
    let index = jack(json!({"key": "user-key", "algorithm": "ES512", "public_key": EC256_PUBLIC}));
    let answer = call(json!({}), index, "/", &[("authorization", &es512)]).await;
    assert_refused(&answer, MSG_VERIFY_FAILED);
}

/// Tokens from APISIX's own test suite verify here too.
#[tokio::test]
async fn tokens_apisix_signed() {
    let hs512 = "eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9.eyJrZXkiOiJ1c2VyLWtleS1IUzUxMiIsIm5iZiI6MTcyNzI3NDk4M30.emzmjIbFqkRAr55YW5YobdXDxYWiMuUNLPooE5G_bbme1ul19p1dKW7ESrlqvr4BPJRKThm4PnkNC4h9xSJpBQ";
    let index = jack(json!({"key": "user-key-HS512", "algorithm": "HS512", "secret": SECRET}));
    assert_passed(
        &call(json!({}), index, &format!("/hello?jwt={hs512}"), &[]).await,
        "jack",
    );

    let es256 = "eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9.eyJrZXkiOiJ1c2VyLWtleS1lczI1NiIsIm5iZiI6MTcyNzI3NDk4M30.t-CZzJRSxIuVVjU3m8_zDtb7h9x2R2s3BJWmerh0hw-RMIklBqLJ3V9kYAWl7DIyXlp0jQCPDZ_M7mhr1Q3HPw";
    let index = jack(json!({"key": "user-key-es256", "algorithm": "ES256",
        "public_key": "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEEVs/o5+uQbTjL3chynL4wXgUg2R9\nq9UU8I5mEovUf86QZ7kOBIjJwqnzD1omageEHWwHdBO6B+dFabmdT9POxg==\n-----END PUBLIC KEY-----"}));
    assert_passed(
        &call(json!({}), index, &format!("/hello?jwt={es256}"), &[]).await,
        "jack",
    );

    let eddsa = "eyJ4NWMiOlsiLS0tLS1CRUdJTiBQVUJMSUMgS0VZLS0tLS1cbk1Db3dCUVlESzJWd0F5RUE5UGRHVkFMcnJCWDRvWDV0OURLYjVKSFl4N1hSYjBSWFU0MnIwRlZPMnNBPVxuLS0tLS1FTkQgUFVCTElDIEtFWS0tLS0tIl0sInR5cCI6IkpXVCIsImFsZyI6IkVkRFNBIn0.eyJleHAiOjIwODUwNzA2MDQsImtleSI6InVzZXIta2V5In0.FmPpxVDubPukcnW58DICZOYMqvkikn4TuUzIQX68-s9KOBUhOgH1_TZM3gUk5Wv0L86c4joVzU7hqstsJSs0Cw";
    let index = jack(json!({"key": "user-key", "algorithm": "EdDSA",
        "public_key": "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA9PdGVALrrBX4oX5t9DKb5JHYx7XRb0RXU42r0FVO2sA=\n-----END PUBLIC KEY-----"}));
    assert_passed(
        &call(json!({}), index, &format!("/hello?jwt={eddsa}"), &[]).await,
        "jack",
    );

    let ps256 = "eyJhbGciOiJQUzI1NiIsInR5cCI6IkpXVCJ9.eyJ1c2VybmFtZSI6Ind3dy5iZWpzb24uY29tIiwic3ViIjoiZGVtbyIsImtleSI6InVzZXIta2V5MiIsImV4cCI6MjA4OTcyNDA1N30.cKaijeZ4ydKVKCC37UZObPFj_kVsdiScEuGwK_G9JBjg0dcRnL8Xvr6Ofp8kDJz16FO2vy8FHgA_9HVjVpzehNe-AbtYJ88Qopy2pAQHsottGuQe3jgAt-yBI5chf26GzpqTtyymteg-lt-cW6EoP4gVHfXEbzQaOZt0wmdNBX17jISKW70okdxrp7cJKbv4hXQXjhYwKY8h0jYnGb-RhuHXRwWFhp6TZVV57Lfpi1yUDm6GqXM42W7owOOwjUqS8-7KYv1iugQzTo7qcVjPic7X5Wug7N-4t8BRM9jZkUiNrAY2BoxxBMUUru4fd201KY23p4bZDwQFpg6MVck7XA";
    let index = jack(json!({"key": "user-key2", "algorithm": "PS256",
        "public_key": "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAiSpoCgu3GzeExroi2YQ+\nxcQlXqEO8D5/5DgrlGsEb3Y9kEX+lj3ayW/G93nAob1xrtpjzBLf4chDivcmMj1q\nOwggoAOOmC9D/EYzDNKAos/gNcgsxra1X7xdMje+jUYR8nQGLemkidD71XbOrrcy\nLTE886t/lcrauC3dxNl55DkZc22YZWSanmizGfedMIEVtZb08uXbTi+8KyP3d+QL\nKYQ2eSa8AQredrKmM0eREQHr6R+zz6xqgycJ/Pxp+C0UYFbV+LVnHom5u6ck2SNG\nuGI1sBQ3V763BArbGpWlpcetQT5JB8QDhywf1ihNdaJgWhswQJVSMpJ8ZmA8R1Av\nDQIDAQAB\n-----END PUBLIC KEY-----"}));
    assert_passed(
        &call(json!({}), index, "/hello", &[("authorization", ps256)]).await,
        "jack",
    );
}

// ---------------------------------------------------------------------------
// Claims

async fn with_claims(claims: Value, grace: i64, route_conf: Value) -> Answer {
    let index = jack(json!({"key": "user-key", "secret": SECRET, "lifetime_grace_period": grace}));
    let mut payload = json!({"key": "user-key"});
    for (k, v) in claims.as_object().unwrap() {
        payload[k] = v.clone();
    }
    let token = sign_hs(Algorithm::HS256, SECRET, &payload);
    call(route_conf, index, "/", &[("authorization", &token)]).await
}

#[tokio::test]
async fn exp_and_nbf_are_checked_when_present() {
    let t = now();
    assert_passed(&with_claims(json!({}), 0, json!({})).await, "jack");
    assert_passed(
        &with_claims(json!({"exp": t + 100, "nbf": t - 100}), 0, json!({})).await,
        "jack",
    );
    assert_refused(
        &with_claims(json!({"exp": t - 100}), 0, json!({})).await,
        MSG_VERIFY_FAILED,
    );
    assert_refused(
        &with_claims(json!({"nbf": t + 100}), 0, json!({})).await,
        MSG_VERIFY_FAILED,
    );
    // Not numbers.
    assert_refused(
        &with_claims(json!({"exp": "tomorrow"}), 0, json!({})).await,
        MSG_VERIFY_FAILED,
    );
    assert_refused(
        &with_claims(json!({"nbf": null}), 0, json!({})).await,
        MSG_VERIFY_FAILED,
    );
    // Fractional times are numbers too.
    assert_passed(
        &with_claims(json!({"exp": (t + 100) as f64 + 0.5}), 0, json!({})).await,
        "jack",
    );
}

#[tokio::test]
async fn lifetime_grace_period_widens_both_bounds() {
    let t = now();
    assert_passed(
        &with_claims(json!({"exp": t - 100}), 300, json!({})).await,
        "jack",
    );
    assert_passed(
        &with_claims(json!({"nbf": t + 100}), 300, json!({})).await,
        "jack",
    );
    assert_refused(
        &with_claims(json!({"exp": t - 400}), 300, json!({})).await,
        MSG_VERIFY_FAILED,
    );
    assert_refused(
        &with_claims(json!({"nbf": t + 400}), 300, json!({})).await,
        MSG_VERIFY_FAILED,
    );
}

#[tokio::test]
async fn claims_to_verify_makes_claims_required() {
    let t = now();
    let exp_only = json!({"claims_to_verify": ["exp"]});
    assert_refused(
        &with_claims(json!({}), 0, exp_only.clone()).await,
        MSG_VERIFY_FAILED,
    );
    assert_passed(
        &with_claims(json!({"exp": t + 100}), 0, exp_only.clone()).await,
        "jack",
    );
    // Only the listed claims are checked then.
    assert_passed(
        &with_claims(json!({"exp": t + 100, "nbf": t + 1000}), 0, exp_only).await,
        "jack",
    );
    let both = json!({"claims_to_verify": ["exp", "nbf"]});
    assert_refused(
        &with_claims(json!({"exp": t + 100}), 0, both.clone()).await,
        MSG_VERIFY_FAILED,
    );
    assert_passed(
        &with_claims(json!({"exp": t + 100, "nbf": t - 1}), 0, both).await,
        "jack",
    );
    // An empty list still checks the claims that are present.
    assert_refused(
        &with_claims(json!({"exp": t - 100}), 0, json!({"claims_to_verify": []})).await,
        MSG_VERIFY_FAILED,
    );
}

// ---------------------------------------------------------------------------
// Consumers

#[tokio::test]
async fn custom_key_claim_name() {
    let token = sign_hs(
        Algorithm::HS256,
        SECRET,
        &json!({"iss": "user-key", "key": "nobody"}),
    );
    let answer = call(
        json!({"key_claim_name": "iss"}),
        hs256_jack(),
        "/",
        &[("authorization", &token)],
    )
    .await;
    assert_passed(&answer, "jack");
    let token = sign_hs(Algorithm::HS256, SECRET, &json!({"key": "user-key"}));
    let answer = call(
        json!({"key_claim_name": "iss"}),
        hs256_jack(),
        "/",
        &[("authorization", &token)],
    )
    .await;
    assert_refused(&answer, MSG_MISSING_KEY);
}

#[tokio::test]
async fn each_consumer_by_its_key() {
    let index = index_for_tests(&[
        (
            NAME,
            "jack",
            json!({"key": "jack-key", "secret": "jack-secret"}),
        ),
        (
            NAME,
            "rose",
            json!({"key": "rose-key", "secret": "rose-secret", "algorithm": "HS384"}),
        ),
    ])
    .unwrap();
    let chain = testing::chain(Vec::new(), route(json!({})), index);
    let rose = sign_hs(Algorithm::HS384, "rose-secret", &json!({"key": "rose-key"}));
    let answer = send(
        chain.clone(),
        testing::request("127.0.0.1", "/", &[("authorization", &rose)]),
    )
    .await;
    assert_passed(&answer, "rose");
    // Rose's key with Jack's secret.
    let mixed = sign_hs(Algorithm::HS384, "jack-secret", &json!({"key": "rose-key"}));
    let answer = send(
        chain,
        testing::request("127.0.0.1", "/", &[("authorization", &mixed)]),
    )
    .await;
    assert_refused(&answer, MSG_VERIFY_FAILED);
}

#[tokio::test]
async fn forged_consumer_headers_are_replaced() {
    let answer = call(
        json!({}),
        hs256_jack(),
        "/",
        &[
            ("authorization", &user_token()),
            ("x-consumer-username", "admin"),
        ],
    )
    .await;
    assert_passed(&answer, "jack");
}

fn with_guest(mut index: ConsumerIndex) -> ConsumerIndex {
    index.add_consumer(Arc::new(Consumer {
        username: "guest".into(),
        custom_id: None,
        group_id: None,
        plugins: Arc::new(PluginSet::default()),
    }));
    index
}

#[tokio::test]
async fn anonymous_consumer_takes_failed_requests() {
    let conf = json!({"anonymous_consumer": "guest"});
    let answer = call(conf.clone(), with_guest(hs256_jack()), "/", &[]).await;
    assert_passed(&answer, "guest");
    let answer = call(
        conf.clone(),
        with_guest(hs256_jack()),
        "/",
        &[("authorization", "garbage")],
    )
    .await;
    assert_passed(&answer, "guest");
    // A good token still names its consumer.
    let answer = call(
        conf.clone(),
        with_guest(hs256_jack()),
        "/",
        &[("authorization", &user_token())],
    )
    .await;
    assert_passed(&answer, "jack");
    // An anonymous consumer that does not exist.
    let answer = call(conf, hs256_jack(), "/", &[]).await;
    assert_refused(&answer, MSG_NO_ANONYMOUS);
}

// ---------------------------------------------------------------------------
// The plugin on its own

fn parts(uri: &str, headers: &[(&str, &str)]) -> request::Parts {
    let (parts, ()) = testing::request("127.0.0.1", uri, headers).into_parts();
    parts
}

#[test]
fn store_in_ctx_keeps_the_payload() {
    let index = Arc::new(hs256_jack());
    let token = sign_hs(
        Algorithm::HS256,
        SECRET,
        &json!({"key": "user-key", "role": "admin"}),
    );
    for store in [true, false] {
        let plugin = compile(&json!({ "store_in_ctx": store })).unwrap();
        let mut ctx = Ctx::new(
            "127.0.0.1".parse().unwrap(),
            ConnInfo::unknown(),
            index.clone(),
        );
        let mut req = parts("/", &[("authorization", &token)]);
        assert!(matches!(plugin.rewrite(&mut ctx, &mut req), Flow::Continue));
        assert_eq!(ctx.consumer_name(), Some("jack"));
        let payload = ctx.data.get::<JwtAuthPayload>();
        if store {
            assert_eq!(payload.unwrap().0["role"], "admin");
        } else {
            assert!(payload.is_none());
        }
    }
}

#[test]
fn failed_requests_leave_no_consumer() {
    let plugin = compile(&json!({})).unwrap();
    let mut ctx = Ctx::new(
        "127.0.0.1".parse().unwrap(),
        ConnInfo::unknown(),
        Arc::new(hs256_jack()),
    );
    let mut req = parts("/", &[("authorization", "x.y.z")]);
    assert!(matches!(
        plugin.rewrite(&mut ctx, &mut req),
        Flow::Respond(_)
    ));
    assert!(ctx.credential.is_none());
}

#[test]
fn query_and_cookie_helpers() {
    assert_eq!(
        query_token("a=1&jwt=x%2By&jwt=z", "jwt").as_deref(),
        Some("x+y")
    );
    assert_eq!(query_token("a=1&j%77t=v", "jwt").as_deref(), Some("v"));
    assert_eq!(query_token("jwt", "jwt").as_deref(), Some(""));
    assert_eq!(query_token("jwtx=1", "jwt"), None);
    let uri: Uri = "http://h/p?jwt=1&a=2&jwt=3".parse().unwrap();
    assert_eq!(
        without_query_arg(&uri, "jwt").unwrap().to_string(),
        "http://h/p?a=2"
    );

    let mut headers = http::HeaderMap::new();
    headers.append(COOKIE, HeaderValue::from_static("a=1; jwt=t"));
    headers.append(COOKIE, HeaderValue::from_static("b=2;jwt=u"));
    remove_cookie(&mut headers, "jwt");
    assert_eq!(headers.get_all(COOKIE).iter().count(), 1);
    assert_eq!(headers.get(COOKIE).unwrap(), "a=1; b=2");

    assert!(realm_ok("jwt realm #1 [x] ~"));
    assert!(!realm_ok("a\\b"));
    assert!(!realm_ok("tab\there"));
    assert!(!realm_ok("é"));
}
