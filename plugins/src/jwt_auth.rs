//! `jwt-auth`: identify the consumer by a signed JSON Web Token.
//!
//! Mirrors APISIX 3.18's plugin of the same name (priority 2510, `rewrite`
//! phase, an auth plugin).
//!
//! On a route (every field optional):
//!
//! ```json
//! {"header": "authorization", "query": "jwt", "cookie": "jwt",
//!  "hide_credentials": false, "key_claim_name": "key", "store_in_ctx": false,
//!  "realm": "jwt", "anonymous_consumer": "guest", "claims_to_verify": ["exp"]}
//! ```
//!
//! On a consumer or credential:
//!
//! ```json
//! {"key": "user-key", "secret": "my-secret", "algorithm": "HS256",
//!  "base64_secret": false, "lifetime_grace_period": 0, "exp": 86400}
//! ```
//!
//! (`public_key` instead of `secret` for the RS, PS, ES and EdDSA
//! algorithms.) The token is looked for in the `header` (a `Bearer ` or
//! `bearer ` prefix is dropped), then the `query` argument, then the
//! `cookie`. Its `key_claim_name` claim names the consumer (by its `key`);
//! the token's `alg` must be the consumer's `algorithm`, its signature must
//! verify with the consumer's secret or public key, and its `nbf`/`exp`
//! claims, when present (or, with `claims_to_verify`, required), must hold
//! within the consumer's `lifetime_grace_period`. Every refusal is a 401
//! `{"message": ...}` with `WWW-Authenticate: Bearer realm="<realm>"`,
//! unless `anonymous_consumer` names a consumer to fall back on.
//!
//! Consumer secrets and public keys are compiled once per snapshot into a
//! verification key ([`JwtCredential`]); a request costs two small base64 +
//! JSON decodes, one hash-map probe and one signature check. Secrets, keys
//! and tokens never reach a log line or `Debug` output.

use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::alphabet;
use base64::engine::{DecodePaddingMode, Engine, GeneralPurpose, GeneralPurposeConfig};
use http::header::{COOKIE, WWW_AUTHENTICATE};
use http::{request, HeaderName, HeaderValue, StatusCode, Uri};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::consumer::{self, Credential};
use crate::ctx::Ctx;
use crate::plugin::{
    CompileCx, CredentialKey, Flow, Phases, Plugin, PluginKind, PluginSpec, SchemaType,
};
use crate::registry::cached;
use crate::schema::Schema;
use crate::vars::{cookie, percent_decode};

pub const NAME: &str = "jwt-auth";
pub const PRIORITY: i32 = 2510;

pub const MSG_MISSING_TOKEN: &str = "Missing JWT token in request";
pub const MSG_INVALID_TOKEN: &str = "JWT token invalid";
pub const MSG_MISSING_KEY: &str = "missing user key in JWT token";
pub const MSG_INVALID_KEY: &str = "Invalid user key in JWT token";
pub const MSG_VERIFY_FAILED: &str = "failed to verify jwt";
/// The answer when `anonymous_consumer` names no consumer.
pub const MSG_NO_ANONYMOUS: &str = "Invalid user authorization";

/// `algorithm` values APISIX accepts, in its order.
pub const ALGORITHMS: &[&str] = &[
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256",
    "PS384", "PS512", "EdDSA",
];
const HS_ALGORITHMS: &[&str] = &["HS256", "HS384", "HS512"];
const KEY_ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA",
];
const DEFAULT_ALGORITHM: &str = "HS256";

/// Printable ASCII without `"` and `\` (APISIX's realm pattern, whose
/// source spells the bounds as `\x20-\x21`, `\x23-\x5B`, `\x5D-\x7E`).
const REALM_PATTERN: &str = "^[ -!#-[\\]-~]+$";

fn realm_ok(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\')
}

// ---------------------------------------------------------------------------
// Schemas

