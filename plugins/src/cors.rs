//! `cors`: Cross-Origin Resource Sharing headers, and preflight requests
//! answered by the gateway.
//!
//! Mirrors APISIX 3.18's plugin of the same name (priority 4000, rewrite
//! and header_filter phases):
//!
//! ```json
//! {"allow_origins": "https://a.example,https://b.example", "allow_methods": "GET,POST",
//!  "allow_headers": "*", "expose_headers": "X-Id", "max_age": 5, "allow_credential": false}
//! ```
//!
//! - Every `OPTIONS` request on the route is answered 200 by the gateway in
//!   rewrite (the upstream and later plugins never see it), with the CORS
//!   headers below.
//! - Every answer (upstream, preflight, a plugin's 401 or 429) gets
//!   `Access-Control-Allow-Origin` when the request's `Origin` is allowed,
//!   with `Access-Control-Allow-Methods`, `-Allow-Headers`, `-Max-Age`,
//!   `-Expose-Headers` (when set) and `-Allow-Credentials: true` (when
//!   `allow_credential`).
//! - `allow_origins` (default `*`): `*` allows any origin and answers `*`;
//!   `**` echoes the request's origin; one origin or a comma-separated list
//!   echoes the origin when it is listed. Anything but `*` adds
//!   `Vary: Origin`. `allow_origins_by_regex` (unanchored, any matching)
//!   replaces the list; `allow_origins_by_metadata` names entries of
//!   `plugin_metadata/cors` `allow_origins` that allow an origin too.
//! - `allow_methods`/`allow_headers` default `*`; `**` means every method /
//!   the request's `Access-Control-Request-Headers`.
//! - `allow_credential` with any `*` is refused, as browsers would ignore it.
//! - `timing_allow_origins` (and `_by_regex`) set `Timing-Allow-Origin`.
//!
//! Lists and regexes are compiled once per configuration.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use http::header::{self, HeaderName};
use http::{request, response, HeaderValue, Method, StatusCode};
use regex::Regex;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::ctx::Ctx;
use crate::plugin::{CompileCx, Flow, Phases, Plugin, PluginSpec, SchemaType};
use crate::registry::cached;
use crate::schema::Schema;

pub const NAME: &str = "cors";
pub const PRIORITY: i32 = 4000;
const ORIGINS_PATTERN: &str = r"^(\*|\*\*|null|\w+://[^,]+(,\w+://[^,]+)*)$";
const CREDENTIAL_ERROR: &str =
    "you can not set '*' for other option when 'allow_credential' is true";
/// What `allow_methods: "**"` stands for.
const ALL_METHODS: &str = "GET,POST,PUT,DELETE,PATCH,HEAD,OPTIONS,CONNECT,TRACE";

fn origins_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    #[allow(clippy::unwrap_used)] // a constant pattern, covered by the tests
    RE.get_or_init(|| Regex::new(ORIGINS_PATTERN).unwrap())
}

fn is_origins(s: &str) -> bool {
    origins_regex().is_match(s)
}

fn star() -> String {
    "*".into()
}

fn five() -> i64 {
    5
}

/// The plugin configuration, with APISIX's names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct CorsConf {
    #[serde(default = "star")]
    pub allow_origins: String,
    #[serde(default = "star")]
    pub allow_methods: String,
    #[serde(default = "star")]
    pub allow_headers: String,
    #[serde(default)]
    pub expose_headers: Option<String>,
    #[serde(default = "five")]
    pub max_age: i64,
    #[serde(default)]
    pub allow_credential: bool,
    #[serde(default)]
    pub allow_origins_by_regex: Option<Vec<String>>,
    #[serde(default)]
    pub allow_origins_by_metadata: Option<Vec<String>>,
    #[serde(default)]
    pub timing_allow_origins: Option<String>,
    #[serde(default)]
    pub timing_allow_origins_by_regex: Option<Vec<String>>,
}

fn origins_schema() -> Schema {
    Schema::string().pattern(ORIGINS_PATTERN, is_origins).done()
}

fn string_with_default(default: &'static str) -> Schema {
    fn check(v: &Value) -> Result<(), String> {
        Schema::string().done().validate(v)
    }
    match default {
        "*" => Schema::Custom(check, || json!({"type": "string", "default": "*"})),
        _ => Schema::string().done(),
    }
}

