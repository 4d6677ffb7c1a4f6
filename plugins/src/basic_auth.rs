//! `basic-auth`: identifies the consumer by HTTP Basic credentials.
//!
//! Mirrors APISIX's plugin of the same name (priority 2520, rewrite phase,
//! type `auth`). Route side, every field optional:
//!
//! ```json
//! {"hide_credentials": false, "realm": "basic", "anonymous_consumer": "guest"}
//! ```
//!
//! Consumer side: `{"username": "...", "password": "..."}`, both required;
//! consumers are found by `username`.
//!
//! Answers (401, with `WWW-Authenticate: Basic realm="<realm>"`): no
//! `Authorization` header: `Missing authorization in request`; a header that
//! is not `Basic <base64 of user:password>`: `Invalid authorization in
//! request`; an unknown user or a wrong password: `Invalid user
//! authorization`. With `anonymous_consumer` set, such a request goes on as
//! that consumer (401 `Invalid user authorization` when it does not exist).
//! `hide_credentials` removes `Authorization` before the request is proxied.
//!
//! The header is read as APISIX reads it: the first `basic` (any case)
//! followed by one white-space character and the rest; base64 as nginx
//! decodes it (padding optional, anything after the first `=` ignored); the
//! decoded text split on `:` with empty trailing fields dropped, user and
//! password being the first two fields with all white space removed.
//!
//! The user is found with one hash-map probe in the snapshot's consumer
//! index; the password is compared in constant time. Passwords are never
//! logged and never show in `Debug` output.

use std::sync::{Arc, OnceLock};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use http::header::AUTHORIZATION;
use http::{request, HeaderValue};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::consumer::{self, Credential};
use crate::ctx::Ctx;
use crate::key_auth::{
    anonymous_consumer_schema, anonymous_credential, check_bool, check_realm, realm_doc, secret_eq,
    unauthorized, www_authenticate, INVALID_USER,
};
use crate::plugin::{CompileCx, CredentialKey, Flow, Phases, Plugin, PluginKind, PluginSpec};
use crate::registry::cached;
use crate::schema::Schema;

pub const NAME: &str = "basic-auth";
pub const PRIORITY: i32 = 2520;

pub const MISSING_AUTHORIZATION: &str = "Missing authorization in request";
pub const INVALID_AUTHORIZATION: &str = "Invalid authorization in request";
pub use crate::key_auth::INVALID_USER as INVALID_USER_AUTHORIZATION;

/// The route-side configuration, with APISIX's names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct BasicAuthConf {
    #[serde(default)]
    pub hide_credentials: bool,
    #[serde(default = "default_realm")]
    pub realm: String,
    #[serde(default)]
    pub anonymous_consumer: Option<String>,
}

fn default_realm() -> String {
    "basic".to_string()
}

fn build_schema() -> Schema {
    Schema::object()
        .prop(
            "hide_credentials",
            Schema::Custom(check_bool, || json!({"type": "boolean", "default": false})),
        )
        .prop("realm", Schema::Custom(check_realm, || realm_doc("basic")))
        .prop("anonymous_consumer", anonymous_consumer_schema())
        .done()
}

fn build_consumer_schema() -> Schema {
    Schema::object()
        .prop("username", Schema::string().done())
        .prop("password", Schema::string().done())
        .required(&["username", "password"])
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
// The consumer side.

/// A consumer's password, compiled. Its `Debug` never shows the password.
pub struct BasicAuthCredential {
    password: Box<[u8]>,
}

impl std::fmt::Debug for BasicAuthCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicAuthCredential")
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Deserialize)]
struct ConsumerConf {
    username: String,
    password: String,
}

/// Compiles a checked consumer-side configuration: found by `username`.
pub fn compile_credential(conf: &Value) -> Result<CredentialKey, String> {
    // serde's message could quote the password: say what is wrong only.
    let conf = ConsumerConf::deserialize(conf)
        .map_err(|_| "properties \"username\" and \"password\" are required strings".to_string())?;
    Ok(CredentialKey {
        key: conf.username,
        data: Arc::new(BasicAuthCredential {
            password: conf.password.into_bytes().into_boxed_slice(),
        }),
    })
}

