//! `consumer-restriction`: allow or deny requests by consumer, consumer
//! group, route or service.
//!
//! Mirrors APISIX's plugin of the same name (priority 2400, access phase, so
//! it sees the consumer an auth plugin identified in rewrite):
//!
//! ```json
//! {"type": "consumer_name", "whitelist": ["jack"], "rejected_code": 403,
//!  "rejected_msg": "no", "allowed_by_methods": [{"user": "rose", "methods": ["GET"]}]}
//! ```
//!
//! `type` (default `consumer_name`; or `consumer_group_id`, `route_id`,
//! `service_id`) says what the request is judged by. At least one of
//! `blacklist`, `whitelist` (each at least one name) and
//! `allowed_by_methods` is required. A request with no such value (no
//! consumer identified, a route without service, ...) gets 401 `The request
//! is rejected, please check the <type> for this request`. Otherwise, in
//! APISIX's order:
//!
//! 1. a value in `blacklist` is rejected;
//! 2. with a `whitelist`, a value not in it is rejected;
//! 3. with a non-empty `allowed_by_methods`, a value that is not whitelisted
//!    and has an entry there (the first with `user` equal to it) is rejected
//!    unless the request method is one of that entry's `methods`; values
//!    without an entry are not restricted by it.
//!
//! A rejection is `rejected_code` (default 403) with `{"message":
//! rejected_msg}`, or `The <type> is forbidden.` without `rejected_msg`.
//!
//! The lists are hash sets built once per configuration.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{header, request, HeaderValue, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::ctx::Ctx;
use crate::plugin::{CompileCx, Flow, Phases, Plugin, PluginSpec, SchemaType};
use crate::registry::cached;
use crate::schema::Schema;
use crate::{full_body, ResponseBody};

pub const NAME: &str = "consumer-restriction";
pub const PRIORITY: i32 = 2400;
pub const DEFAULT_REJECTED_CODE: u16 = 403;

/// What a request is judged by (`type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestrictBy {
    #[default]
    ConsumerName,
    ServiceId,
    RouteId,
    ConsumerGroupId,
}

impl RestrictBy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestrictBy::ConsumerName => "consumer_name",
            RestrictBy::ServiceId => "service_id",
            RestrictBy::RouteId => "route_id",
            RestrictBy::ConsumerGroupId => "consumer_group_id",
        }
    }

    /// The request's value for this type.
    fn value(self, ctx: &Ctx) -> Option<&str> {
        match self {
            RestrictBy::ConsumerName => ctx.consumer_name(),
            RestrictBy::ServiceId => ctx.service_id.as_deref(),
            RestrictBy::RouteId => ctx.route_id.as_deref(),
            RestrictBy::ConsumerGroupId => ctx
                .credential
                .as_ref()
                .and_then(|c| c.consumer.group_id.as_deref()),
        }
    }
}

/// One `allowed_by_methods` entry.
#[derive(Debug, Clone, Deserialize)]
pub struct MethodRule {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub methods: Vec<String>,
}

/// The plugin configuration, with APISIX's names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct ConsumerRestrictionConf {
    #[serde(default, rename = "type")]
    pub restrict_by: RestrictBy,
    #[serde(default)]
    pub blacklist: Option<Vec<String>>,
    #[serde(default)]
    pub whitelist: Option<Vec<String>>,
    #[serde(default)]
    pub allowed_by_methods: Option<Vec<MethodRule>>,
    #[serde(default = "default_rejected_code")]
    pub rejected_code: i64,
    #[serde(default)]
    pub rejected_msg: Option<String>,
}

fn default_rejected_code() -> i64 {
    i64::from(DEFAULT_REJECTED_CODE)
}

const TYPES: &[&str] = &[
    "consumer_name",
    "service_id",
    "route_id",
    "consumer_group_id",
];

/// APISIX's `method_schema`.
const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "PURGE",
];

fn check_type(v: &Value) -> Result<(), String> {
    Schema::string().enumerated(TYPES).done().validate(v)
}

fn check_rejected_code(v: &Value) -> Result<(), String> {
    Schema::integer().min(200.0).int().validate(v)
}

fn build_schema() -> Schema {
    let names = || Schema::array(Schema::string().done()).min(1).done();
    let method_rule = Schema::object()
        .prop("user", Schema::string().done())
        .prop(
            "methods",
            Schema::array(Schema::string().enumerated(METHODS).done())
                .min(1)
                .done(),
        )
        .done();
    Schema::object()
        .prop(
            "type",
            Schema::Custom(
                check_type,
                || json!({"type": "string", "enum": TYPES, "default": "consumer_name"}),
            ),
        )
        .prop("blacklist", names())
        .prop("whitelist", names())
        .prop("allowed_by_methods", Schema::array(method_rule).done())
        .prop(
            "rejected_code",
            Schema::Custom(
                check_rejected_code,
                || json!({"type": "integer", "minimum": 200, "default": 403}),
            ),
        )
        .prop("rejected_msg", Schema::string().done())
        .any_of_required(&[&["blacklist"], &["whitelist"], &["allowed_by_methods"]])
        .done()
}

