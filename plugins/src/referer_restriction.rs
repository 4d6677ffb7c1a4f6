//! `referer-restriction`: allow or deny requests by the host of their
//! `Referer`.
//!
//! Mirrors APISIX 3.18's plugin of the same name (priority 2990, access
//! phase):
//!
//! ```json
//! {"whitelist": ["*.example.com", "example.org"], "bypass_missing": false,
//!  "message": "Your referer host is not allowed"}
//! ```
//!
//! - Exactly one of `whitelist` and `blacklist`: hosts, or `*suffix`
//!   patterns (`*.xx.com` matches `www.xx.com` but not `xx.com`; `*`
//!   matches every host). Hosts compare case-sensitively, as APISIX's.
//! - The host is read from `Referer` as lua-resty-http parses a URL:
//!   `http://`, `https://` or `//`, then the host (a bracketed IPv6 address
//!   kept with its brackets). Anything else (`www.xx.com`, `ftp://x`) counts
//!   as no referer, which is refused unless `bypass_missing`.
//! - A refusal is 403 `{"message": message}`.

use std::sync::{Arc, OnceLock};

use http::{header, request, StatusCode};
use serde_json::{json, Value};

use crate::ctx::Ctx;
use crate::plugin::{CompileCx, Flow, Phases, Plugin, PluginSpec, SchemaType};
use crate::registry::cached;
use crate::schema::Schema;

pub const NAME: &str = "referer-restriction";
pub const PRIORITY: i32 = 2990;
pub const DEFAULT_MESSAGE: &str = "Your referer host is not allowed";

/// `^\*$|^\*?[0-9a-zA-Z-._\[\]:]+$`
fn host_pattern_ok(s: &str) -> bool {
    if s == "*" {
        return true;
    }
    let rest = s.strip_prefix('*').unwrap_or(s);
    !rest.is_empty()
        && rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '[' | ']' | ':'))
}

fn build_schema() -> Schema {
    let list = || {
        Schema::array(
            Schema::string()
                .pattern(r"^\*$|^\*?[0-9a-zA-Z-._\[\]:]+$", host_pattern_ok)
                .done(),
        )
        .min(1)
        .done()
    };
    Schema::object()
        .prop(
            "bypass_missing",
            Schema::Custom(
                |v| Schema::Boolean.validate(v),
                || json!({"type": "boolean", "default": false}),
            ),
        )
        .prop("whitelist", list())
        .prop("blacklist", list())
        .prop(
            "message",
            Schema::Custom(
                |v| Schema::string().min(1).max(1024).done().validate(v),
                || json!({"type": "string", "minLength": 1, "maxLength": 1024, "default": DEFAULT_MESSAGE}),
            ),
        )
        .one_of_required(&[&["whitelist"], &["blacklist"]])
        .done()
}

/// The configuration schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

/// The host of a `Referer`, or `None` when it is not a URL lua-resty-http
/// would parse.
fn referer_host(value: &str) -> Option<&str> {
    let rest = value
        .strip_prefix("http:")
        .or_else(|| value.strip_prefix("https:"))
        .unwrap_or(value);
    let rest = rest.strip_prefix("//")?;
    let host = if rest.starts_with('[') {
        let end = rest.find(']')?;
        &rest[..=end]
    } else {
        let end = rest.find([':', '/', '?', '[', ']']).unwrap_or(rest.len());
        &rest[..end]
    };
    let empty = host.is_empty() || (host.starts_with('[') && host.len() < 3);
    (!empty).then_some(host)
}

/// The compiled host list: exact hosts, and suffixes of `*` patterns.
struct Hosts {
    exact: std::collections::HashSet<String>,
    suffixes: Vec<String>,
}

impl Hosts {
    fn new(list: &[Value]) -> Hosts {
        let mut exact = std::collections::HashSet::new();
        let mut suffixes = Vec::new();
        for entry in list.iter().filter_map(Value::as_str) {
            match entry.strip_prefix('*') {
                Some(suffix) => suffixes.push(suffix.to_string()),
                None => {
                    exact.insert(entry.to_string());
                }
            }
        }
        Hosts { exact, suffixes }
    }

    fn matches(&self, host: &str) -> bool {
        self.exact.contains(host) || self.suffixes.iter().any(|s| host.ends_with(s.as_str()))
    }
}