fn build_schema() -> Schema {
    Schema::object()
        .prop("header", Schema::string().done())
        .prop("query", Schema::string().done())
        .prop("cookie", Schema::string().done())
        .prop("hide_credentials", Schema::Boolean)
        .prop("key_claim_name", Schema::string().min(1).done())
        .prop("store_in_ctx", Schema::Boolean)
        .prop(
            "realm",
            Schema::string()
                .min(1)
                .max(128)
                .pattern(REALM_PATTERN, realm_ok)
                .done(),
        )
        .prop("anonymous_consumer", Schema::string().min(1).done())
        .prop(
            "claims_to_verify",
            Schema::array(Schema::string().enumerated(&["exp", "nbf"]).done())
                .unique()
                .done(),
        )
        .done()
}

/// The route-side schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

/// The consumer schema's own properties (APISIX keeps `public_key` only in
/// the `dependencies` on `algorithm`).
fn build_consumer_properties() -> Schema {
    Schema::object()
        .prop("key", Schema::string().min(1).done())
        .prop("secret", Schema::string().min(1).done())
        .prop("algorithm", Schema::string().enumerated(ALGORITHMS).done())
        .prop("exp", Schema::integer().min(1.0).int())
        .prop("base64_secret", Schema::Boolean)
        .prop("lifetime_grace_period", Schema::integer().min(0.0).int())
        .required(&["key"])
        .done()
}

fn consumer_properties() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_consumer_properties)
}

/// `dependencies.algorithm`: an HS algorithm, or another one with a
/// `public_key`.
fn build_algorithm_dependency() -> Schema {
    Schema::OneOf(vec![
        Schema::object()
            .prop(
                "algorithm",
                Schema::string().enumerated(HS_ALGORITHMS).done(),
            )
            .done(),
        Schema::object()
            .prop("public_key", Schema::string().min(1).done())
            .prop(
                "algorithm",
                Schema::string().enumerated(KEY_ALGORITHMS).done(),
            )
            .required(&["public_key"])
            .done(),
    ])
}

fn algorithm_dependency() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_algorithm_dependency)
}

fn validate_consumer(conf: &Value) -> Result<(), String> {
    consumer_properties().validate(conf)?;
    if conf.get("algorithm").is_some() {
        algorithm_dependency()
            .validate(conf)
            .map_err(|e| format!("failed to validate dependent schema for \"algorithm\": {e}"))?;
    }
    Ok(())
}

fn consumer_schema_doc() -> Value {
    let mut doc = consumer_properties().to_json();
    if let Some(map) = doc.as_object_mut() {
        map.insert(
            "dependencies".into(),
            json!({"algorithm": {"oneOf": [
                {"properties": {"algorithm": {"enum": HS_ALGORITHMS, "default": DEFAULT_ALGORITHM}}},
                {
                    "properties": {
                        "public_key": {"type": "string", "minLength": 1},
                        "algorithm": {"enum": KEY_ALGORITHMS},
                    },
                    "required": ["public_key"],
                },
            ]}}),
        );
        map.insert("encrypt_fields".into(), json!(["secret"]));
    }
    doc
}

/// The consumer-side schema.
pub fn consumer_schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, || {
        Schema::Custom(validate_consumer, consumer_schema_doc)
    })
}

/// A `$secret://` or `$env://` reference, which APISIX resolves later.
fn is_secret_ref(s: &str) -> bool {
    s.starts_with("$secret://")
        || s.get(..7)
            .is_some_and(|p| p.eq_ignore_ascii_case("$env://"))
}

/// Standard base64, padding optional, as nginx's `ngx_decode_base64`.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Base64url, padding optional, for the token's parts.
const LENIENT_BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Consumer-side schema plus APISIX's checks after it.
pub fn check_consumer(conf: &Value) -> Result<(), String> {
    validate_consumer(conf)?;
    let algorithm = conf
        .get("algorithm")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_ALGORITHM);
    let secret = conf.get("secret").and_then(Value::as_str);
    let is_hs = algorithm.starts_with("HS");
    if is_hs && secret.is_none() {
        return Err("property \"secret\" is required when using HS based algorithms".into());
    }
    let base64_secret = conf
        .get("base64_secret")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if let Some(secret) = secret.filter(|s| base64_secret && !is_secret_ref(s)) {
        if LENIENT_BASE64.decode(secret).is_err() {
            return Err("base64_secret required but the secret is not in base64 format".into());
        }
    }
    if !is_hs && conf.get("public_key").is_none() {
        return Err("missing valid public key".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Consumer side, compiled

fn default_algorithm() -> String {
    DEFAULT_ALGORITHM.to_string()
}

/// The consumer-side configuration. No `Debug`: it holds the secret.
#[derive(Deserialize)]
struct ConsumerConf {
    key: String,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default = "default_algorithm")]
    algorithm: String,
    #[serde(default)]
    public_key: Option<String>,
    #[serde(default)]
    base64_secret: bool,
    #[serde(default)]
    lifetime_grace_period: f64,
}

