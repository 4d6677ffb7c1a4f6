//! `ua-restriction`: allow or deny requests by `User-Agent`.
//!
//! Mirrors APISIX 3.18's plugin of the same name (priority 2999, access
//! phase):
//!
//! ```json
//! {"denylist": ["curl/.*", "(Baiduspider)"], "message": "Not allowed", "bypass_missing": false}
//! ```
//!
//! Exactly one of `allowlist` and `denylist` (regexes, searched
//! unanchored in the trimmed `User-Agent`). A request without the header
//! is refused unless `bypass_missing`; with `allowlist` one matching rule
//! lets it through, with `denylist` one matching rule refuses it. A refusal
//! is 403 `{"message": message}` (default `Not allowed`). The rules are
//! compiled once, as one regex set.

use std::sync::{Arc, OnceLock};

use http::{header, request, StatusCode};
use regex::{Regex, RegexSet, RegexSetBuilder};
use serde_json::{json, Value};

use crate::ctx::Ctx;
use crate::plugin::{CompileCx, Flow, Phases, Plugin, PluginSpec, SchemaType};
use crate::registry::cached;
use crate::schema::Schema;

pub const NAME: &str = "ua-restriction";
pub const PRIORITY: i32 = 2999;
pub const DEFAULT_MESSAGE: &str = "Not allowed";
const REGEX_SIZE_LIMIT: usize = 1 << 20;

fn build_schema() -> Schema {
    let list = || Schema::array(Schema::string().min(1).done()).min(1).done();
    Schema::object()
        .prop(
            "bypass_missing",
            Schema::Custom(
                |v| Schema::Boolean.validate(v),
                || json!({"type": "boolean", "default": false}),
            ),
        )
        .prop("allowlist", list())
        .prop("denylist", list())
        .prop(
            "message",
            Schema::Custom(
                |v| Schema::string().min(1).max(1024).done().validate(v),
                || json!({"type": "string", "minLength": 1, "maxLength": 1024, "default": DEFAULT_MESSAGE}),
            ),
        )
        .one_of_required(&[&["allowlist"], &["denylist"]])
        .done()
}

/// The configuration schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

fn list_of<'a>(conf: &'a Value, name: &str) -> Option<Vec<&'a str>> {
    conf.get(name)
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
}

/// Schema check, then each rule must compile.
pub fn check(conf: &Value) -> Result<(), String> {
    schema().validate(conf)?;
    for name in ["allowlist", "denylist"] {
        for rule in list_of(conf, name).unwrap_or_default() {
            Regex::new(rule).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// The compiled plugin.
pub struct UaRestriction {
    rules: RegexSet,
    allow: bool,
    bypass_missing: bool,
    message: String,
}

pub fn compile(conf: &Value) -> Result<UaRestriction, String> {
    let (allow, rules) = match list_of(conf, "allowlist") {
        Some(list) => (true, list),
        None => (false, list_of(conf, "denylist").unwrap_or_default()),
    };
    let rules = RegexSetBuilder::new(rules)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| e.to_string())?;
    Ok(UaRestriction {
        rules,
        allow,
        bypass_missing: conf
            .get("bypass_missing")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        message: conf
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or(DEFAULT_MESSAGE)
            .to_string(),
    })
}

impl Plugin for UaRestriction {
    fn phases(&self) -> Phases {
        Phases::ACCESS
    }

    fn access(&self, _ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        let mut agents = req
            .headers
            .get_all(header::USER_AGENT)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .peekable();
        if agents.peek().is_none() {
            if self.bypass_missing {
                return Flow::Continue;
            }
            return Flow::message(StatusCode::FORBIDDEN, &self.message);
        }
        let mut matched = agents.map(|ua| self.rules.is_match(ua.trim()));
        let passed = if self.allow {
            matched.any(|m| m)
        } else {
            !matched.any(|m| m)
        };
        if passed {
            Flow::Continue
        } else {
            Flow::message(StatusCode::FORBIDDEN, &self.message)
        }
    }
}

pub struct UaRestrictionSpec;

impl PluginSpec for UaRestrictionSpec {
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
    use crate::consumer::ConsumerIndex;
    use crate::registry;
    use crate::testing;

    #[test]
    fn schema_errors() {
        assert_eq!(registry::find(NAME).unwrap().priority(), 2999);
        assert_eq!(
            testing::refusal(NAME, &json!({})),
            "value should match only one schema, but matches none"
        );
        assert!(
            testing::refusal(NAME, &json!({"allowlist": ["a"], "denylist": ["b"]}))
                .starts_with("value should match only one schema, but matches both")
        );
        assert!(testing::refusal(NAME, &json!({"denylist": ["("]})).contains("regex"));
    }

    async fn status(conf: Value, ua: Option<&str>) -> (u16, Value) {
        let set = testing::compile(&json!({ NAME: conf })).unwrap();
        let chain = testing::chain(Vec::new(), set, ConsumerIndex::default());
        let headers: Vec<(&str, &str)> = ua.map(|u| ("user-agent", u)).into_iter().collect();
        let a = testing::send(chain, testing::request("127.0.0.1", "/", &headers)).await;
        (a.status.as_u16(), a.json())
    }

    #[tokio::test]
    async fn allow_and_deny_lists() {
        let deny = json!({"denylist": ["curl/.*", "(Baiduspider)"]});
        assert_eq!(
            status(deny.clone(), Some("curl/8.0")).await,
            (403, json!({"message": "Not allowed"}))
        );
        assert_eq!(
            status(deny.clone(), Some("Mozilla/5.0 (Baiduspider)"))
                .await
                .0,
            403
        );
        assert_eq!(status(deny.clone(), Some("Mozilla/5.0")).await.0, 200);
        assert_eq!(status(deny, None).await.0, 403, "missing counts as refused");
        let allow =
            json!({"allowlist": ["^Mozilla/"], "bypass_missing": true, "message": "browsers only"});
        assert_eq!(status(allow.clone(), Some("  Mozilla/5.0 ")).await.0, 200);
        assert_eq!(
            status(allow.clone(), Some("Wget/1.0")).await,
            (403, json!({"message": "browsers only"}))
        );
        assert_eq!(status(allow, None).await.0, 200, "bypass_missing");
    }
}