/// The compiled plugin.
pub struct RefererRestriction {
    hosts: Hosts,
    allow: bool,
    bypass_missing: bool,
    message: String,
}

pub fn compile(conf: &Value) -> RefererRestriction {
    let list = |k: &str| conf.get(k).and_then(Value::as_array);
    let (allow, hosts) = match list("whitelist") {
        Some(l) => (true, l.as_slice()),
        None => (
            false,
            list("blacklist").map(Vec::as_slice).unwrap_or_default(),
        ),
    };
    RefererRestriction {
        hosts: Hosts::new(hosts),
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
    }
}

impl Plugin for RefererRestriction {
    fn phases(&self) -> Phases {
        Phases::ACCESS
    }

    fn access(&self, _ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        let host = req
            .headers
            .get(header::REFERER)
            .and_then(|v| v.to_str().ok())
            .and_then(referer_host);
        let blocked = match host {
            None => !self.bypass_missing,
            Some(h) => self.hosts.matches(h) != self.allow,
        };
        if blocked {
            Flow::message(StatusCode::FORBIDDEN, &self.message)
        } else {
            Flow::Continue
        }
    }
}

/// The registry entry.
pub struct RefererRestrictionSpec;

impl PluginSpec for RefererRestrictionSpec {
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
        schema().validate(conf)
    }

    fn compile(&self, conf: &Value, _cx: &CompileCx<'_>) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(compile(conf)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn schema_as_apisix() {
        assert!(testing::refusal(NAME, &json!({"whitelist": ["x.*"]})).contains("whitelist"));
        assert!(testing::refusal(NAME, &json!({"whitelist": ["~y.xn"]})).contains("whitelist"));
        assert_eq!(
            testing::refusal(
                NAME,
                &json!({"whitelist": ["a.com"], "blacklist": ["b.com"]})
            ),
            "value should match only one schema, but matches both schemas 1 and 2"
        );
        assert_eq!(
            testing::refusal(NAME, &json!({})),
            "value should match only one schema, but matches none"
        );
        assert!(schema()
            .validate(&json!({"whitelist": ["*", "*.xx.com", "[::1]:80"]}))
            .is_ok());
    }

    #[test]
    fn hosts_as_lua_resty_http_parses_them() {
        assert_eq!(referer_host("http://www.xx.com/a?b"), Some("www.xx.com"));
        assert_eq!(referer_host("https://yy.com:8443/am"), Some("yy.com"));
        assert_eq!(referer_host("//yy.com"), Some("yy.com"));
        assert_eq!(referer_host("http://[::1]:80/"), Some("[::1]"));
        for bad in ["www.yy.com", "ftp://x", "HTTP://x", "", "http://"] {
            assert_eq!(referer_host(bad), None, "{bad}");
        }
    }

    fn verdict(conf: Value, referer: Option<&str>) -> bool {
        let plugin = compile(&conf);
        let headers: Vec<(&str, &str)> = referer.map(|r| ("referer", r)).into_iter().collect();
        let (mut parts, _) = testing::request("127.0.0.1", "/", &headers).into_parts();
        matches!(
            plugin.access(&mut testing::ctx("127.0.0.1"), &mut parts),
            Flow::Continue
        )
    }

    #[test]
    fn whitelist_blacklist_and_missing() {
        let white = json!({"whitelist": ["*.xx.com", "yy.com"]});
        assert!(verdict(white.clone(), Some("http://www.xx.com")));
        assert!(verdict(white.clone(), Some("https://yy.com/am")));
        assert!(!verdict(white.clone(), Some("https://www.yy.com/am")));
        assert!(!verdict(white.clone(), Some("http://xx.com")));
        assert!(!verdict(white.clone(), None));
        let bypass = json!({"whitelist": ["*.xx.com"], "bypass_missing": true});
        assert!(verdict(bypass.clone(), None));
        assert!(verdict(bypass, Some("www.yy.com")));
        let black = json!({"blacklist": ["*.xx.com"]});
        assert!(!verdict(black.clone(), Some("http://www.xx.com")));
        assert!(verdict(black.clone(), Some("https://yy.com")));
        assert!(!verdict(black, None));
    }
}