/// The configuration schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

/// Schema check, then one check of our own: `rejected_code` must be a
/// status an HTTP response can carry (APISIX's schema has no maximum).
pub fn check(conf: &Value) -> Result<(), String> {
    schema().validate(conf)?;
    if let Some(code) = conf.get("rejected_code").and_then(Value::as_f64) {
        if code > 999.0 {
            return Err(format!(
                "property \"rejected_code\" validation failed: expected {code} to be at most 999"
            ));
        }
    }
    Ok(())
}

/// The compiled configuration.
#[derive(Debug)]
pub struct ConsumerRestriction {
    restrict_by: RestrictBy,
    blacklist: HashSet<String>,
    whitelist: Option<HashSet<String>>,
    /// The first entry per user; empty when the list is absent or empty
    /// (then no one is restricted by method).
    methods: HashMap<String, Vec<String>>,
    rejected_code: StatusCode,
    rejected_body: Bytes,
    missing_body: Bytes,
}

fn json_bytes(v: &Value) -> Bytes {
    let mut text = v.to_string();
    text.push('\n');
    Bytes::from(text)
}

/// Compiles a checked configuration.
pub fn compile(conf: &Value) -> Result<ConsumerRestriction, String> {
    let conf = ConsumerRestrictionConf::deserialize(conf).map_err(|e| e.to_string())?;
    let mut methods: HashMap<String, Vec<String>> = HashMap::new();
    for rule in conf.allowed_by_methods.unwrap_or_default() {
        if let Some(user) = rule.user {
            methods.entry(user).or_insert(rule.methods);
        }
    }
    let rejected_code = u16::try_from(conf.rejected_code)
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| format!("invalid rejected_code {}", conf.rejected_code))?;
    let type_name = conf.restrict_by.as_str();
    let message = conf
        .rejected_msg
        .unwrap_or_else(|| format!("The {type_name} is forbidden."));
    Ok(ConsumerRestriction {
        restrict_by: conf.restrict_by,
        blacklist: conf.blacklist.unwrap_or_default().into_iter().collect(),
        whitelist: conf
            .whitelist
            .filter(|w| !w.is_empty())
            .map(|w| w.into_iter().collect()),
        methods,
        rejected_code,
        rejected_body: json_bytes(&json!({ "message": message })),
        missing_body: json_bytes(&json!({
            "message": format!("The request is rejected, please check the {type_name} for this request")
        })),
    })
}