fn regex_list() -> Schema {
    Schema::array(Schema::string().min(1).max(4096).done())
        .min(1)
        .unique()
        .done()
}

fn build_schema() -> Schema {
    Schema::object()
        .prop(
            "allow_origins",
            Schema::Custom(
                |v| origins_schema().validate(v),
                || json!({"type": "string", "pattern": ORIGINS_PATTERN, "default": "*"}),
            ),
        )
        .prop("allow_methods", string_with_default("*"))
        .prop("allow_headers", string_with_default("*"))
        .prop("expose_headers", Schema::string().done())
        .prop(
            "max_age",
            Schema::Custom(
                |v| Schema::integer().int().validate(v),
                || json!({"type": "integer", "default": 5}),
            ),
        )
        .prop(
            "allow_credential",
            Schema::Custom(
                |v| Schema::Boolean.validate(v),
                || json!({"type": "boolean", "default": false}),
            ),
        )
        .prop("allow_origins_by_regex", regex_list())
        .prop("allow_origins_by_metadata", regex_list())
        .prop("timing_allow_origins", origins_schema())
        .prop("timing_allow_origins_by_regex", regex_list())
        .done()
}

fn build_metadata_schema() -> Schema {
    Schema::object()
        .prop(
            "allow_origins",
            Schema::object().additional(origins_schema()).done(),
        )
        .done()
}

/// The configuration schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

/// The `plugin_metadata/cors` schema.
pub fn metadata_schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_metadata_schema)
}

/// Schema check, then APISIX's own checks.
pub fn check(conf: &Value) -> Result<(), String> {
    schema().validate(conf)?;
    let conf = CorsConf::deserialize(conf).map_err(|e| e.to_string())?;
    if conf.allow_credential {
        let starred = [
            Some(&conf.allow_origins),
            Some(&conf.allow_methods),
            Some(&conf.allow_headers),
            conf.expose_headers.as_ref(),
            conf.timing_allow_origins.as_ref(),
        ]
        .into_iter()
        .flatten()
        .any(|v| v == "*");
        if starred {
            return Err(CREDENTIAL_ERROR.into());
        }
    }
    for list in [
        &conf.allow_origins_by_regex,
        &conf.timing_allow_origins_by_regex,
    ]
    .into_iter()
    .flatten()
    {
        alternation(list)?;
    }
    Ok(())
}

/// The regexes of a list as one (unanchored, any of them).
fn alternation(list: &[String]) -> Result<Regex, String> {
    for r in list {
        Regex::new(r).map_err(|e| e.to_string())?;
    }
    let joined = list
        .iter()
        .map(|r| format!("(?:{r})"))
        .collect::<Vec<_>>()
        .join("|");
    Regex::new(&joined).map_err(|e| e.to_string())
}

/// One `allow_origins` value, compiled.
#[derive(Debug, Clone)]
enum Origins {
    /// `*`: any origin, answered `*`.
    Any,
    /// `**`: any origin, echoed.
    Echo,
    /// One origin (or `null`): itself, when the request's is the same.
    One(String),
    /// A comma-separated list: the request's origin when listed.
    List(HashSet<String>),
}

impl Origins {
    fn parse(text: &str) -> Origins {
        match text {
            "*" => Origins::Any,
            "**" => Origins::Echo,
            t if t.contains(',') => Origins::List(t.split(',').map(str::to_string).collect()),
            t => Origins::One(t.to_string()),
        }
    }

    /// The `Access-Control-Allow-Origin` this allows for `origin`.
    fn allow(&self, origin: Option<&str>) -> Option<Allow> {
        match (self, origin) {
            (Origins::Any, _) | (Origins::Echo, None) => Some(Allow::Any),
            (Origins::Echo, Some(_)) => Some(Allow::Origin),
            (Origins::One(one), Some(o)) if one == o => Some(Allow::Origin),
            (Origins::List(list), Some(o)) if list.contains(o) => Some(Allow::Origin),
            _ => None,
        }
    }
}