/// A consumer's jwt-auth configuration compiled for verification.
pub struct JwtCredential {
    /// The `alg` a token must carry (`HS256`, `EdDSA`, ...).
    algorithm: Box<str>,
    /// The verification key; `None` when the secret or public key cannot
    /// be used (APISIX then answers "failed to verify jwt" at request time).
    verifier: Option<(Algorithm, DecodingKey)>,
    /// Seconds of leeway for `exp` and `nbf`.
    grace: f64,
}

impl std::fmt::Debug for JwtCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtCredential")
            .field("algorithm", &self.algorithm)
            .field("usable", &self.verifier.is_some())
            .field("lifetime_grace_period", &self.grace)
            .finish_non_exhaustive()
    }
}

impl JwtCredential {
    /// The algorithm this consumer's tokens must be signed with.
    pub fn algorithm(&self) -> &str {
        &self.algorithm
    }
}

fn jwt_algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

/// The verification key for `conf`, or why there is none (the reason never
/// holds key material).
fn decoding_key(conf: &ConsumerConf, alg: Algorithm) -> Result<DecodingKey, &'static str> {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            let secret = conf.secret.as_deref().ok_or("no secret")?;
            if conf.base64_secret {
                let bytes = LENIENT_BASE64
                    .decode(secret)
                    .map_err(|_| "secret is not base64")?;
                Ok(DecodingKey::from_secret(&bytes))
            } else {
                Ok(DecodingKey::from_secret(secret.as_bytes()))
            }
        }
        _ => {
            let pem = conf
                .public_key
                .as_deref()
                .ok_or("no public key")?
                .as_bytes();
            let key = match alg {
                Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem),
                Algorithm::EdDSA => DecodingKey::from_ed_pem(pem),
                _ => DecodingKey::from_rsa_pem(pem),
            };
            key.map_err(|_| "public key is not a PEM public key of that type")
        }
    }
}

/// Compiles a consumer-side configuration into its lookup key and
/// [`JwtCredential`]. A key that cannot be used does not fail this (APISIX
/// accepts it and refuses the tokens).
pub fn compile_credential(conf: &Value) -> Result<CredentialKey, String> {
    // Errors are described without values: the configuration holds secrets.
    let conf = ConsumerConf::deserialize(conf)
        .map_err(|_| "invalid jwt-auth consumer configuration".to_string())?;
    let verifier = match jwt_algorithm(&conf.algorithm) {
        None => {
            tracing::warn!(
                key = %conf.key,
                algorithm = %conf.algorithm,
                "jwt-auth algorithm not supported; tokens for this consumer will be refused"
            );
            None
        }
        Some(alg) => match decoding_key(&conf, alg) {
            Ok(key) => Some((alg, key)),
            Err(why) => {
                tracing::warn!(
                    key = %conf.key,
                    algorithm = %conf.algorithm,
                    "jwt-auth {why}; tokens for this consumer will be refused"
                );
                None
            }
        },
    };
    let credential = JwtCredential {
        algorithm: conf.algorithm.into_boxed_str(),
        verifier,
        grace: conf.lifetime_grace_period,
    };
    Ok(CredentialKey {
        key: conf.key,
        data: Arc::new(credential),
    })
}

// ---------------------------------------------------------------------------
// Route side, compiled

fn default_header() -> String {
    "authorization".into()
}
fn default_jwt() -> String {
    "jwt".into()
}
fn default_key_claim_name() -> String {
    "key".into()
}