// ---------------------------------------------------------------------------
// The route side.

/// The compiled route-side configuration.
#[derive(Debug)]
pub struct BasicAuth {
    hide_credentials: bool,
    anonymous_consumer: Option<Box<str>>,
    www_authenticate: HeaderValue,
}

/// Compiles a checked route-side configuration.
pub fn compile(conf: &Value) -> Result<BasicAuth, String> {
    let conf = BasicAuthConf::deserialize(conf).map_err(|e| e.to_string())?;
    Ok(BasicAuth {
        hide_credentials: conf.hide_credentials,
        anonymous_consumer: conf.anonymous_consumer.map(String::into_boxed_str),
        www_authenticate: www_authenticate("Basic", &conf.realm)?,
    })
}

/// Decoded credentials. `Debug` is not derived: they are secrets.
pub struct UserPass {
    pub username: Vec<u8>,
    pub password: Vec<u8>,
}

/// Why an `Authorization` value could not be read; never quotes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// No `basic <something>` in it.
    Format,
    /// Not base64.
    Decode,
    /// No `:` separating a password.
    Split,
}

impl ParseError {
    fn reason(self) -> &'static str {
        match self {
            ParseError::Format => "Invalid authorization header format",
            ParseError::Decode => "Failed to decode authentication header",
            ParseError::Split => "Split authorization err: invalid decoded data",
        }
    }
}

/// nginx's `ngx_decode_base64`: the standard alphabet, padding optional,
/// leftover bits ignored.
const NGX_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(true),
);

/// PCRE's `\s` (without UTF mode).
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

/// The part after `basic` and one white-space character: APISIX's
/// unanchored `(?i:basic)\s(.+)`.
fn encoded_part(value: &[u8]) -> Option<&[u8]> {
    (0..value.len()).find_map(|i| {
        let rest = value.get(i..)?;
        let (word, rest) = (rest.get(..5)?, rest.get(5..)?);
        if !word.eq_ignore_ascii_case(b"basic") {
            return None;
        }
        let (&sep, encoded) = rest.split_first()?;
        (is_space(sep) && !encoded.is_empty() && !encoded.contains(&b'\n')).then_some(encoded)
    })
}

/// Reads an `Authorization` value as APISIX does.
pub fn parse_authorization(value: &[u8]) -> Result<UserPass, ParseError> {
    let encoded = encoded_part(value).ok_or(ParseError::Format)?;
    // nginx stops at the first `=`.
    let end = encoded
        .iter()
        .position(|&b| b == b'=')
        .unwrap_or(encoded.len());
    let decoded = NGX_BASE64
        .decode(&encoded[..end])
        .map_err(|_| ParseError::Decode)?;
    // `ngx.re.split(decoded, ":")`: empty trailing fields are dropped, so a
    // password exists when some field after the first is not empty.
    let mut fields = decoded.split(|&b| b == b':');
    let username = fields.next().unwrap_or_default();
    let password = fields.next().ok_or(ParseError::Split)?;
    if password.is_empty() && !fields.any(|f| !f.is_empty()) {
        return Err(ParseError::Split);
    }
    let strip = |f: &[u8]| f.iter().copied().filter(|&b| !is_space(b)).collect();
    Ok(UserPass {
        username: strip(username),
        password: strip(password),
    })
}

/// Why no consumer was identified: the message APISIX answers with.
enum Failure {
    Missing,
    Malformed,
    BadUser,
}

