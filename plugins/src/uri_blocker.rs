//! `uri-blocker`: refuse requests whose URI matches a regex.
//!
//! Mirrors APISIX 3.18's plugin of the same name (priority 2900, rewrite
//! phase):
//!
//! ```json
//! {"block_rules": ["^/admin", "\\.php$"], "rejected_code": 403,
//!  "rejected_msg": "blocked", "case_insensitive": false}
//! ```
//!
//! The rules (unanchored unless they say otherwise) are searched in
//! `$request_uri`, the path and query as the client sent them. A match is
//! answered `rejected_code` (default 403), with `{"error_msg":
//! rejected_msg}` when set. The rules are compiled once, as one regex.

use std::sync::{Arc, OnceLock};

use http::request;
use regex::{Regex, RegexBuilder};
use serde_json::{json, Value};

use crate::ctx::Ctx;
use crate::plugin::{CompileCx, Flow, Phases, Plugin, PluginSpec, SchemaType};
use crate::registry::cached;
use crate::rejection::Rejection;
use crate::schema::Schema;

pub const NAME: &str = "uri-blocker";
pub const PRIORITY: i32 = 2900;
/// Compiled-size cap for the rules (they come from the Admin API).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

fn build_schema() -> Schema {
    Schema::object()
        .prop(
            "block_rules",
            Schema::array(Schema::string().min(1).max(4096).done())
                .unique()
                .done(),
        )
        .prop(
            "rejected_code",
            Schema::Custom(
                |v| Schema::integer().min(200.0).int().validate(v),
                || json!({"type": "integer", "minimum": 200, "default": 403}),
            ),
        )
        .prop("rejected_msg", Schema::string().min(1).done())
        .prop(
            "case_insensitive",
            Schema::Custom(
                |v| Schema::Boolean.validate(v),
                || json!({"type": "boolean", "default": false}),
            ),
        )
        .required(&["block_rules"])
        .done()
}

/// The configuration schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

fn rules_of(conf: &Value) -> Vec<&str> {
    conf.get("block_rules")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The rules as one regex (`None` for an empty list, which blocks nothing).
fn compile_rules(rules: &[&str], case_insensitive: bool) -> Result<Option<Regex>, String> {
    if rules.is_empty() {
        return Ok(None);
    }
    let joined = rules
        .iter()
        .map(|r| format!("(?:{r})"))
        .collect::<Vec<_>>()
        .join("|");
    RegexBuilder::new(&joined)
        .case_insensitive(case_insensitive)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map(Some)
        .map_err(|e| e.to_string())
}

/// Schema check, then each rule must compile.
pub fn check(conf: &Value) -> Result<(), String> {
    schema().validate(conf)?;
    for rule in rules_of(conf) {
        Regex::new(rule).map_err(|e| e.to_string())?;
    }
    compile_rules(&rules_of(conf), false).map(|_| ())
}

/// The compiled plugin.
pub struct UriBlocker {
    rules: Option<Regex>,
    rejection: Rejection,
}

pub fn compile(conf: &Value) -> Result<UriBlocker, String> {
    let case_insensitive = conf
        .get("case_insensitive")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(UriBlocker {
        rules: compile_rules(&rules_of(conf), case_insensitive)?,
        rejection: Rejection::from_conf(conf, 403)?,
    })
}

impl Plugin for UriBlocker {
    fn phases(&self) -> Phases {
        Phases::REWRITE
    }

    fn rewrite(&self, _ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        let Some(rules) = &self.rules else {
            return Flow::Continue;
        };
        let request_uri = req.uri.path_and_query().map_or("/", |p| p.as_str());
        if rules.is_match(request_uri) {
            return Flow::Respond(self.rejection.response());
        }
        Flow::Continue
    }
}

pub struct UriBlockerSpec;

impl PluginSpec for UriBlockerSpec {
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
        assert_eq!(registry::find(NAME).unwrap().priority(), 2900);
        assert_eq!(
            testing::refusal(NAME, &json!({})),
            "property \"block_rules\" is required"
        );
        assert!(testing::refusal(NAME, &json!({"block_rules": ["("]})).contains("regex"));
        assert!(testing::refusal(NAME, &json!({"block_rules": ["a", "a"]})).contains("block_rules"));
    }

    #[tokio::test]
    async fn blocks_matching_uris() {
        let set = testing::compile(&json!({NAME: {"block_rules": ["^/admin", "\\.php$", "token="], "case_insensitive": true, "rejected_msg": "blocked"}})).unwrap();
        let chain = testing::chain(Vec::new(), set, ConsumerIndex::default());
        let status = |uri: &'static str| {
            let chain = chain.clone();
            async move { testing::send(chain, testing::request("127.0.0.1", uri, &[])).await }
        };
        let a = status("/ADMIN/users").await;
        assert_eq!(a.status, 403);
        assert_eq!(a.json(), json!({"error_msg": "blocked"}));
        assert_eq!(status("/index.php").await.status, 403);
        assert_eq!(status("/x?token=1").await.status, 403, "the query counts");
        assert_eq!(status("/index.html").await.status, 200);
        assert_eq!(status("/user/admin").await.status, 200);
    }
}
