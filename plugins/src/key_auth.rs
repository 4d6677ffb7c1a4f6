//! `key-auth`: identifies the consumer by an API key sent in a header or a
//! query argument.
//!
//! Mirrors APISIX's plugin of the same name (priority 2500, rewrite phase,
//! type `auth`). Route side:
//!
//! ```json
//! {"header": "apikey", "query": "apikey", "hide_credentials": false,
//!  "realm": "key", "anonymous_consumer": "guest"}
//! ```
//!
//! every field optional (those are the defaults, `anonymous_consumer` has
//! none). Consumer side: `{"key": "..."}`, required.
//!
//! The header is looked up first; only when the request has no such header
//! is the query argument used (a header with a wrong key is not rescued by a
//! right one in the query). No key: 401 `Missing API key in request`; a key
//! no consumer has: 401 `Invalid API key in request`; both with
//! `WWW-Authenticate: apikey realm="<realm>"`. With `anonymous_consumer`
//! set, such a request goes on as that consumer instead (401 `Invalid user
//! authorization` when no consumer has that name). `hide_credentials`
//! removes the key from where it was found before the request is proxied
//! (from both places on the anonymous path).
//!
//! Keys are found with one hash-map probe in the snapshot's consumer index,
//! then compared once more in constant time. Keys are never logged and
//! never show in `Debug` output.

use std::sync::{Arc, OnceLock};

use http::header::WWW_AUTHENTICATE;
use http::uri::PathAndQuery;
use http::{request, HeaderName, HeaderValue, StatusCode, Uri};
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use crate::consumer::{self, Credential};
use crate::ctx::Ctx;
use crate::plugin::{CompileCx, CredentialKey, Flow, Phases, Plugin, PluginKind, PluginSpec};
use crate::registry::cached;
use crate::schema::Schema;
use crate::vars::percent_decode_bytes;

pub const NAME: &str = "key-auth";
pub const PRIORITY: i32 = 2500;

pub const MISSING_KEY: &str = "Missing API key in request";
pub const INVALID_KEY: &str = "Invalid API key in request";
/// The answer when the anonymous consumer a route names does not exist
/// (basic-auth gives it for a wrong user or password too).
pub const INVALID_USER: &str = "Invalid user authorization";

/// The route-side configuration, with APISIX's names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct KeyAuthConf {
    #[serde(default = "default_name")]
    pub header: String,
    #[serde(default = "default_name")]
    pub query: String,
    #[serde(default = "default_realm")]
    pub realm: String,
    #[serde(default)]
    pub hide_credentials: bool,
    #[serde(default)]
    pub anonymous_consumer: Option<String>,
}

fn default_name() -> String {
    "apikey".to_string()
}

fn default_realm() -> String {
    "key".to_string()
}

// ---------------------------------------------------------------------------
// Schema pieces shared with basic-auth.

/// APISIX's `schema_def.get_realm_schema` pattern: printable ASCII without
/// `"` and `\`, so the realm can go in a quoted header parameter as is.
pub(crate) const REALM_PATTERN: &str = "^[ -!#-[\\]-~]+$";

fn realm_chars_ok(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| matches!(b, 0x20..=0x21 | 0x23..=0x5B | 0x5D..=0x7E))
}

/// The realm check (`type string, minLength 1, maxLength 128, pattern`).
pub(crate) fn check_realm(v: &Value) -> Result<(), String> {
    Schema::string()
        .min(1)
        .max(128)
        .pattern(REALM_PATTERN, realm_chars_ok)
        .done()
        .validate(v)
}

pub(crate) fn check_string(v: &Value) -> Result<(), String> {
    Schema::string().done().validate(v)
}

pub(crate) fn check_bool(v: &Value) -> Result<(), String> {
    Schema::Boolean.validate(v)
}

/// `schema_def.anonymous_consumer_schema`.
pub(crate) fn anonymous_consumer_schema() -> Schema {
    Schema::string().min(1).done()
}