/// The route-side configuration, with APISIX's names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct JwtAuthConf {
    #[serde(default = "default_header")]
    pub header: String,
    #[serde(default = "default_jwt")]
    pub query: String,
    #[serde(default = "default_jwt")]
    pub cookie: String,
    #[serde(default)]
    pub hide_credentials: bool,
    #[serde(default = "default_key_claim_name")]
    pub key_claim_name: String,
    #[serde(default)]
    pub store_in_ctx: bool,
    #[serde(default = "default_jwt")]
    pub realm: String,
    #[serde(default)]
    pub anonymous_consumer: Option<String>,
    #[serde(default)]
    pub claims_to_verify: Option<Vec<String>>,
}

/// A registered claim checked on verified tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    Nbf,
    Exp,
}

impl Claim {
    fn name(self) -> &'static str {
        match self {
            Claim::Nbf => "nbf",
            Claim::Exp => "exp",
        }
    }
}

/// The verified token's claims, in [`Ctx::data`] when `store_in_ctx` is set
/// (APISIX's `ctx.jwt_auth_payload`).
#[derive(Debug, Clone)]
pub struct JwtAuthPayload(pub Arc<Map<String, Value>>);

/// The compiled route-side plugin.
#[derive(Debug)]
pub struct JwtAuth {
    /// `None` when `header` is no valid header name: never found.
    header: Option<HeaderName>,
    query: String,
    cookie: String,
    hide_credentials: bool,
    key_claim_name: String,
    store_in_ctx: bool,
    anonymous_consumer: Option<String>,
    /// Checked when present, or, when `required`, required.
    claims: Vec<Claim>,
    required: bool,
    www_authenticate: HeaderValue,
}

/// `header` as the request header it names: case-insensitive, `_` for `-`
/// (as nginx's header table looks names up).
fn header_name(name: &str) -> Option<HeaderName> {
    let normal: String = name
        .chars()
        .map(|c| {
            if c == '_' {
                '-'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect();
    HeaderName::from_bytes(normal.as_bytes()).ok()
}

/// Compiles a checked route-side configuration.
pub fn compile(conf: &Value) -> Result<JwtAuth, String> {
    let conf = JwtAuthConf::deserialize(conf).map_err(|e| e.to_string())?;
    let www_authenticate = HeaderValue::from_str(&format!("Bearer realm=\"{}\"", conf.realm))
        .map_err(|e| e.to_string())?;
    let listed = conf.claims_to_verify.unwrap_or_default();
    let mut claims = Vec::new();
    for name in &listed {
        let claim = match name.as_str() {
            "nbf" => Claim::Nbf,
            "exp" => Claim::Exp,
            other => return Err(format!("unknown claim {other}")),
        };
        if !claims.contains(&claim) {
            claims.push(claim);
        }
    }
    // Listed claims are required; none listed: nbf and exp when present.
    let required = !claims.is_empty();
    if !required {
        claims = vec![Claim::Nbf, Claim::Exp];
    }
    Ok(JwtAuth {
        header: header_name(&conf.header),
        query: conf.query,
        cookie: conf.cookie,
        hide_credentials: conf.hide_credentials,
        key_claim_name: conf.key_claim_name,
        store_in_ctx: conf.store_in_ctx,
        anonymous_consumer: conf.anonymous_consumer,
        claims,
        required,
        www_authenticate,
    })
}

/// Whether a raw query key names `name` (compared decoded when escaped).
fn arg_is(key: &str, name: &str) -> bool {
    key == name || ((key.contains('%') || key.contains('+')) && percent_decode(key) == name)
}

/// The first value of query argument `name`, percent-decoded.
fn query_token(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        arg_is(k, name).then(|| percent_decode(v))
    })
}

/// `uri` without any query argument `name`; the others keep their order
/// and spelling.
fn without_query_arg(uri: &Uri, name: &str) -> Option<Uri> {
    let pq = uri.path_and_query()?;
    let query = pq.query()?;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !arg_is(pair.split_once('=').map_or(*pair, |(k, _)| k), name))
        .collect();
    let rebuilt = if kept.is_empty() {
        pq.path().to_string()
    } else {
        format!("{}?{}", pq.path(), kept.join("&"))
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(rebuilt.parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// Removes cookie `name` from the `Cookie` headers (all of them, as HTTP/2
/// may split cookies over several); the rest are joined into one header.
fn remove_cookie(headers: &mut http::HeaderMap, name: &str) {
    let kept: Vec<String> = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|kv| !kv.is_empty() && kv.split_once('=').map_or(*kv, |(k, _)| k) != name)
        .map(str::to_string)
        .collect();
    headers.remove(COOKIE);
    if kept.is_empty() {
        return;
    }
    if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
        headers.insert(COOKIE, v);
    }
}

/// A token split into its parts, header and claims decoded.
struct Token<'a> {
    /// `header.payload`, the signed bytes.
    signed: &'a str,
    signature: &'a str,
    alg: Option<String>,
    payload: Map<String, Value>,
}