/// What an allowed request's `Access-Control-Allow-Origin` (or
/// `Timing-Allow-Origin`) says: `*`, or the request's own `Origin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Allow {
    Any,
    Origin,
}

impl Allow {
    /// The header value; the request's `Origin` is reused, not copied.
    fn value(self, origin: Option<&HeaderValue>) -> Option<HeaderValue> {
        match self {
            Allow::Any => Some(HeaderValue::from_static("*")),
            Allow::Origin => origin.cloned(),
        }
    }
}

/// The compiled plugin.
pub struct Cors {
    origins: Origins,
    vary: bool,
    regex: Option<Regex>,
    /// `allow_origins_by_metadata`: the named metadata entries, compiled.
    metadata: Option<Vec<Origins>>,
    methods: HeaderValue,
    headers: Option<HeaderValue>,
    max_age: HeaderValue,
    expose: Option<HeaderValue>,
    credential: bool,
    timing: Option<Origins>,
    timing_regex: Option<Regex>,
}

/// What rewrite saw of the request, for header_filter.
#[derive(Clone)]
struct Seen {
    origin: Option<HeaderValue>,
    request_headers: Option<HeaderValue>,
}

fn value(text: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(text).map_err(|_| format!("not a valid header value: {text:?}"))
}

pub fn compile(conf: &Value, metadata: Option<&Value>) -> Result<Cors, String> {
    let conf = CorsConf::deserialize(conf).map_err(|e| e.to_string())?;
    let metadata = conf.allow_origins_by_metadata.as_ref().map(|names| {
        names
            .iter()
            .filter_map(|name| {
                metadata?
                    .get("allow_origins")?
                    .get(name)?
                    .as_str()
                    .map(Origins::parse)
            })
            .collect()
    });
    let methods = if conf.allow_methods == "**" {
        ALL_METHODS
    } else {
        conf.allow_methods.as_str()
    };
    Ok(Cors {
        origins: Origins::parse(&conf.allow_origins),
        vary: conf.allow_origins != "*",
        regex: conf
            .allow_origins_by_regex
            .as_deref()
            .map(alternation)
            .transpose()?,
        metadata,
        methods: value(methods)?,
        headers: (conf.allow_headers != "**")
            .then(|| value(&conf.allow_headers))
            .transpose()?,
        max_age: value(&conf.max_age.to_string())?,
        expose: conf
            .expose_headers
            .as_deref()
            .filter(|e| !e.is_empty())
            .map(value)
            .transpose()?,
        credential: conf.allow_credential,
        timing: conf.timing_allow_origins.as_deref().map(Origins::parse),
        timing_regex: conf
            .timing_allow_origins_by_regex
            .as_deref()
            .map(alternation)
            .transpose()?,
    })
}

fn by_regex(regex: &Regex, origin: Option<&str>) -> Option<Allow> {
    origin.filter(|o| regex.is_match(o)).map(|_| Allow::Origin)
}

impl Cors {
    /// An origin allowed by the metadata entries the route names.
    fn by_metadata(&self, origin: Option<&str>) -> Option<Allow> {
        let origin = origin?;
        self.metadata
            .as_ref()?
            .iter()
            .any(|o| o.allow(Some(origin)).is_some())
            .then_some(Allow::Origin)
    }

    /// `Access-Control-Allow-Origin` for this request, if it is allowed.
    fn allowed(&self, origin: Option<&str>) -> Option<Allow> {
        let from_metadata = self.by_metadata(origin);
        if from_metadata.is_some() {
            return from_metadata;
        }
        // With metadata and the default `*`, only metadata origins pass.
        if self.metadata.is_some() && matches!(self.origins, Origins::Any) {
            return None;
        }
        match &self.regex {
            Some(regex) => by_regex(regex, origin),
            None => self.origins.allow(origin),
        }
    }
}

impl Plugin for Cors {
    fn phases(&self) -> Phases {
        Phases::REWRITE | Phases::HEADER_FILTER
    }

    fn rewrite(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        let origin = req.headers.get(header::ORIGIN).cloned();
        let request_headers = if self.headers.is_none() {
            req.headers
                .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
                .cloned()
        } else {
            None
        };
        ctx.data.insert(Seen {
            origin,
            request_headers,
        });
        if req.method == Method::OPTIONS {
            return Flow::status(StatusCode::OK);
        }
        Flow::Continue
    }

