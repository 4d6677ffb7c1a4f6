use serde_json::{json, Value};

use crate::model::{SslConf, SslType};
use crate::resource::Kind;
use crate::testcerts::{self, Pem};
use crate::validate::{check, Lookup};

struct Nothing;

impl Lookup for Nothing {
    fn exists(&self, _: Kind, _: &str) -> bool {
        false
    }
}

/// A valid server ssl object for `test.com`, with `extra` merged in
/// (`null` removes a field).
fn ssl_with(pem: &Pem, extra: Value) -> Value {
    let mut conf = json!({"id": "1", "sni": "test.com", "cert": pem.cert, "key": pem.key});
    if let (Value::Object(c), Value::Object(e)) = (&mut conf, extra) {
        for (k, v) in e {
            if v.is_null() {
                c.remove(&k);
            } else {
                c.insert(k, v);
            }
        }
    }
    conf
}

fn ssl(extra: Value) -> Value {
    ssl_with(&testcerts::ecdsa("test.com"), extra)
}

fn verdict(conf: &Value) -> Result<(), String> {
    check(Kind::Ssls, conf, &Nothing)
}

fn refused(conf: Value, msg: &str) {
    assert_eq!(verdict(&conf), Err(msg.to_string()), "{conf}");
}

fn refused_property(extra: Value, detail: &str) {
    refused(
        ssl(extra.clone()),
        &format!("invalid configuration: property {detail}"),
    );
}

#[test]
fn valid_ecdsa_and_rsa_objects_pass_and_parse() {
    for pem in [testcerts::ecdsa("test.com"), testcerts::rsa("test.com")] {
        let conf = ssl_with(&pem, json!({}));
        verdict(&conf).unwrap();
        let typed: SslConf = serde_json::from_value(conf).unwrap();
        assert_eq!(typed.kind, SslType::Server);
        assert_eq!(typed.names(), vec!["test.com"]);
        assert_eq!(typed.status, 1);
    }
    verdict(&ssl(
        json!({"sni": null, "snis": ["a.com", "*.b.com", "*"]}),
    ))
    .unwrap();
    verdict(&ssl(json!({
        "type": "server", "status": 0, "desc": "d", "labels": {"env": "prod"},
        "ssl_protocols": ["TLSv1.2", "TLSv1.3"],
    })))
    .unwrap();
    // An RSA key as `RSA PRIVATE KEY`.
    let rsa = testcerts::rsa("test.com");
    verdict(&ssl_with(&rsa, json!({"key": testcerts::RSA2048_PKCS1}))).unwrap();
    // An EC key as `EC PRIVATE KEY`.
    let sec1 = testcerts::sec1("test.com");
    verdict(&ssl_with(&sec1, json!({}))).unwrap();
}

#[test]
fn a_chain_and_extra_pairs_pass() {
    let (leaf, ca) = testcerts::chain("test.com");
    let rsa = testcerts::rsa("test.com");
    let ecdsa = testcerts::ecdsa("test.com");
    let conf = ssl_with(
        &leaf,
        json!({
            "certs": [rsa.cert, ecdsa.cert],
            "keys": [rsa.key, ecdsa.key],
            "client": {"ca": ca, "depth": 2, "skip_mtls_uri_regex": ["^/health$", "/public/.*"]},
        }),
    );
    verdict(&conf).unwrap();
    let typed: SslConf = serde_json::from_value(conf).unwrap();
    assert_eq!(typed.pairs().count(), 3);
    let client = typed.client.unwrap();
    assert_eq!(client.depth, 2);
    assert_eq!(client.skip_mtls_uri_regex.map(|v| v.len()), Some(2));
}

#[test]
fn missing_names_or_certificates_fail_the_then_clause() {
    let then = "invalid configuration: then clause did not match";
    refused(ssl(json!({"sni": null})), then);
    refused(ssl(json!({"snis": ["a.com"]})), then);
    refused(ssl(json!({"cert": null})), then);
    refused(ssl(json!({"key": null})), then);
    refused(json!({"id": "1", "sni": "foo.com"}), then);
    refused(ssl(json!({"type": "server", "sni": null})), then);
    // APISIX's "mismatched certs and keys" test: no cert nor key at all.
    let ecc = testcerts::ecdsa("test.com");
    refused(
        json!({"sni": "test.com", "certs": [ecc.cert], "keys": []}),
        then,
    );
}