pub(crate) fn realm_doc(default: &str) -> Value {
    json!({
        "type": "string",
        "pattern": REALM_PATTERN,
        "default": default,
        "minLength": 1,
        "maxLength": 128,
    })
}

fn build_schema() -> Schema {
    Schema::object()
        .prop(
            "header",
            Schema::Custom(
                check_string,
                || json!({"type": "string", "default": "apikey"}),
            ),
        )
        .prop(
            "query",
            Schema::Custom(
                check_string,
                || json!({"type": "string", "default": "apikey"}),
            ),
        )
        .prop("realm", Schema::Custom(check_realm, || realm_doc("key")))
        .prop(
            "hide_credentials",
            Schema::Custom(check_bool, || json!({"type": "boolean", "default": false})),
        )
        .prop("anonymous_consumer", anonymous_consumer_schema())
        .done()
}

fn build_consumer_schema() -> Schema {
    Schema::object()
        .prop("key", Schema::string().done())
        .required(&["key"])
        .done()
}

/// The route-side schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

/// The consumer-side schema.
pub fn consumer_schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_consumer_schema)
}

// ---------------------------------------------------------------------------
// Helpers shared with basic-auth.

/// `401 {"message": text}` with the plugin's `WWW-Authenticate` header.
pub(crate) fn unauthorized(www_authenticate: &HeaderValue, text: &str) -> Flow {
    let mut resp = crate::json_response(StatusCode::UNAUTHORIZED, &json!({ "message": text }));
    resp.headers_mut()
        .insert(WWW_AUTHENTICATE, www_authenticate.clone());
    Flow::Respond(resp)
}

/// The `WWW-Authenticate` value `<scheme> realm="<realm>"`.
pub(crate) fn www_authenticate(scheme: &str, realm: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(&format!("{scheme} realm=\"{realm}\""))
        .map_err(|_| format!("invalid realm: {realm:?}"))
}

/// The anonymous consumer as a credential of its own (no credential id),
/// as APISIX's `get_anonymous_consumer`; `None` when no consumer has that
/// name in this snapshot.
pub(crate) fn anonymous_credential(ctx: &Ctx, name: &str) -> Option<Arc<Credential>> {
    let consumer = ctx.consumers.consumer(name)?.clone();
    Some(Arc::new(Credential {
        consumer,
        id: None,
        data: Arc::new(()),
    }))
}

/// Constant-time comparison of a stored secret with a presented one.
pub(crate) fn secret_eq(stored: &[u8], presented: &[u8]) -> bool {
    bool::from(stored.ct_eq(presented))
}

// ---------------------------------------------------------------------------
// The consumer side.

/// A consumer's key, compiled. Its `Debug` never shows the key.
pub struct KeyAuthCredential {
    key: Box<[u8]>,
}

impl std::fmt::Debug for KeyAuthCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAuthCredential")
            .field("key", &"<redacted>")
            .finish()
    }
}

#[derive(Deserialize)]
struct ConsumerConf {
    key: String,
}

/// Compiles a checked consumer-side configuration.
pub fn compile_credential(conf: &Value) -> Result<CredentialKey, String> {
    let conf = ConsumerConf::deserialize(conf).map_err(|_| {
        // serde's message could quote the value: say what is wrong only.
        "property \"key\" is required".to_string()
    })?;
    let data = KeyAuthCredential {
        key: conf.key.as_bytes().into(),
    };
    Ok(CredentialKey {
        key: conf.key,
        data: Arc::new(data),
    })
}

// ---------------------------------------------------------------------------
// The route side.

/// The compiled route-side configuration.
#[derive(Debug)]
pub struct KeyAuth {
    /// The header the key is read from: the configured name lower-cased,
    /// then (when it has `_`) with `-` for `_`, as nginx's header table
    /// looks names up. Empty when the name is no valid header name.
    headers: Vec<HeaderName>,
    query: String,
    hide_credentials: bool,
    anonymous_consumer: Option<Box<str>>,
    www_authenticate: HeaderValue,
}