    fn header_filter(&self, ctx: &mut Ctx, resp: &mut response::Parts) {
        let seen = ctx.data.get::<Seen>();
        let origin_value = seen.and_then(|s| s.origin.as_ref());
        let origin = origin_value.and_then(|v| v.to_str().ok());
        let h = &mut resp.headers;
        if self.vary {
            h.append(header::VARY, HeaderValue::from_static("Origin"));
        }
        if let Some(allowed) = self.allowed(origin).and_then(|a| a.value(origin_value)) {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone());
            h.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
            if let Some(expose) = &self.expose {
                h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
            }
            match self
                .headers
                .clone()
                .or_else(|| seen.and_then(|s| s.request_headers.clone()))
            {
                Some(v) => {
                    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
                }
                None => {
                    h.remove(header::ACCESS_CONTROL_ALLOW_HEADERS);
                }
            }
            if self.credential {
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                );
            }
        }
        let timing = match (&self.timing_regex, &self.timing) {
            (Some(regex), _) => by_regex(regex, origin),
            (None, Some(t)) => t.allow(origin),
            (None, None) => None,
        };
        if let Some(t) = timing.and_then(|t| t.value(origin_value)) {
            h.insert(HeaderName::from_static("timing-allow-origin"), t);
        }
    }
}

pub struct CorsSpec;