impl BasicAuth {
    fn identify(&self, ctx: &Ctx, req: &request::Parts) -> Result<Arc<Credential>, Failure> {
        let value = req.headers.get(AUTHORIZATION).ok_or(Failure::Missing)?;
        let creds = parse_authorization(value.as_bytes()).map_err(|e| {
            tracing::warn!("basic-auth: {}", e.reason());
            Failure::Malformed
        })?;
        let credential = std::str::from_utf8(&creds.username)
            .ok()
            .and_then(|user| ctx.consumers.find(NAME, user))
            .ok_or_else(|| {
                tracing::warn!("basic-auth: failed to find user: invalid user");
                Failure::BadUser
            })?;
        let stored = credential
            .data::<BasicAuthCredential>()
            .ok_or(Failure::BadUser)?;
        if secret_eq(&stored.password, &creds.password) {
            Ok(credential.clone())
        } else {
            Err(Failure::BadUser)
        }
    }
}

impl Plugin for BasicAuth {
    fn phases(&self) -> Phases {
        Phases::REWRITE
    }

    fn rewrite(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        let credential = match self.identify(ctx, req) {
            Ok(credential) => credential,
            Err(failure) => {
                let Some(name) = self.anonymous_consumer.as_deref() else {
                    let text = match failure {
                        Failure::Missing => MISSING_AUTHORIZATION,
                        Failure::Malformed => INVALID_AUTHORIZATION,
                        Failure::BadUser => INVALID_USER,
                    };
                    return unauthorized(&self.www_authenticate, text);
                };
                match anonymous_credential(ctx, name) {
                    Some(credential) => credential,
                    None => {
                        tracing::error!(
                            "basic-auth failed to authenticate the request, code: 401. \
                             error: failed to get anonymous consumer {name}"
                        );
                        return unauthorized(&self.www_authenticate, INVALID_USER);
                    }
                }
            }
        };
        if self.hide_credentials {
            req.headers.remove(AUTHORIZATION);
        }
        consumer::attach(ctx, req, &credential);
        Flow::Continue
    }
}

/// The registry entry.
pub struct BasicAuthSpec;