/// Where the key was found.
#[derive(Clone, Copy)]
enum Source {
    /// `headers[i]`.
    Header(usize),
    Query,
}

/// Why no consumer was identified.
enum Failure {
    Missing,
    Invalid,
}

/// What the query says about argument `name`.
enum QueryKey {
    Absent,
    /// Exactly one `name=value`, percent-decoded.
    One(Vec<u8>),
    /// `name` without a value, or more than one `name=`: present, but no
    /// key (APISIX sees `true` or a table, which matches no consumer).
    Unusable,
}

/// Compiles a checked route-side configuration.
pub fn compile(conf: &Value) -> Result<KeyAuth, String> {
    let conf = KeyAuthConf::deserialize(conf).map_err(|e| e.to_string())?;
    let lower = conf.header.to_ascii_lowercase();
    let mut headers = Vec::with_capacity(2);
    if let Ok(name) = HeaderName::from_bytes(lower.as_bytes()) {
        headers.push(name);
    }
    if lower.contains('_') {
        if let Ok(name) = HeaderName::from_bytes(lower.replace('_', "-").as_bytes()) {
            headers.push(name);
        }
    }
    Ok(KeyAuth {
        headers,
        query: conf.query,
        hide_credentials: conf.hide_credentials,
        anonymous_consumer: conf.anonymous_consumer.map(String::into_boxed_str),
        www_authenticate: www_authenticate("apikey", &conf.realm)?,
    })
}

impl KeyAuth {
    /// Finds the consumer whose key the request carries.
    fn identify(
        &self,
        ctx: &Ctx,
        req: &request::Parts,
    ) -> Result<(Arc<Credential>, Source), Failure> {
        let header = self
            .headers
            .iter()
            .enumerate()
            .find_map(|(i, name)| req.headers.get(name).map(|v| (i, v)));
        let (credential, source) = match header {
            Some((i, value)) => (
                lookup(ctx, value.as_bytes()).ok_or(Failure::Invalid)?,
                Source::Header(i),
            ),
            None => match query_key(req.uri.query(), &self.query) {
                QueryKey::Absent => return Err(Failure::Missing),
                QueryKey::Unusable => return Err(Failure::Invalid),
                QueryKey::One(key) => (lookup(ctx, &key).ok_or(Failure::Invalid)?, Source::Query),
            },
        };
        Ok((credential, source))
    }

    fn hide(&self, req: &mut request::Parts, source: Source) {
        match source {
            Source::Header(i) => {
                if let Some(name) = self.headers.get(i) {
                    req.headers.remove(name);
                }
            }
            Source::Query => strip_query_arg(&mut req.uri, &self.query),
        }
    }

    /// The anonymous path: credentials are hidden from both places first.
    fn anonymous(&self, ctx: &mut Ctx, req: &mut request::Parts, failure: Failure) -> Flow {
        let Some(name) = self.anonymous_consumer.as_deref() else {
            let text = match failure {
                Failure::Missing => MISSING_KEY,
                Failure::Invalid => INVALID_KEY,
            };
            return unauthorized(&self.www_authenticate, text);
        };
        if self.hide_credentials {
            for header in &self.headers {
                req.headers.remove(header);
            }
            strip_query_arg(&mut req.uri, &self.query);
        }
        match anonymous_credential(ctx, name) {
            Some(credential) => {
                consumer::attach(ctx, req, &credential);
                Flow::Continue
            }
            None => {
                tracing::error!(
                    "key-auth failed to authenticate the request, code: 401. error: \
                     failed to get anonymous consumer {name}"
                );
                unauthorized(&self.www_authenticate, INVALID_USER)
            }
        }
    }
}

/// The credential whose key is `presented`: one hash probe, then a
/// constant-time comparison with the stored key.
fn lookup(ctx: &Ctx, presented: &[u8]) -> Option<Arc<Credential>> {
    let key = std::str::from_utf8(presented).ok()?;
    let credential = ctx.consumers.find(NAME, key)?;
    let stored = credential.data::<KeyAuthCredential>()?;
    if secret_eq(&stored.key, presented) {
        Some(credential.clone())
    } else {
        None
    }
}

