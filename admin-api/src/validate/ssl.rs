//! `ssls` objects: APISIX's schema (`_M.ssl` of `schema_def.lua`) and the
//! checks `check_ssl_conf` runs after it (`apisix/ssl.lua`), with APISIX's
//! messages.
//!
//! Where ferrogate is stricter than APISIX, deliberately, so that nothing is
//! stored that the data plane cannot serve: every certificate must be one
//! rustls can use and every key one `ring` can sign with (see
//! [`crate::pem`]); a key must belong to its certificate (APISIX leaves a
//! TODO there); each `client.skip_mtls_uri_regex` must compile. Secret
//! references (`$env://`, `$secret://`) in `cert`/`key` are not resolved
//! by ferrogate, so they are refused as certificates and keys.

use std::sync::OnceLock;

use serde_json::{json, Value};

use plugins::schema::Schema;

use super::{id_schema, is_host, labels_schema, MAX_NAME_LEN};
use crate::model::SslConf;
use crate::pem;

/// The certificate and key readers, also here for the data plane's
/// convenience (see [`crate::pem`]).
pub use crate::pem::{certified_key, parse_ca_certs, parse_cert_chain, parse_private_key};

/// Shortest and longest PEM certificate APISIX takes (`certificate_scheme`).
const CERT_LEN: (usize, usize) = (128, 64 * 1024);
/// Shortest and longest PEM private key APISIX takes (`private_key_schema`).
const KEY_LEN: (usize, usize) = (64, 64 * 1024);
/// APISIX's `host_def_pat`: `*` alone, or a name with an optional leading `*`.
const SNI_PATTERN: &str = "^\\*$|^\\*?[0-9a-zA-Z-._\\[\\]:]+$";
/// The values `ssl_protocols` may list.
const PROTOCOLS: &[&str] = &["TLSv1.1", "TLSv1.2", "TLSv1.3"];
/// Compiled-size cap of one `skip_mtls_uri_regex` entry, in bytes (they
/// come from clients).
pub const SKIP_MTLS_REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Compiled-size cap of all the entries of one ssl object together, in
/// bytes (the `regex` crate's default).
pub const SKIP_MTLS_REGEX_SET_SIZE_LIMIT: usize = 10 << 20;

/// A PEM certificate, as APISIX's schema takes it.
pub(super) fn cert_schema() -> Schema {
    Schema::string().min(CERT_LEN.0).max(CERT_LEN.1).done()
}

/// A PEM private key, as APISIX's schema takes it.
pub(super) fn key_schema() -> Schema {
    Schema::string().min(KEY_LEN.0).max(KEY_LEN.1).done()
}

fn is_sni(s: &str) -> bool {
    s == "*" || is_host(s)
}

fn sni_schema() -> Schema {
    Schema::string().pattern(SNI_PATTERN, is_sni).done()
}

/// `{"enum": [...]}` without a `type`, as APISIX writes `ssl_protocols`
/// items: a number is "matches none of the enum values" too.
fn protocol_schema() -> Schema {
    Schema::Custom(
        |v| match v.as_str() {
            Some(s) if PROTOCOLS.contains(&s) => Ok(()),
            _ => Err("matches none of the enum values".to_string()),
        },
        || json!({ "enum": PROTOCOLS }),
    )
}

/// `{"enum": ["server"]}`, the `if` of the schema.
fn server_type_schema() -> Schema {
    Schema::Custom(
        |v| match v.as_str() {
            Some("server") => Ok(()),
            _ => Err("matches none of the enum values".to_string()),
        },
        || json!({ "enum": ["server"] }),
    )
}

fn client_schema() -> Schema {
    Schema::object()
        .prop("ca", cert_schema())
        .prop("depth", Schema::integer().min(0.0).int())
        .prop(
            "skip_mtls_uri_regex",
            Schema::array(Schema::string().done())
                .min(1)
                .unique()
                .done(),
        )
        .required(&["ca"])
        .done()
}

fn build_ssl_schema() -> Schema {
    Schema::object()
        .prop("id", id_schema())
        .prop("desc", Schema::string().max(MAX_NAME_LEN).done())
        .prop("labels", labels_schema())
        .prop("create_time", Schema::integer().int())
        .prop("update_time", Schema::integer().int())
        .prop(
            "type",
            Schema::string().enumerated(&["server", "client"]).done(),
        )
        .prop("cert", cert_schema())
        .prop("key", key_schema())
        .prop("sni", sni_schema())
        .prop("snis", Schema::array(sni_schema()).min(1).done())
        .prop("certs", Schema::array(cert_schema()).done())
        .prop("keys", Schema::array(key_schema()).done())
        .prop("client", client_schema())
        .prop("status", Schema::integer().enumerated(&[1, 0]).int())
        .prop(
            "ssl_protocols",
            Schema::array(protocol_schema()).max(3).unique().done(),
        )
        .no_additional()
        // `type` absent is `server`: the `if` holds for a missing property.
        .if_then_else(
            Schema::object().prop("type", server_type_schema()).done(),
            Some(
                Schema::object()
                    .one_of_required(&[&["sni", "key", "cert"], &["snis", "key", "cert"]])
                    .done(),
            ),
            Some(Schema::object().required(&["key", "cert"]).done()),
        )
        .done()
}