#[test]
fn client_objects_need_only_cert_and_key() {
    let pem = testcerts::ecdsa("client");
    let conf = json!({"type": "client", "cert": pem.cert, "key": pem.key});
    verdict(&conf).unwrap();
    let typed: SslConf = serde_json::from_value(conf).unwrap();
    assert_eq!((typed.kind, typed.names().len()), (SslType::Client, 0));
    refused(
        json!({"type": "client", "cert": pem.cert}),
        "invalid configuration: else clause did not match",
    );
    // As in APISIX, nothing after `cert`/`key` is looked at for a client object.
    verdict(&json!({
        "type": "client", "cert": pem.cert, "key": pem.key,
        "certs": ["c".repeat(128)], "keys": [],
    }))
    .unwrap();
}

#[test]
fn schema_messages_match_apisix() {
    refused_property(
        json!({"cert": "short"}),
        "\"cert\" validation failed: string too short, expected at least 128, got 5",
    );
    refused_property(
        json!({"key": "k"}),
        "\"key\" validation failed: string too short, expected at least 64, got 1",
    );
    refused_property(
        json!({"cert": "c".repeat(65537)}),
        "\"cert\" validation failed: string too long, expected at most 65536, got 65537",
    );
    refused_property(
        json!({"certs": ["$ENV://APISIX_TEST_SSL_CERTS"], "keys": ["k".repeat(64)]}),
        "\"certs\" validation failed: failed to validate item 1: string too short, expected at least 128, got 28",
    );
    refused_property(
        json!({"sni": "a b"}),
        "\"sni\" validation failed: failed to match pattern \"^\\\\*$|^\\\\*?[0-9a-zA-Z-._\\\\[\\\\]:]+$\" with \"a b\"",
    );
    refused_property(
        json!({"sni": null, "snis": []}),
        "\"snis\" validation failed: expect array to have at least 1 items",
    );
    refused_property(
        json!({"sni": null, "snis": ["a.com", "**"]}),
        "\"snis\" validation failed: failed to validate item 2: failed to match pattern \"^\\\\*$|^\\\\*?[0-9a-zA-Z-._\\\\[\\\\]:]+$\" with \"**\"",
    );
    refused_property(
        json!({"type": "other"}),
        "\"type\" validation failed: matches none of the enum values",
    );
    refused_property(
        json!({"status": 2}),
        "\"status\" validation failed: matches none of the enum values",
    );
    refused_property(
        json!({"ssl_protocols": ["TLSv1.0"]}),
        "\"ssl_protocols\" validation failed: failed to validate item 1: matches none of the enum values",
    );
    refused_property(
        json!({"ssl_protocols": [1]}),
        "\"ssl_protocols\" validation failed: failed to validate item 1: matches none of the enum values",
    );
    refused_property(
        json!({"ssl_protocols": ["TLSv1.2", "TLSv1.2"]}),
        "\"ssl_protocols\" validation failed: expected unique items but items 1 and 2 are equal",
    );
    refused_property(
        json!({"ssl_protocols": ["TLSv1.1", "TLSv1.2", "TLSv1.3", "TLSv1.3"]}),
        "\"ssl_protocols\" validation failed: expect array to have at most 3 items",
    );
    refused_property(
        json!({"client": {"depth": 1}}),
        "\"client\" validation failed: property \"ca\" is required",
    );
    refused_property(
        json!({"client": {"ca": "c".repeat(128), "depth": -1}}),
        "\"client\" validation failed: property \"depth\" validation failed: expected -1 to be at least 0",
    );
    refused_property(
        json!({"client": {"ca": "c".repeat(128), "skip_mtls_uri_regex": []}}),
        "\"client\" validation failed: property \"skip_mtls_uri_regex\" validation failed: expect array to have at least 1 items",
    );
    refused_property(
        json!({"client": {"ca": "c".repeat(128), "skip_mtls_uri_regex": ["/a", "/a"]}}),
        "\"client\" validation failed: property \"skip_mtls_uri_regex\" validation failed: expected unique items but items 1 and 2 are equal",
    );
    refused(
        ssl(json!({"name": "n"})),
        "invalid configuration: additional properties forbidden, found name",
    );
}