fn respond(status: StatusCode, body: &Bytes) -> Flow {
    let mut resp: Response<ResponseBody> = Response::new(full_body(body.clone()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Flow::Respond(resp)
}

impl ConsumerRestriction {
    /// Whether a request with `value` and `method` is kept out.
    pub fn blocks(&self, value: &str, method: &str) -> bool {
        if self.blacklist.contains(value) {
            return true;
        }
        let whitelisted = self.whitelist.as_ref().is_some_and(|w| w.contains(value));
        if self.whitelist.is_some() && !whitelisted {
            return true;
        }
        if !whitelisted {
            if let Some(allowed) = self.methods.get(value) {
                return !allowed.iter().any(|m| m == method);
            }
        }
        false
    }
}

impl Plugin for ConsumerRestriction {
    fn phases(&self) -> Phases {
        Phases::ACCESS
    }

    fn access(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        let Some(value) = self.restrict_by.value(ctx) else {
            return respond(StatusCode::UNAUTHORIZED, &self.missing_body);
        };
        if self.blocks(value, req.method.as_str()) {
            respond(self.rejected_code, &self.rejected_body)
        } else {
            Flow::Continue
        }
    }
}

/// The registry entry.
pub struct ConsumerRestrictionSpec;

impl PluginSpec for ConsumerRestrictionSpec {
    fn name(&self) -> &'static str {
        NAME
    }

    fn priority(&self) -> i32 {
        PRIORITY
    }

    fn schema(&self) -> &'static Schema {
        schema()
    }

    fn check(&self, conf: &Value, _target: SchemaType) -> Result<(), String> {
        check(conf)
    }

    fn compile(&self, conf: &Value, _cx: &CompileCx<'_>) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(compile(conf)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::PluginSet;
    use crate::consumer::{index_for_tests, Consumer, ConsumerIndex, Credential};
    use crate::registry::{self, PluginError};
    use crate::testing::{self, Answer};
    use http::Request;

    fn reason(conf: Value) -> String {
        match registry::check(NAME, &conf, SchemaType::Route) {
            Err(PluginError::Invalid { reason, .. }) => reason,
            other => panic!("expected an invalid configuration, got {other:?}"),
        }
    }

    /// jack (key `jack`), rose (key `rose`, group `vip`), and no one else.
    fn consumers() -> ConsumerIndex {
        let mut index = index_for_tests(&[("key-auth", "jack", json!({"key": "jack"}))]).unwrap();
        let rose = Arc::new(Consumer {
            username: "rose".into(),
            custom_id: None,
            group_id: Some("vip".into()),
            plugins: Arc::new(PluginSet::default()),
        });
        let key = registry::find("key-auth")
            .unwrap()
            .compile_credential(&json!({"key": "rose"}))
            .unwrap()
            .unwrap();
        index.add_consumer(rose.clone());
        index.add(
            "key-auth",
            key.key,
            Credential {
                consumer: rose,
                id: Some("cred-1".into()),
                data: key.data,
            },
        );
        index
    }

    /// key-auth (with an anonymous-free route) plus consumer-restriction.
    async fn call(conf: Value, method: &str, key: Option<&str>) -> Answer {
        let set = testing::compile(&json!({"key-auth": {}, NAME: conf})).unwrap();
        let chain = testing::chain(Vec::new(), set, consumers());
        let mut req = testing::request("127.0.0.1", "/", &[]);
        *req.method_mut() = method.parse().unwrap();
        if let Some(key) = key {
            req.headers_mut().insert("apikey", key.parse().unwrap());
        }
        testing::send(chain, req).await
    }

    /// consumer-restriction alone, with the route and service set.
    async fn call_on(conf: Value, route: Option<&str>, service: Option<&str>) -> Answer {
        let set = testing::compile(&json!({ NAME: conf })).unwrap();
        let chain = testing::chain(Vec::new(), set, ConsumerIndex::default());
        let req: Request<()> = testing::request("127.0.0.1", "/", &[]);
        let mut ctx = chain.ctx_for(&req);
        ctx.route_id = route.map(Into::into);
        ctx.service_id = service.map(Into::into);
        let (parts, body) = chain.run(ctx, req).await.into_parts();
        let body = http_body_util::BodyExt::collect(body)
            .await
            .unwrap()
            .to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    fn is(answer: &Answer, status: u16, message: Option<&str>) {
        assert_eq!(answer.status.as_u16(), status, "{}", answer.body);
        if let Some(message) = message {
            assert_eq!(answer.json(), json!({ "message": message }));
        }
    }

    #[test]
    fn spec_defaults_and_schema_errors() {
        let spec = registry::find(NAME).unwrap();
        assert_eq!(spec.priority(), 2400);
        assert_eq!(spec.kind(), crate::plugin::PluginKind::Other);
        let conf = ConsumerRestrictionConf::deserialize(&json!({"whitelist": ["a"]})).unwrap();
        assert_eq!(conf.restrict_by, RestrictBy::ConsumerName);
        assert_eq!(conf.rejected_code, 403);
        assert!(conf.rejected_msg.is_none());
        let doc = schema().to_json();
        assert_eq!(doc["properties"]["type"]["default"], "consumer_name");
        assert_eq!(doc["properties"]["rejected_code"]["default"], 403);
        assert_eq!(doc["anyOf"].as_array().unwrap().len(), 3);

        assert_eq!(reason(json!({})), "object matches none of the required");
        assert_eq!(
            reason(json!({"rejected_msg": "x"})),
            "object matches none of the required"
        );
        assert_eq!(
            reason(json!({"whitelist": []})),
            "property \"whitelist\" validation failed: expect array to have at least 1 items"
        );
        assert_eq!(
            reason(json!({"blacklist": [1]})),
            "property \"blacklist\" validation failed: failed to validate item 1: wrong type: expected string, got number"
        );
        assert_eq!(
            reason(json!({"whitelist": ["a"], "type": "user"})),
            "property \"type\" validation failed: matches none of the enum values"
        );
        assert_eq!(
            reason(json!({"whitelist": ["a"], "rejected_code": 199})),
            "property \"rejected_code\" validation failed: expected 199 to be at least 200"
        );
        assert_eq!(
            reason(json!({"allowed_by_methods": [{"user": "a", "methods": ["FETCH"]}]})),
            "property \"allowed_by_methods\" validation failed: failed to validate item 1: property \"methods\" validation failed: failed to validate item 1: matches none of the enum values"
        );
        assert_eq!(
            reason(json!({"allowed_by_methods": [{"user": "a", "methods": []}]})),
            "property \"allowed_by_methods\" validation failed: failed to validate item 1: property \"methods\" validation failed: expect array to have at least 1 items"
        );
        assert!(reason(json!({"whitelist": ["a"], "rejected_code": 1000})).contains("at most 999"));
        // As APISIX's TEST 2: all three together are fine, even an empty
        // allowed_by_methods.
        assert!(registry::check(
            NAME,
            &json!({"whitelist": ["jack1"], "blacklist": ["jack2"], "allowed_by_methods": []}),
            SchemaType::Route
        )
        .is_ok());
    }

    #[tokio::test]
    async fn whitelist() {
        let conf = json!({"whitelist": ["jack"]});
        is(&call(conf.clone(), "GET", Some("jack")).await, 200, None);
        let answer = call(conf.clone(), "GET", Some("rose")).await;
        is(&answer, 403, Some("The consumer_name is forbidden."));
        assert_eq!(
            answer.body,
            "{\"message\":\"The consumer_name is forbidden.\"}\n"
        );
        // key-auth answers first when there is no key at all.
        is(
            &call(conf, "GET", None).await,
            401,
            Some("Missing API key in request"),
        );
    }

    #[tokio::test]
    async fn blacklist_with_code_and_message() {
        let conf = json!({"blacklist": ["jack"], "rejected_code": 429, "rejected_msg": "go away"});
        is(
            &call(conf.clone(), "GET", Some("jack")).await,
            429,
            Some("go away"),
        );
        is(&call(conf, "GET", Some("rose")).await, 200, None);
        // The blacklist wins over the whitelist.
        let conf = json!({"blacklist": ["jack"], "whitelist": ["jack"]});
        is(&call(conf, "GET", Some("jack")).await, 403, None);
    }

    #[tokio::test]
    async fn no_consumer_is_401() {
        let answer = call_on(json!({"whitelist": ["jack"]}), Some("1"), None).await;
        is(
            &answer,
            401,
            Some("The request is rejected, please check the consumer_name for this request"),
        );
        let answer = call_on(
            json!({"type": "service_id", "whitelist": ["s"]}),
            Some("1"),
            None,
        )
        .await;
        is(
            &answer,
            401,
            Some("The request is rejected, please check the service_id for this request"),
        );
    }

    #[tokio::test]
    async fn allowed_by_methods() {
        let conf = json!({"allowed_by_methods": [
            {"user": "jack", "methods": ["POST", "GET"]},
            {"user": "jack", "methods": ["DELETE"]},
            {"methods": ["PUT"]}
        ]});
        is(&call(conf.clone(), "GET", Some("jack")).await, 200, None);
        is(&call(conf.clone(), "POST", Some("jack")).await, 200, None);
        // The first entry for a user decides.
        is(&call(conf.clone(), "DELETE", Some("jack")).await, 403, None);
        // Users without an entry are not restricted.
        is(&call(conf, "DELETE", Some("rose")).await, 200, None);

        // Whitelisted users skip the method check; the others stay out.
        let conf = json!({
            "whitelist": ["rose"],
            "allowed_by_methods": [{"user": "rose", "methods": ["GET"]}, {"user": "jack", "methods": ["GET"]}]
        });
        is(&call(conf.clone(), "POST", Some("rose")).await, 200, None);
        is(&call(conf, "GET", Some("jack")).await, 403, None);

        // An empty list restricts no one.
        let conf = json!({"allowed_by_methods": []});
        is(&call(conf, "DELETE", Some("jack")).await, 200, None);
    }

    #[tokio::test]
    async fn by_route_service_and_group() {
        let conf = json!({"type": "route_id", "whitelist": ["1"]});
        is(&call_on(conf.clone(), Some("1"), None).await, 200, None);
        is(
            &call_on(conf, Some("2"), None).await,
            403,
            Some("The route_id is forbidden."),
        );

        let conf = json!({"type": "service_id", "blacklist": ["s1"], "rejected_code": 404});
        is(
            &call_on(conf.clone(), Some("1"), Some("s1")).await,
            404,
            Some("The service_id is forbidden."),
        );
        is(&call_on(conf, Some("1"), Some("s2")).await, 200, None);

        let conf = json!({"type": "consumer_group_id", "whitelist": ["vip"]});
        is(&call(conf.clone(), "GET", Some("rose")).await, 200, None);
        // jack has no group.
        is(
            &call(conf, "GET", Some("jack")).await,
            401,
            Some("The request is rejected, please check the consumer_group_id for this request"),
        );
        let conf =
            json!({"type": "consumer_group_id", "blacklist": ["vip"], "rejected_msg": "no vips"});
        is(&call(conf, "GET", Some("rose")).await, 403, Some("no vips"));
    }
}