impl Plugin for KeyAuth {
    fn phases(&self) -> Phases {
        Phases::REWRITE
    }

    fn rewrite(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        match self.identify(ctx, req) {
            Ok((credential, source)) => {
                if self.hide_credentials {
                    self.hide(req, source);
                }
                consumer::attach(ctx, req, &credential);
                Flow::Continue
            }
            Err(failure) => {
                if matches!(failure, Failure::Invalid) {
                    tracing::warn!("key-auth: failed to find consumer: invalid api key");
                }
                self.anonymous(ctx, req, failure)
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Query strings.

/// Whether a raw (still encoded) argument name is `name`.
fn arg_name_is(raw: &str, name: &str) -> bool {
    if raw.contains(['%', '+']) {
        percent_decode_bytes(raw) == name.as_bytes()
    } else {
        raw == name
    }
}

fn arg_pairs(query: &str) -> impl Iterator<Item = (&str, Option<&str>)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (pair, None),
        })
}

/// Argument `name` of `query`, as nginx's `get_uri_args` sees it.
fn query_key(query: Option<&str>, name: &str) -> QueryKey {
    let Some(query) = query else {
        return QueryKey::Absent;
    };
    let mut found = QueryKey::Absent;
    for (k, v) in arg_pairs(query) {
        if !arg_name_is(k, name) {
            continue;
        }
        found = match (found, v) {
            (QueryKey::Absent, Some(v)) => QueryKey::One(percent_decode_bytes(v)),
            _ => return QueryKey::Unusable,
        };
    }
    found
}

/// Removes every `name` argument from the URI's query (the whole query
/// when nothing else is left); other arguments stay as they were sent.
fn strip_query_arg(uri: &mut Uri, name: &str) {
    let Some(query) = uri.query() else {
        return;
    };
    if !arg_pairs(query).any(|(k, _)| arg_name_is(k, name)) {
        return;
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let key = pair.split_once('=').map_or(*pair, |(k, _)| k);
            !pair.is_empty() && !arg_name_is(key, name)
        })
        .collect();
    let path = uri.path();
    let text = if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    };
    let mut parts = uri.clone().into_parts();
    // Only parts of a valid query were dropped, so this parses; should it
    // not, the path alone goes on (the key must not reach the upstream).
    parts.path_and_query = Some(
        PathAndQuery::try_from(text)
            .or_else(|_| PathAndQuery::try_from(path))
            .unwrap_or_else(|_| PathAndQuery::from_static("/")),
    );
    if let Ok(new) = Uri::from_parts(parts) {
        *uri = new;
    }
}

// ---------------------------------------------------------------------------
// Registry entry.

/// The registry entry.
pub struct KeyAuthSpec;