/// Decodes one base64url JSON object part of a token.
fn decode_part(part: &str) -> Result<Map<String, Value>, &'static str> {
    let bytes = LENIENT_BASE64URL
        .decode(part)
        .map_err(|_| "part is not base64url")?;
    serde_json::from_slice(&bytes).map_err(|_| "part is not a JSON object")
}

fn parse_token(token: &str) -> Result<Token<'_>, &'static str> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("invalid jwt string");
    };
    let mut header = decode_part(h).map_err(|_| "invalid header")?;
    let payload = decode_part(p).map_err(|_| "invalid payload")?;
    let alg = match header.remove("alg") {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    Ok(Token {
        signed: &token[..h.len() + 1 + p.len()],
        signature: s,
        alg,
        payload,
    })
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs() as f64)
}

impl JwtAuth {
    /// The token from the header, query argument or cookie (in that order),
    /// removed from the request when `hide_credentials` is set. `Some("")`
    /// for a place that has the name but no usable value.
    fn fetch_token(&self, req: &mut request::Parts) -> Option<String> {
        if let Some(name) = &self.header {
            if let Some(value) = req.headers.get(name) {
                // A value that is not visible ASCII is no JWT.
                let raw = value.to_str().unwrap_or_default();
                let token = raw
                    .strip_prefix("Bearer ")
                    .or_else(|| raw.strip_prefix("bearer "))
                    .unwrap_or(raw)
                    .to_string();
                if self.hide_credentials {
                    req.headers.remove(name);
                }
                return Some(token);
            }
        }
        if let Some(token) = req.uri.query().and_then(|q| query_token(q, &self.query)) {
            if self.hide_credentials {
                if let Some(uri) = without_query_arg(&req.uri, &self.query) {
                    req.uri = uri;
                }
            }
            return Some(token);
        }
        let token = cookie(&req.headers, &self.cookie)?.to_string();
        if self.hide_credentials {
            remove_cookie(&mut req.headers, &self.cookie);
        }
        Some(token)
    }