/// The schema of an ssl object.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    CELL.get_or_init(build_ssl_schema)
}

/// Compiles one `client.skip_mtls_uri_regex` entry as the data plane runs
/// it: unanchored, against the request path, at most
/// [`SKIP_MTLS_REGEX_SIZE_LIMIT`] bytes compiled. (APISIX runs them with
/// PCRE; look-around and back-references are not supported here.)
///
/// `Err` is `failed to compile skip_mtls_uri_regex "<pattern>": <reason>`.
pub fn compile_skip_mtls_uri_regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(pattern)
        .size_limit(SKIP_MTLS_REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| {
            format!(
                "failed to compile skip_mtls_uri_regex \"{pattern}\": {}",
                short_reason(&e)
            )
        })
}

/// Compiles all of `client.skip_mtls_uri_regex` into one set, as the data
/// plane matches them: each entry as [`compile_skip_mtls_uri_regex`], then
/// the set within [`SKIP_MTLS_REGEX_SET_SIZE_LIMIT`]. Validation runs this
/// same function, so a stored object always compiles.
///
/// `Err` names the entry that fails, or is `failed to compile
/// skip_mtls_uri_regex: <reason>` for the set.
pub fn skip_mtls_uri_regex_set<S: AsRef<str>>(patterns: &[S]) -> Result<regex::RegexSet, String> {
    for pattern in patterns {
        compile_skip_mtls_uri_regex(pattern.as_ref())?;
    }
    regex::RegexSetBuilder::new(patterns)
        .size_limit(SKIP_MTLS_REGEX_SET_SIZE_LIMIT)
        .build()
        .map_err(|e| {
            format!(
                "failed to compile skip_mtls_uri_regex: {}",
                short_reason(&e)
            )
        })
}

/// The one-line reason of a regex error (syntax errors come with a drawing
/// of the pattern).
fn short_reason(e: &regex::Error) -> String {
    match e {
        regex::Error::Syntax(text) => text
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("error: "))
            .unwrap_or(text)
            .to_string(),
        other => other.to_string(),
    }
}

/// Every string of an array field (the schema has checked the types).
fn texts<'a>(conf: &'a Value, field: &str) -> Vec<&'a str> {
    conf.get(field)
        .and_then(Value::as_array)
        .map(|items| items.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The checks after the schema, in APISIX's order; `Err` is the
/// `error_msg` of a 400. `conf` must already have passed [`schema`].
///
/// - `cert`/`key`: as [`pem::certified_key`] (`failed to parse cert: ...`,
///   `failed to parse key: ...`, `failed to decrypt previous encrypted key`).
/// - `type: client` stops there, as in APISIX.
/// - `certs`/`keys`: `mismatched number of certs and keys`, then each pair
///   as above, prefixed `failed to handle cert-key pair[<i>]: ` (from 1).
/// - `client.ca`: `failed to validate client_cert: failed to parse cert: ...`;
///   `client.skip_mtls_uri_regex`: `invalid configuration: failed to compile
///   skip_mtls_uri_regex "<pattern>": <reason>`.
pub fn check(conf: &Value) -> Result<(), String> {
    check_certificates(conf)?;
    // What passes here is what the data plane reads.
    serde_json::from_value::<SslConf>(conf.clone())
        .map_err(|e| format!("invalid configuration: {e}"))?;
    Ok(())
}

/// APISIX's `check_ssl_conf` after the schema.
fn check_certificates(conf: &Value) -> Result<(), String> {
    let text = |field: &str| conf.get(field).and_then(Value::as_str);
    if let (Some(cert), Some(key)) = (text("cert"), text("key")) {
        pem::certified_key(cert, key)?;
    }
    if text("type") == Some("client") {
        return Ok(());
    }
    let (certs, keys) = (texts(conf, "certs"), texts(conf, "keys"));
    if certs.len() != keys.len() {
        return Err("mismatched number of certs and keys".into());
    }
    for (i, (cert, key)) in certs.iter().zip(&keys).enumerate() {
        pem::certified_key(cert, key)
            .map_err(|e| format!("failed to handle cert-key pair[{}]: {e}", i + 1))?;
    }
    if let Some(client) = conf.get("client") {
        if let Some(ca) = client.get("ca").and_then(Value::as_str) {
            pem::parse_ca_certs(ca).map_err(|e| format!("failed to validate client_cert: {e}"))?;
        }
        skip_mtls_uri_regex_set(&texts(client, "skip_mtls_uri_regex"))
            .map_err(|e| format!("invalid configuration: {e}"))?;
    }
    Ok(())
}

/// A certificate and key an upstream presents (`tls.client_cert`,
/// `tls.client_key`), checked as APISIX's `validate(cert, key)` does.
pub(super) fn check_client_cert(cert: &str, key: &str) -> Result<(), String> {
    pem::certified_key(cert, key).map(|_| ())
}

#[cfg(test)]
mod tests;