impl PluginSpec for CorsSpec {
    fn name(&self) -> &'static str {
        NAME
    }

    fn priority(&self) -> i32 {
        PRIORITY
    }

    fn schema(&self) -> &'static Schema {
        schema()
    }

    fn metadata_schema(&self) -> Option<&'static Schema> {
        Some(metadata_schema())
    }

    fn check(&self, conf: &Value, target: SchemaType) -> Result<(), String> {
        match target {
            SchemaType::Metadata => metadata_schema().validate(conf),
            _ => check(conf),
        }
    }

    fn compile(&self, conf: &Value, cx: &CompileCx<'_>) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(compile(conf, cx.metadata)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::ConsumerIndex;
    use crate::registry;
    use crate::testing::{self, Answer};
    use std::collections::BTreeMap;

    fn reason(conf: Value) -> String {
        testing::refusal(NAME, &conf)
    }

    async fn call(conf: Value, method: &str, headers: &[(&str, &str)]) -> Answer {
        call_with(conf, BTreeMap::new(), method, headers).await
    }

    async fn call_with(
        conf: Value,
        metadata: BTreeMap<String, Value>,
        method: &str,
        headers: &[(&str, &str)],
    ) -> Answer {
        let set = testing::compile_with(
            &json!({ NAME: conf }),
            &crate::plugin::StateCache::default(),
            &metadata,
        )
        .unwrap();
        let chain = testing::chain(Vec::new(), set, ConsumerIndex::default());
        let mut req = testing::request("127.0.0.1", "/", headers);
        *req.method_mut() = method.parse().unwrap();
        testing::send(chain, req).await
    }

    fn h<'a>(a: &'a Answer, name: &str) -> Option<&'a str> {
        a.headers.get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn schema_and_credential_rules() {
        assert_eq!(registry::find(NAME).unwrap().priority(), 4000);
        assert_eq!(reason(json!({"allow_credential": true})), CREDENTIAL_ERROR);
        assert!(registry::check(
            NAME,
            &json!({"allow_credential": true, "allow_origins": "http://a.test", "allow_methods": "GET", "allow_headers": "X-H"}),
            SchemaType::Route
        )
        .is_ok());
        assert!(registry::check(
            NAME,
            &json!({"allow_credential": true, "allow_origins": "**", "allow_methods": "**", "allow_headers": "**"}),
            SchemaType::Route
        )
        .is_ok());
        for good in [
            "*",
            "**",
            "null",
            "http://y.com.uk",
            "https://x.com,http://y.com.uk:12000,http://c.tv",
        ] {
            assert!(is_origins(good), "{good}");
        }
        for bad in [
            "",
            "*a",
            "*,http://y.com",
            "nulll",
            "http//y.com.uk",
            "x.com",
            "https://x.com,*,https://y.com.uk",
        ] {
            assert!(!is_origins(bad), "{bad}");
            assert!(reason(json!({"allow_origins": bad})).contains("allow_origins"));
        }
        assert!(reason(json!({"allow_origins_by_regex": ["("]})).contains("regex"));
        assert_eq!(
            reason(json!({"max_age": "5"})),
            "property \"max_age\" validation failed: wrong type: expected integer, got string"
        );
    }

    #[tokio::test]
    async fn preflight_is_answered_with_the_defaults() {
        let a = call(
            json!({}),
            "OPTIONS",
            &[
                ("origin", "http://a.test"),
                ("access-control-request-method", "PUT"),
            ],
        )
        .await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body, "", "the upstream was not called");
        assert_eq!(h(&a, "access-control-allow-origin"), Some("*"));
        assert_eq!(h(&a, "access-control-allow-methods"), Some("*"));
        assert_eq!(h(&a, "access-control-allow-headers"), Some("*"));
        assert_eq!(h(&a, "access-control-max-age"), Some("5"));
        assert_eq!(h(&a, "vary"), None);
        assert_eq!(h(&a, "access-control-allow-credentials"), None);
        assert_eq!(h(&a, "access-control-expose-headers"), None);
    }

    #[tokio::test]
    async fn lists_echo_only_a_listed_origin() {
        let conf = json!({"allow_origins": "http://a.test,http://b.test", "allow_credential": true,
                          "allow_methods": "GET,POST", "allow_headers": "X-H", "expose_headers": "X-Id", "max_age": 60});
        let a = call(conf.clone(), "GET", &[("origin", "http://b.test")]).await;
        assert!(a.json()["uri"].is_string(), "proxied");
        assert_eq!(h(&a, "access-control-allow-origin"), Some("http://b.test"));
        assert_eq!(h(&a, "access-control-allow-credentials"), Some("true"));
        assert_eq!(h(&a, "access-control-expose-headers"), Some("X-Id"));
        assert_eq!(h(&a, "access-control-allow-methods"), Some("GET,POST"));
        assert_eq!(h(&a, "access-control-max-age"), Some("60"));
        assert_eq!(h(&a, "vary"), Some("Origin"));
        let other = call(conf, "GET", &[("origin", "http://evil.test")]).await;
        assert_eq!(h(&other, "access-control-allow-origin"), None);
        assert_eq!(h(&other, "vary"), Some("Origin"));
        let echo = call(
            json!({"allow_origins": "**", "allow_headers": "**"}),
            "GET",
            &[
                ("origin", "http://x.test"),
                ("access-control-request-headers", "X-A, X-B"),
            ],
        )
        .await;
        assert_eq!(
            h(&echo, "access-control-allow-origin"),
            Some("http://x.test")
        );
        assert_eq!(h(&echo, "access-control-allow-headers"), Some("X-A, X-B"));
    }

    #[tokio::test]
    async fn regex_metadata_and_timing() {
        let conf = json!({"allow_origins_by_regex": [".*\\.example\\.com"], "timing_allow_origins_by_regex": ["a\\.example"]});
        let a = call(conf.clone(), "GET", &[("origin", "https://a.example.com")]).await;
        assert_eq!(
            h(&a, "access-control-allow-origin"),
            Some("https://a.example.com")
        );
        assert_eq!(h(&a, "timing-allow-origin"), Some("https://a.example.com"));
        let b = call(conf, "GET", &[("origin", "https://example.org")]).await;
        assert_eq!(h(&b, "access-control-allow-origin"), None);

        let mut metadata = BTreeMap::new();
        metadata.insert(
            NAME.to_string(),
            json!({"allow_origins": {"team": "https://t.test,https://u.test"}}),
        );
        let conf = json!({"allow_origins_by_metadata": ["team"]});
        let ok = call_with(
            conf.clone(),
            metadata.clone(),
            "GET",
            &[("origin", "https://u.test")],
        )
        .await;
        assert_eq!(
            h(&ok, "access-control-allow-origin"),
            Some("https://u.test")
        );
        let no = call_with(conf, metadata, "GET", &[("origin", "https://v.test")]).await;
        assert_eq!(h(&no, "access-control-allow-origin"), None);
    }
}