impl PluginSpec for BasicAuthSpec {
    fn encrypt_fields(&self) -> &'static [&'static str] {
        &["password"]
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
        "username"
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
    use http::header::WWW_AUTHENTICATE;
    use http::StatusCode;

    fn b64(text: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    fn basic(user_pass: &str) -> String {
        format!("Basic {}", b64(user_pass))
    }

    fn reason(conf: Value, target: SchemaType) -> String {
        match registry::check(NAME, &conf, target) {
            Err(PluginError::Invalid { reason, .. }) => reason,
            other => panic!("expected an invalid configuration, got {other:?}"),
        }
    }

    fn consumers() -> ConsumerIndex {
        let mut index = index_for_tests(&[
            (
                NAME,
                "jack",
                json!({"username": "jack2019", "password": "123456"}),
            ),
            (
                NAME,
                "rose",
                json!({"username": "rose", "password": "p@ss"}),
            ),
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

    async fn call(route: Value, headers: &[(&str, &str)]) -> Answer {
        let set = testing::compile(&json!({ NAME: route })).unwrap();
        let chain = testing::chain(Vec::new(), set, consumers());
        testing::send(chain, testing::request("127.0.0.1", "/hello", headers)).await
    }

    fn assert_401(answer: &Answer, message: &str, challenge: &str) {
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.body);
        assert_eq!(answer.json(), json!({ "message": message }));
        assert_eq!(answer.headers[WWW_AUTHENTICATE], challenge);
    }

    #[test]
    fn spec_and_defaults() {
        let spec = registry::find(NAME).unwrap();
        assert_eq!(spec.priority(), 2520);
        assert_eq!(spec.kind(), PluginKind::Auth);
        assert_eq!(spec.key_attr(), "username");
        let conf = BasicAuthConf::deserialize(&json!({})).unwrap();
        assert!(!conf.hide_credentials);
        assert_eq!(conf.realm, "basic");
        assert!(conf.anonymous_consumer.is_none());
        let doc = schema().to_json();
        assert_eq!(doc["properties"]["realm"]["default"], "basic");
        assert_eq!(doc["properties"]["hide_credentials"]["default"], false);
        assert_eq!(
            consumer_schema().to_json()["required"],
            json!(["username", "password"])
        );
    }

    #[test]
    fn schema_errors_use_apisix_wording() {
        assert_eq!(
            reason(json!({"username": "u"}), SchemaType::Consumer),
            "property \"password\" is required"
        );
        assert_eq!(
            reason(json!({"password": "p"}), SchemaType::Consumer),
            "property \"username\" is required"
        );
        assert_eq!(
            reason(
                json!({"username": 123, "password": "p"}),
                SchemaType::Consumer
            ),
            "property \"username\" validation failed: wrong type: expected string, got number"
        );
        assert_eq!(
            registry::check(NAME, &json!({"username": "u"}), SchemaType::Consumer)
                .unwrap_err()
                .to_string(),
            "failed to check the configuration of plugin basic-auth err: property \"password\" is required"
        );
        assert_eq!(
            reason(json!({"anonymous_consumer": 1}), SchemaType::Route),
            "property \"anonymous_consumer\" validation failed: wrong type: expected string, got number"
        );
        assert_eq!(
            reason(json!({"anonymous_consumer": ""}), SchemaType::Route),
            "property \"anonymous_consumer\" validation failed: string too short, expected at least 1, got 0"
        );
        assert_eq!(
            reason(json!({"hide_credentials": 1}), SchemaType::Route),
            "property \"hide_credentials\" validation failed: wrong type: expected boolean, got number"
        );
        assert!(reason(json!({"realm": "a\\b"}), SchemaType::Route)
            .starts_with("property \"realm\" validation failed: failed to match pattern"));
        assert!(registry::check(NAME, &json!({}), SchemaType::Route).is_ok());
    }

    #[test]
    fn passwords_stay_out_of_debug_output() {
        let key = compile_credential(&json!({"username": "u", "password": "hunter2"})).unwrap();
        assert_eq!(key.key, "u");
        let data = key.data.downcast_ref::<BasicAuthCredential>().unwrap();
        assert!(!format!("{data:?}").contains("hunter2"));
        let err = compile_credential(&json!({"username": "u", "password": 77}))
            .err()
            .unwrap();
        assert!(!err.contains("77"));
    }

    #[test]
    fn parses_as_apisix() {
        let ok = |v: &str| {
            let up = parse_authorization(v.as_bytes()).unwrap();
            (
                String::from_utf8(up.username).unwrap(),
                String::from_utf8(up.password).unwrap(),
            )
        };
        let err = |v: &str| parse_authorization(v.as_bytes()).err().unwrap();
        let pair = |u: &str, p: &str| (u.to_string(), p.to_string());
        assert_eq!(ok(&basic("foo:bar")), pair("foo", "bar"));
        assert_eq!(
            ok(&format!("bAsIc\t{}", b64("foo:bar"))),
            pair("foo", "bar")
        );
        // Unanchored, as APISIX's regex.
        assert_eq!(
            ok(&format!("xbasic {}", b64("foo:bar"))),
            pair("foo", "bar")
        );
        // Padding optional, anything after `=` ignored.
        assert_eq!(ok("Basic Zm9vOmJhcg"), pair("foo", "bar"));
        assert_eq!(ok("Basic YTpi==garbage!"), pair("a", "b"));
        // Fields: the second is the password; white space is removed.
        assert_eq!(ok(&basic("foo:bar:baz")), pair("foo", "bar"));
        assert_eq!(ok(&basic(" f o o :\tbar ")), pair("foo", "bar"));
        assert_eq!(ok(&basic("foo::x")), pair("foo", ""));
        assert_eq!(ok(&basic(":bar")), pair("", "bar"));
        assert_eq!(ok(&basic("foo:bar:")), pair("foo", "bar"));
        assert_eq!(err(&basic("foo:")), ParseError::Split);
        assert_eq!(err(&basic("foo::")), ParseError::Split);
        assert_eq!(err(&basic("bar")), ParseError::Split);
        assert_eq!(err(&basic(":")), ParseError::Split);
        assert_eq!(err("Basic "), ParseError::Format);
        assert_eq!(err("Bearer abc"), ParseError::Format);
        assert_eq!(err("Basic"), ParseError::Format);
        assert_eq!(err(""), ParseError::Format);
        assert_eq!(err("Basic aca_a"), ParseError::Decode);
        assert_eq!(err("Basic  Zm9vOmJhcg=="), ParseError::Decode);
        assert_eq!(err("Basic Zm9vO"), ParseError::Decode);
    }

    #[tokio::test]
    async fn identifies_the_consumer_upstream() {
        let answer = call(
            json!({}),
            &[
                ("authorization", &basic("jack2019:123456")),
                ("x-consumer-username", "forged"),
            ],
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        assert_eq!(
            answer.upstream_header("x-consumer-username").unwrap(),
            "jack"
        );
        assert!(answer.upstream_header("authorization").is_some());
    }

    #[tokio::test]
    async fn messages_and_challenge() {
        let challenge = "Basic realm=\"basic\"";
        assert_401(
            &call(json!({}), &[]).await,
            MISSING_AUTHORIZATION,
            challenge,
        );
        assert_401(
            &call(json!({}), &[("authorization", "Bearer x")]).await,
            INVALID_AUTHORIZATION,
            challenge,
        );
        assert_401(
            &call(json!({}), &[("authorization", "Basic aca_a")]).await,
            INVALID_AUTHORIZATION,
            challenge,
        );
        assert_401(
            &call(json!({}), &[("authorization", &basic("bar"))]).await,
            INVALID_AUTHORIZATION,
            challenge,
        );
        assert_401(
            &call(json!({}), &[("authorization", "")]).await,
            INVALID_AUTHORIZATION,
            challenge,
        );
        assert_401(
            &call(json!({}), &[("authorization", &basic("nobody:123456"))]).await,
            "Invalid user authorization",
            challenge,
        );
        assert_401(
            &call(json!({}), &[("authorization", &basic("jack2019:654321"))]).await,
            "Invalid user authorization",
            challenge,
        );
        assert_401(
            &call(
                json!({"realm": "shop"}),
                &[("authorization", &basic("jack2019:12345"))],
            )
            .await,
            "Invalid user authorization",
            "Basic realm=\"shop\"",
        );
        // Invalid UTF-8 in the user name matches nobody.
        let odd = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(b"\xff\xfe:x")
        );
        assert_401(
            &call(json!({}), &[("authorization", &odd)]).await,
            "Invalid user authorization",
            challenge,
        );
    }

    #[tokio::test]
    async fn hide_credentials() {
        let answer = call(
            json!({"hide_credentials": true}),
            &[("authorization", &basic("rose:p@ss"))],
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(
            answer.upstream_header("x-consumer-username").unwrap(),
            "rose"
        );
        assert!(answer.upstream_header("authorization").is_none());
    }

    #[tokio::test]
    async fn anonymous_consumer() {
        let route = json!({"anonymous_consumer": "guest"});
        let answer = call(route.clone(), &[]).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(
            answer.upstream_header("x-consumer-username").unwrap(),
            "guest"
        );
        let answer = call(route.clone(), &[("authorization", &basic("rose:wrong"))]).await;
        assert_eq!(
            answer.upstream_header("x-consumer-username").unwrap(),
            "guest"
        );
        let answer = call(route, &[("authorization", &basic("rose:p@ss"))]).await;
        assert_eq!(
            answer.upstream_header("x-consumer-username").unwrap(),
            "rose"
        );
        let route = json!({"anonymous_consumer": "guest", "hide_credentials": true});
        let answer = call(route, &[("authorization", "Basic !!")]).await;
        assert_eq!(
            answer.upstream_header("x-consumer-username").unwrap(),
            "guest"
        );
        assert!(answer.upstream_header("authorization").is_none());
        let answer = call(json!({"anonymous_consumer": "nobody"}), &[]).await;
        assert_401(
            &answer,
            "Invalid user authorization",
            "Basic realm=\"basic\"",
        );
    }
}