    /// Checks `nbf`/`exp`; the error says why (no secrets in it).
    fn verify_claims(&self, payload: &Map<String, Value>, grace: f64) -> Result<(), String> {
        let now = now_secs();
        for &claim in &self.claims {
            let Some(value) = payload.get(claim.name()) else {
                if self.required {
                    return Err(format!("claim {} is missing", claim.name()));
                }
                continue;
            };
            let Some(t) = value.as_f64() else {
                return Err(format!("claim {} is not a number", claim.name()));
            };
            match claim {
                Claim::Nbf if t >= now + grace => {
                    return Err(format!("'nbf' claim not valid until {t}"));
                }
                Claim::Exp if t <= now - grace => {
                    return Err(format!("'exp' claim expired at {t}"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Finds and verifies the consumer; the error is the message to answer.
    fn authenticate(
        &self,
        ctx: &mut Ctx,
        req: &mut request::Parts,
    ) -> Result<Arc<Credential>, &'static str> {
        let Some(raw) = self.fetch_token(req) else {
            return Err(MSG_MISSING_TOKEN);
        };
        let token = parse_token(&raw).map_err(|why| {
            tracing::warn!("JWT token invalid: {why}");
            MSG_INVALID_TOKEN
        })?;
        let user_key = match token.payload.get(&self.key_claim_name) {
            None | Some(Value::Bool(false)) => return Err(MSG_MISSING_KEY),
            Some(Value::String(s)) => Some(s.as_str()),
            // A number, object or null finds no consumer.
            Some(_) => None,
        };
        let Some(credential) = user_key.and_then(|k| ctx.consumers.find(NAME, k)).cloned() else {
            tracing::warn!("failed to find consumer: invalid user key");
            return Err(MSG_INVALID_KEY);
        };
        let Some(conf) = credential.data::<JwtCredential>() else {
            return Err(MSG_VERIFY_FAILED);
        };
        if token.alg.as_deref() != Some(&*conf.algorithm) {
            tracing::warn!(
                "failed to verify jwt: algorithm mismatch, expected {}",
                conf.algorithm
            );
            return Err(MSG_VERIFY_FAILED);
        }
        let Some((alg, key)) = &conf.verifier else {
            tracing::error!("failed to verify jwt: the consumer's key cannot be used");
            return Err(MSG_VERIFY_FAILED);
        };
        let verified =
            jsonwebtoken::crypto::verify(token.signature, token.signed.as_bytes(), key, *alg)
                .unwrap_or(false);
        if !verified {
            tracing::warn!("failed to verify jwt: signature mismatch");
            return Err(MSG_VERIFY_FAILED);
        }
        if let Err(why) = self.verify_claims(&token.payload, conf.grace) {
            tracing::error!("failed to verify jwt: {why}");
            return Err(MSG_VERIFY_FAILED);
        }
        if self.store_in_ctx {
            ctx.data.insert(JwtAuthPayload(Arc::new(token.payload)));
        }
        Ok(credential)
    }

    fn reject(&self, message: &str) -> Flow {
        let mut resp =
            crate::json_response(StatusCode::UNAUTHORIZED, &json!({ "message": message }));
        resp.headers_mut()
            .insert(WWW_AUTHENTICATE, self.www_authenticate.clone());
        Flow::Respond(resp)
    }
}

impl Plugin for JwtAuth {
    fn phases(&self) -> Phases {
        Phases::REWRITE
    }

    fn rewrite(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        let message = match self.authenticate(ctx, req) {
            Ok(credential) => {
                consumer::attach(ctx, req, &credential);
                return Flow::Continue;
            }
            Err(message) => message,
        };
        let Some(name) = &self.anonymous_consumer else {
            return self.reject(message);
        };
        let Some(anonymous) = ctx.consumers.consumer(name).cloned() else {
            tracing::error!(
                "jwt-auth failed to authenticate the request, code: 401. error: failed to get anonymous consumer {name}"
            );
            return self.reject(MSG_NO_ANONYMOUS);
        };
        let credential = Arc::new(Credential {
            consumer: anonymous,
            id: None,
            data: Arc::new(()),
        });
        consumer::attach(ctx, req, &credential);
        Flow::Continue
    }
}

/// The registry entry.
pub struct JwtAuthSpec;

impl PluginSpec for JwtAuthSpec {
    fn encrypt_fields(&self) -> &'static [&'static str] {
        &["secret"]
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn priority(&self) -> i32 {
        PRIORITY
    }

    fn kind(&self) -> PluginKind {
        PluginKind::Auth
    }

    fn schema(&self) -> &'static Schema {
        schema()
    }

    fn consumer_schema(&self) -> Option<&'static Schema> {
        Some(consumer_schema())
    }

    fn check(&self, conf: &Value, target: SchemaType) -> Result<(), String> {
        match target {
            SchemaType::Consumer => check_consumer(conf),
            SchemaType::Route => schema().validate(conf),
            SchemaType::Metadata => Ok(()),
        }
    }

    fn compile(&self, conf: &Value, _cx: &CompileCx<'_>) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(compile(conf)?))
    }

    fn compile_credential(&self, conf: &Value) -> Result<Option<CredentialKey>, String> {
        compile_credential(conf).map(Some)
    }
}

#[cfg(test)]
mod tests;