impl PluginSpec for KeyAuthSpec {
    fn encrypt_fields(&self) -> &'static [&'static str] {
        &["key"]
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

    fn compile(&self, conf: &Value, _cx: &CompileCx<'_>) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(compile(conf)?))
    }

    fn key_attr(&self) -> &'static str {
        "key"
    }

    fn compile_credential(&self, conf: &Value) -> Result<Option<CredentialKey>, String> {
        compile_credential(conf).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::PluginSet;
    use crate::consumer::{index_for_tests, Consumer, ConsumerIndex};
    use crate::plugin::SchemaType;
    use crate::registry::{self, PluginError};
    use crate::testing::{self, Answer};

    fn reason(conf: Value, target: SchemaType) -> String {
        match registry::check(NAME, &conf, target) {
            Err(PluginError::Invalid { reason, .. }) => reason,
            other => panic!("expected an invalid configuration, got {other:?}"),
        }
    }

    fn consumers() -> ConsumerIndex {
        let mut index = index_for_tests(&[
            (NAME, "jack", json!({"key": "jack-key"})),
            (NAME, "rose", json!({"key": "rose key/+"})),
        ])
        .unwrap();
        index.add_consumer(Arc::new(Consumer {
            username: "guest".into(),
            custom_id: None,
            group_id: None,
            plugins: Arc::new(PluginSet::default()),
        }));
        index
    }

    async fn call(route: Value, uri: &str, headers: &[(&str, &str)]) -> Answer {
        let set = testing::compile(&json!({ NAME: route })).unwrap();
        let chain = testing::chain(Vec::new(), set, consumers());
        testing::send(chain, testing::request("127.0.0.1", uri, headers)).await
    }

    fn assert_401(answer: &Answer, message: &str, challenge: &str) {
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.body);
        assert_eq!(answer.json(), json!({ "message": message }));
        assert_eq!(answer.headers[WWW_AUTHENTICATE], challenge);
        assert_eq!(
            answer.headers[http::header::CONTENT_TYPE],
            "application/json"
        );
    }

    #[test]
    fn spec_and_defaults() {
        let spec = registry::find(NAME).unwrap();
        assert_eq!(spec.priority(), 2500);
        assert_eq!(spec.kind(), PluginKind::Auth);
        assert_eq!(spec.key_attr(), "key");
        let conf = KeyAuthConf::deserialize(&json!({})).unwrap();
        assert_eq!(conf.header, "apikey");
        assert_eq!(conf.query, "apikey");
        assert_eq!(conf.realm, "key");
        assert!(!conf.hide_credentials);
        assert!(conf.anonymous_consumer.is_none());
        let doc = schema().to_json();
        assert_eq!(doc["properties"]["header"]["default"], "apikey");
        assert_eq!(doc["properties"]["query"]["default"], "apikey");
        assert_eq!(doc["properties"]["realm"]["default"], "key");
        assert_eq!(doc["properties"]["realm"]["maxLength"], 128);
        assert_eq!(doc["properties"]["hide_credentials"]["default"], false);
        assert_eq!(doc["properties"]["anonymous_consumer"]["minLength"], 1);
        assert_eq!(consumer_schema().to_json()["required"], json!(["key"]));
        assert!(registry::check(NAME, &json!({}), SchemaType::Route).is_ok());
    }

    #[test]
    fn schema_errors_use_apisix_wording() {
        assert_eq!(
            reason(json!({}), SchemaType::Consumer),
            "property \"key\" is required"
        );
        assert_eq!(
            reason(json!({"key": 123}), SchemaType::Consumer),
            "property \"key\" validation failed: wrong type: expected string, got number"
        );
        assert_eq!(
            registry::check(NAME, &json!({}), SchemaType::Consumer)
                .unwrap_err()
                .to_string(),
            "failed to check the configuration of plugin key-auth err: property \"key\" is required"
        );
        assert_eq!(
            reason(json!({"hide_credentials": "yes"}), SchemaType::Route),
            "property \"hide_credentials\" validation failed: wrong type: expected boolean, got string"
        );
        assert_eq!(
            reason(json!({"header": 1}), SchemaType::Route),
            "property \"header\" validation failed: wrong type: expected string, got number"
        );
        assert_eq!(
            reason(json!({"anonymous_consumer": ""}), SchemaType::Route),
            "property \"anonymous_consumer\" validation failed: string too short, expected at least 1, got 0"
        );
        assert_eq!(
            reason(json!({"realm": ""}), SchemaType::Route),
            "property \"realm\" validation failed: string too short, expected at least 1, got 0"
        );
        assert!(reason(json!({"realm": "a\"b"}), SchemaType::Route)
            .starts_with("property \"realm\" validation failed: failed to match pattern"));
        assert!(reason(json!({"realm": "r".repeat(129)}), SchemaType::Route)
            .contains("string too long, expected at most 128, got 129"));
        assert!(
            registry::check(NAME, &json!({"realm": "my realm [1]!"}), SchemaType::Route).is_ok()
        );
    }

    #[test]
    fn keys_stay_out_of_debug_output() {
        let key = compile_credential(&json!({"key": "s3cr3t-key"})).unwrap();
        let data = key.data.downcast_ref::<KeyAuthCredential>().unwrap();
        let shown = format!("{data:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        let err = compile_credential(&json!({"key": 5})).err().unwrap();
        assert!(!err.contains('5'));
    }

    #[tokio::test]
    async fn header_identifies_the_consumer_upstream() {
        let answer = call(
            json!({}),
            "/hello",
            &[("apikey", "jack-key"), ("x-consumer-username", "forged")],
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(
            answer.upstream_header("x-consumer-username").unwrap(),
            "jack"
        );
        assert_eq!(answer.upstream_header("apikey").unwrap(), "jack-key");
        assert!(answer.upstream_header("x-credential-identifier").is_none());
    }

    #[tokio::test]
    async fn query_argument_when_there_is_no_header() {
        let answer = call(json!({}), "/hello?a=1&apikey=rose%20key%2F%2B", &[]).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        assert_eq!(
            answer.upstream_header("x-consumer-username").unwrap(),
            "rose"
        );
        assert_eq!(answer.json()["uri"], "/hello?a=1&apikey=rose%20key%2F%2B");
        // `+` is a space in arguments.
        let answer = call(json!({}), "/hello?apikey=rose+key/%2b", &[]).await;
        assert_eq!(
            answer.upstream_header("x-consumer-username").unwrap(),
            "rose"
        );
    }

    #[tokio::test]
    async fn header_wins_over_query() {
        let answer = call(
            json!({}),
            "/?apikey=rose%20key%2F%2B",
            &[("apikey", "jack-key")],
        )
        .await;
        assert_eq!(
            answer.upstream_header("x-consumer-username").unwrap(),
            "jack"
        );
        // A wrong header key is not rescued by a right query key.
        let answer = call(json!({}), "/?apikey=jack-key", &[("apikey", "nope")]).await;
        assert_401(&answer, INVALID_KEY, "apikey realm=\"key\"");
    }

    #[tokio::test]
    async fn custom_header_query_and_realm() {
        let route = json!({"header": "X-API-KEY", "query": "token", "realm": "gw"});
        let answer = call(route.clone(), "/", &[("x-api-key", "jack-key")]).await;
        assert_eq!(
            answer.upstream_header("x-consumer-username").unwrap(),
            "jack"
        );
        let answer = call(route.clone(), "/?token=jack-key", &[]).await;
        assert_eq!(
            answer.upstream_header("x-consumer-username").unwrap(),
            "jack"
        );
        let answer = call(
            route.clone(),
            "/?apikey=jack-key",
            &[("apikey", "jack-key")],
        )
        .await;
        assert_401(&answer, MISSING_KEY, "apikey realm=\"gw\"");
        // nginx finds `x_api_key` as the header `x-api-key`.
        let answer = call(
            json!({"header": "x_api_key"}),
            "/",
            &[("x-api-key", "jack-key")],
        )
        .await;
        assert_eq!(
            answer.upstream_header("x-consumer-username").unwrap(),
            "jack"
        );
    }

    #[tokio::test]
    async fn missing_and_invalid_keys() {
        let answer = call(json!({}), "/", &[]).await;
        assert_401(&answer, MISSING_KEY, "apikey realm=\"key\"");
        assert_eq!(
            answer.body,
            "{\"message\":\"Missing API key in request\"}\n"
        );
        let answer = call(json!({}), "/", &[("apikey", "wrong")]).await;
        assert_401(&answer, INVALID_KEY, "apikey realm=\"key\"");
        let answer = call(json!({}), "/", &[("apikey", "")]).await;
        assert_401(&answer, INVALID_KEY, "apikey realm=\"key\"");
        let answer = call(json!({}), "/?apikey=wrong", &[]).await;
        assert_401(&answer, INVALID_KEY, "apikey realm=\"key\"");
        // A bare or repeated argument is there but carries no usable key.
        let answer = call(json!({}), "/?apikey", &[]).await;
        assert_401(&answer, INVALID_KEY, "apikey realm=\"key\"");
        let answer = call(json!({}), "/?apikey=jack-key&apikey=jack-key", &[]).await;
        assert_401(&answer, INVALID_KEY, "apikey realm=\"key\"");
        // No consumer uses key-auth at all.
        let set = testing::compile(&json!({ NAME: {} })).unwrap();
        let chain = testing::chain(Vec::new(), set, ConsumerIndex::default());
        let answer = testing::send(
            chain,
            testing::request("127.0.0.1", "/", &[("apikey", "k")]),
        )
        .await;
        assert_401(&answer, INVALID_KEY, "apikey realm=\"key\"");
    }

    #[tokio::test]
    async fn hide_credentials_removes_the_key_where_it_was() {
        let route = json!({"hide_credentials": true});
        let answer = call(route.clone(), "/p?apikey=x", &[("apikey", "jack-key")]).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(answer.upstream_header("apikey").is_none());
        // Only the place the key came from is cleaned, as APISIX does.
        assert_eq!(answer.json()["uri"], "/p?apikey=x");
        let answer = call(route.clone(), "/p?a=1&apikey=jack-key&b=2", &[]).await;
        assert_eq!(
            answer.upstream_header("x-consumer-username").unwrap(),
            "jack"
        );
        assert_eq!(answer.json()["uri"], "/p?a=1&b=2");
        let answer = call(route.clone(), "/p?apikey=jack-key", &[]).await;
        assert_eq!(answer.json()["uri"], "/p");
        let answer = call(
            json!({"hide_credentials": false}),
            "/p?apikey=jack-key",
            &[],
        )
        .await;
        assert_eq!(answer.json()["uri"], "/p?apikey=jack-key");
    }

    #[tokio::test]
    async fn anonymous_consumer() {
        let route = json!({"anonymous_consumer": "guest"});
        let answer = call(route.clone(), "/", &[]).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(
            answer.upstream_header("x-consumer-username").unwrap(),
            "guest"
        );
        let answer = call(route.clone(), "/", &[("apikey", "wrong")]).await;
        assert_eq!(
            answer.upstream_header("x-consumer-username").unwrap(),
            "guest"
        );
        assert_eq!(answer.upstream_header("apikey").unwrap(), "wrong");
        let answer = call(route, "/", &[("apikey", "jack-key")]).await;
        assert_eq!(
            answer.upstream_header("x-consumer-username").unwrap(),
            "jack"
        );
        // hide_credentials cleans both places on the anonymous path.
        let route = json!({"anonymous_consumer": "guest", "hide_credentials": true});
        let answer = call(route, "/a?apikey=bad&c=3", &[("apikey", "wrong")]).await;
        assert_eq!(
            answer.upstream_header("x-consumer-username").unwrap(),
            "guest"
        );
        assert!(answer.upstream_header("apikey").is_none());
        assert_eq!(answer.json()["uri"], "/a?c=3");
        // An anonymous consumer that does not exist.
        let route = json!({"anonymous_consumer": "nobody", "realm": "r"});
        let answer = call(route, "/", &[]).await;
        assert_401(&answer, INVALID_USER, "apikey realm=\"r\"");
    }

    #[test]
    fn query_helpers() {
        assert!(matches!(query_key(None, "k"), QueryKey::Absent));
        assert!(matches!(query_key(Some("a=1&&b"), "k"), QueryKey::Absent));
        assert!(matches!(query_key(Some("k="), "k"), QueryKey::One(v) if v.is_empty()));
        assert!(matches!(query_key(Some("%6B=v%zz"), "k"), QueryKey::One(v) if v == b"v%zz"));
        assert!(matches!(query_key(Some("k"), "k"), QueryKey::Unusable));
        let mut uri: Uri = "http://h:8080/x?k=1&k=2&&z".parse().unwrap();
        strip_query_arg(&mut uri, "k");
        assert_eq!(uri.to_string(), "http://h:8080/x?z");
        let mut uri: Uri = "/x?z=1".parse().unwrap();
        strip_query_arg(&mut uri, "k");
        assert_eq!(uri.to_string(), "/x?z=1");
    }
}