#[test]
fn certificates_and_keys_that_do_not_parse() {
    let pem = testcerts::ecdsa("test.com");
    let junk_cert = "c".repeat(128);
    let junk_key = "-".repeat(64);
    refused(
        ssl(json!({"cert": junk_cert})),
        "failed to parse cert: PEM_read_bio_X509_AUX() failed",
    );
    refused(
        ssl(json!({"key": junk_key})),
        "failed to parse key: PEM_read_bio_PrivateKey() failed",
    );
    refused(
        ssl(json!({"key": "k".repeat(64)})),
        "failed to decrypt previous encrypted key",
    );
    refused(
        ssl(json!({"key": testcerts::ecdsa("test.com").key})),
        "failed to parse key: the key does not match the certificate",
    );
    refused(
        ssl(json!({"certs": [pem.cert]})),
        "mismatched number of certs and keys",
    );
    refused(
        ssl(json!({"keys": [pem.key]})),
        "mismatched number of certs and keys",
    );
    refused(
        ssl(json!({"certs": [junk_cert], "keys": [pem.key]})),
        "failed to handle cert-key pair[1]: failed to parse cert: PEM_read_bio_X509_AUX() failed",
    );
    refused(
        ssl(json!({"certs": [pem.cert], "keys": [junk_key]})),
        "failed to handle cert-key pair[1]: failed to parse key: PEM_read_bio_PrivateKey() failed",
    );
    let rsa = testcerts::rsa("test.com");
    refused(
        ssl(json!({"certs": [rsa.cert, pem.cert], "keys": [rsa.key, rsa.key]})),
        "failed to handle cert-key pair[2]: failed to parse key: the key does not match the certificate",
    );
    let e = verdict(&ssl(json!({"key": testcerts::RSA1024_PKCS8}))).unwrap_err();
    assert!(e.starts_with("failed to parse key: unsupported key"), "{e}");
}

#[test]
fn client_ca_and_skip_regexes_are_checked() {
    let (_, ca) = testcerts::chain("x");
    refused(
        ssl(json!({"client": {"ca": "c".repeat(128)}})),
        "failed to validate client_cert: failed to parse cert: PEM_read_bio_X509_AUX() failed",
    );
    refused(
        ssl(json!({"client": {"ca": ca, "skip_mtls_uri_regex": ["/ok", "/a("]}})),
        "invalid configuration: failed to compile skip_mtls_uri_regex \"/a(\": unclosed group",
    );
    verdict(&ssl(
        json!({"client": {"ca": ca, "skip_mtls_uri_regex": ["^/a\\.b$"]}}),
    ))
    .unwrap();
    let big = "(a{1000}){1000}";
    let e = verdict(&ssl(
        json!({"client": {"ca": ca, "skip_mtls_uri_regex": [big]}}),
    ))
    .unwrap_err();
    assert!(
        e.starts_with(&format!(
            "invalid configuration: failed to compile skip_mtls_uri_regex \"{big}\": "
        )) && !e.contains('\n'),
        "{e}"
    );
}

#[test]
fn the_typed_model_must_hold_what_passes() {
    let (_, ca) = testcerts::chain("x");
    let e = verdict(&ssl(json!({"client": {"ca": ca, "depth": 1e10}}))).unwrap_err();
    assert!(e.starts_with("invalid configuration: "), "{e}");
}

#[test]
fn schema_prints_as_apisix_writes_it() {
    let doc = super::schema().to_json();
    assert_eq!(doc["additionalProperties"], false);
    assert_eq!(doc["properties"]["cert"]["minLength"], 128);
    assert_eq!(doc["properties"]["key"]["minLength"], 64);
    assert_eq!(doc["properties"]["client"]["required"], json!(["ca"]));
    assert_eq!(
        doc["properties"]["ssl_protocols"]["items"]["enum"],
        json!(["TLSv1.1", "TLSv1.2", "TLSv1.3"])
    );
    assert_eq!(doc["if"]["properties"]["type"]["enum"], json!(["server"]));
    assert_eq!(
        doc["then"]["oneOf"],
        json!([{"required": ["sni", "key", "cert"]}, {"required": ["snis", "key", "cert"]}])
    );
    assert_eq!(doc["else"]["required"], json!(["key", "cert"]));
}

#[test]
fn skip_regexes_compile_into_the_set_the_data_plane_matches() {
    let set = super::skip_mtls_uri_regex_set(&["^/health$", "/public/"]).unwrap();
    assert!(set.is_match("/health") && set.is_match("/a/public/b"));
    assert!(!set.is_match("/healthz") && !set.is_match("/private"));
    assert_eq!(
        super::skip_mtls_uri_regex_set(&["/ok", "[z-a]"]).unwrap_err(),
        "failed to compile skip_mtls_uri_regex \"[z-a]\": invalid character class range, the start must be <= the end"
    );
    // Each entry within its own limit, the set over its limit.
    // Unicode `\w` compiles big: 20 in a row come near 1 MiB.
    let many: Vec<String> = (0..16).map(|i| format!("\\w{{20}}{i}")).collect();
    for p in &many {
        super::compile_skip_mtls_uri_regex(p).unwrap();
    }
    let e = super::skip_mtls_uri_regex_set(&many).unwrap_err();
    assert!(
        e.starts_with("failed to compile skip_mtls_uri_regex: "),
        "{e}"
    );
}
