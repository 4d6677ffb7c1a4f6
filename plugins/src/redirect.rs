//! `redirect`: answer with a redirect instead of proxying.
//!
//! Mirrors APISIX 3.18's plugin of the same name (priority 900, rewrite
//! phase). Exactly one of:
//!
//! - `uri`: a template with `$var`s (`"/new$uri"`, `"https://x$request_uri"`);
//! - `regex_uri`: `[regex, replacement]` applied to `$uri` (first match,
//!   `$1` for captures); a request it does not match is proxied as usual;
//! - `http_to_https: true`: a plain-HTTP request goes to
//!   `https://$host[:port]$request_uri` with 301 (GET, HEAD) or 308
//!   (anything else, so the method and body are kept); the port is
//!   `plugin_attr.redirect.https_port`, else the HTTPS listener's, and is
//!   left out when it is 443.
//!
//! `ret_code` (default 302) is the status for `uri` and `regex_uri`;
//! `encode_uri` percent-encodes the new path as nginx's `ngx_escape_uri`;
//! `append_query_string` adds the request's query (not with
//! `http_to_https`, which keeps it anyway). The `Location` is sent as
//! built: a relative one stays relative.

use std::sync::{Arc, OnceLock};

use http::{header, request, HeaderValue, Method, StatusCode};
use regex::Regex;
use serde_json::{json, Value};

use crate::ctx::Ctx;
use crate::plugin::{CompileCx, Flow, Phases, Plugin, PluginSpec, SchemaType};
use crate::registry::cached;
use crate::schema::Schema;
use crate::template::{regex_error, Escape, Replacement, Template};

pub const NAME: &str = "redirect";
pub const PRIORITY: i32 = 900;
pub const DEFAULT_RET_CODE: u16 = 302;
/// Key the gateway adds to `plugin_attr.redirect` with its HTTPS
/// listener's port, used when `https_port` is not configured.
pub const LISTENER_PORT_ATTR: &str = "_https_listen_port";
const APPEND_ERROR: &str =
    "only one of `http_to_https` and `append_query_string` can be configured.";

fn build_schema() -> Schema {
    Schema::object()
        .prop(
            "ret_code",
            Schema::Custom(
                |v| Schema::integer().min(200.0).int().validate(v),
                || json!({"type": "integer", "minimum": 200, "default": 302}),
            ),
        )
        .prop("uri", Schema::string().min(2).done())
        .prop(
            "regex_uri",
            Schema::array(Schema::string().done()).min(2).max(2).done(),
        )
        .prop("http_to_https", Schema::Boolean)
        .prop(
            "encode_uri",
            Schema::Custom(
                |v| Schema::Boolean.validate(v),
                || json!({"type": "boolean", "default": false}),
            ),
        )
        .prop(
            "append_query_string",
            Schema::Custom(
                |v| Schema::Boolean.validate(v),
                || json!({"type": "boolean", "default": false}),
            ),
        )
        .one_of_required(&[&["uri"], &["regex_uri"], &["http_to_https"]])
        .done()
}

/// The configuration schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

/// Schema check, then APISIX's own checks.
pub fn check(conf: &Value) -> Result<(), String> {
    schema().validate(conf)?;
    if let Some([regex, replacement]) = conf
        .get("regex_uri")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
    {
        compile_regex_uri(regex, replacement)?;
    }
    let flag = |name: &str| conf.get(name).and_then(Value::as_bool).unwrap_or(false);
    if flag("http_to_https") && flag("append_query_string") {
        return Err(APPEND_ERROR.into());
    }
    Ok(())
}

fn compile_regex_uri(regex: &Value, replacement: &Value) -> Result<(Regex, Replacement), String> {
    let (Some(pattern), Some(rep)) = (regex.as_str(), replacement.as_str()) else {
        return Err("regex_uri must hold two strings".into());
    };
    let invalid = |e: String| format!("invalid regex_uri ({pattern}, {rep}), err:{e}");
    let re = Regex::new(pattern).map_err(|e| invalid(regex_error(pattern, &e)))?;
    let replacement = Replacement::parse(rep).map_err(invalid)?;
    Ok((re, replacement))
}

enum Target {
    Uri(Template),
    Regex(Regex, Replacement),
    Https,
}

/// The compiled plugin.
pub struct Redirect {
    target: Target,
    status: StatusCode,
    encode_uri: bool,
    append_query: bool,
    /// `:port` for http_to_https, or empty.
    https_port: String,
}

pub fn compile(conf: &Value, attr: Option<&Value>) -> Result<Redirect, String> {
    let status_code = conf
        .get("ret_code")
        .and_then(Value::as_u64)
        .unwrap_or(u64::from(DEFAULT_RET_CODE));
    let status = u16::try_from(status_code)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or_else(|| format!("ret_code {status_code} is not an HTTP status"))?;
    let target = if let Some(uri) = conf.get("uri").and_then(Value::as_str) {
        Target::Uri(Template::new(uri))
    } else if let Some([regex, replacement]) = conf
        .get("regex_uri")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
    {
        let (re, rep) = compile_regex_uri(regex, replacement)?;
        Target::Regex(re, rep)
    } else if conf.get("http_to_https").and_then(Value::as_bool) == Some(true) {
        Target::Https
    } else {
        // `http_to_https: false` alone: APISIX does nothing.
        Target::Uri(Template::new(""))
    };
    let port = attr
        .and_then(|a| a.get("https_port").or_else(|| a.get(LISTENER_PORT_ATTR)))
        .and_then(Value::as_i64)
        .filter(|p| (1..=65535).contains(p) && *p != 443);
    let flag = |name: &str| conf.get(name).and_then(Value::as_bool).unwrap_or(false);
    Ok(Redirect {
        target,
        status,
        encode_uri: flag("encode_uri"),
        append_query: flag("append_query_string"),
        https_port: port.map(|p| format!(":{p}")).unwrap_or_default(),
    })
}

/// nginx's `ngx_escape_uri` (NGX_ESCAPE_URI) on the part before the first
/// `?`: controls, space, `#`, `%`, `?` and bytes from 0x7F up become %XX.
pub fn escape_uri(text: &str) -> String {
    let (path, rest) = match text.find('?') {
        Some(i) => text.split_at(i),
        None => (text, ""),
    };
    let mut out = String::with_capacity(text.len());
    for &b in path.as_bytes() {
        if b <= 0x20 || b >= 0x7f || matches!(b, b'#' | b'%' | b'?') {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(b as char);
        }
    }
    out.push_str(rest);
    out
}

impl Redirect {
    /// The `Location` and status for this request, or `None` to proxy it.
    fn location(&self, ctx: &Ctx, req: &request::Parts) -> Option<(String, StatusCode)> {
        let mut status = self.status;
        let mut location = match &self.target {
            Target::Https => {
                if ctx.conn.scheme == "https" {
                    return None;
                }
                let host = ctx.var(Some(req), "host").unwrap_or_default();
                let request_uri = req.uri.path_and_query().map_or("/", |p| p.as_str());
                status = if req.method == Method::GET || req.method == Method::HEAD {
                    StatusCode::MOVED_PERMANENTLY
                } else {
                    StatusCode::PERMANENT_REDIRECT
                };
                format!("https://{host}{}{request_uri}", self.https_port)
            }
            Target::Uri(t) => {
                let text = t.render(&ctx.vars(Some(req)), &[], Escape::None).text;
                if text.is_empty() {
                    return None;
                }
                text
            }
            Target::Regex(re, rep) => {
                let uri = ctx.var(Some(req), "uri").unwrap_or_default();
                let caps = re.captures(&uri)?;
                let mut out = String::with_capacity(uri.len());
                let whole = caps.get(0)?;
                out.push_str(&uri[..whole.start()]);
                rep.expand_str(&caps, &mut out);
                out.push_str(&uri[whole.end()..]);
                out
            }
        };
        if self.encode_uri {
            location = escape_uri(&location);
        }
        if self.append_query {
            if let Some(q) = req.uri.query().filter(|q| !q.is_empty()) {
                location.push(if location.contains('?') { '&' } else { '?' });
                location.push_str(q);
            }
        }
        Some((location, status))
    }
}

impl Plugin for Redirect {
    fn phases(&self) -> Phases {
        Phases::REWRITE
    }

    fn rewrite(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        let Some((location, status)) = self.location(ctx, req) else {
            return Flow::Continue;
        };
        let Ok(value) = HeaderValue::from_str(&location) else {
            tracing::warn!(plugin = NAME, %location, "redirect target is not a valid header value");
            return Flow::status(StatusCode::INTERNAL_SERVER_ERROR);
        };
        let mut resp = crate::html_page(status);
        resp.headers_mut().insert(header::LOCATION, value);
        Flow::Respond(resp)
    }
}

pub struct RedirectSpec;

impl PluginSpec for RedirectSpec {
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

    fn compile(&self, conf: &Value, cx: &CompileCx<'_>) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(compile(conf, cx.attr)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::ConsumerIndex;
    use crate::registry;
    use crate::testing::{self, Answer};

    fn reason(conf: Value) -> String {
        testing::refusal(NAME, &conf)
    }

    /// As the gateway calls it: `$host` lower-cased without its port, `$uri`
    /// the decoded path.
    async fn call(conf: Value, method: &str, uri: &str) -> Answer {
        let set = testing::compile(&json!({ NAME: conf })).unwrap();
        let chain = testing::chain(Vec::new(), set, ConsumerIndex::default());
        let mut req = testing::request("127.0.0.1", uri, &[("host", "Foo.com:9080")]);
        *req.method_mut() = method.parse().unwrap();
        let mut ctx = chain.ctx_for(&req);
        ctx.host = Some("foo.com".into());
        ctx.path = Some(req.uri().path().replace("%20", " ").into());
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

    fn location(a: &Answer) -> &str {
        a.headers
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    #[test]
    fn schema_rules() {
        assert_eq!(registry::find(NAME).unwrap().priority(), 900);
        assert_eq!(
            reason(json!({})),
            "value should match only one schema, but matches none"
        );
        assert!(reason(json!({"uri": "/a$uri", "http_to_https": true}))
            .starts_with("value should match only one schema, but matches both"));
        assert_eq!(
            reason(json!({"http_to_https": true, "append_query_string": true})),
            APPEND_ERROR
        );
        assert_eq!(
            reason(json!({"uri": "/"})),
            "property \"uri\" validation failed: string too short, expected at least 2, got 1"
        );
        assert_eq!(
            reason(json!({"uri": "/a", "ret_code": 100})),
            "property \"ret_code\" validation failed: expected 100 to be at least 200"
        );
        assert!(reason(json!({"regex_uri": ["(", "/x"]}))
            .starts_with("invalid regex_uri ((, /x), err:"));
    }

    #[tokio::test]
    async fn uri_templates_and_codes() {
        let a = call(json!({"uri": "/dest$uri"}), "GET", "/p/q?a=1").await;
        assert_eq!(a.status, 302);
        assert_eq!(location(&a), "/dest/p/q");
        let b = call(
            json!({"uri": "/moved$request_uri", "ret_code": 301}),
            "GET",
            "/p?a=1&b=2",
        )
        .await;
        assert_eq!(b.status, 301);
        assert_eq!(location(&b), "/moved/p?a=1&b=2");
        let c = call(
            json!({"uri": "$uri?type=string", "append_query_string": true}),
            "GET",
            "/hello?name=json",
        )
        .await;
        assert_eq!(location(&c), "/hello?type=string&name=json");
        let d = call(json!({"uri": "\\$uri/foo$uri"}), "GET", "/hello").await;
        assert_eq!(location(&d), "\\$uri/foo/hello");
    }

    #[tokio::test]
    async fn regex_uri_matches_or_proxies() {
        let conf = json!({"regex_uri": ["^/test/(.*)", "http://test.com/${1}"], "ret_code": 301});
        let a = call(conf.clone(), "GET", "/test/1").await;
        assert_eq!(
            (a.status.as_u16(), location(&a)),
            (301, "http://test.com/1")
        );
        let b = call(conf, "GET", "/hello").await;
        assert_eq!(b.status, 200);
        assert!(b.json()["uri"].is_string(), "proxied");
        let enc = call(
            json!({"regex_uri": ["^/test/(.*)", "http://test.com/${1}"], "encode_uri": true}),
            "GET",
            "/test/with%20space",
        )
        .await;
        assert_eq!(location(&enc), "http://test.com/with%20space");
    }

    #[tokio::test]
    async fn http_to_https_keeps_the_method_safe() {
        let get = call(json!({"http_to_https": true}), "GET", "/hello?x=1").await;
        assert_eq!(get.status, 301);
        assert_eq!(location(&get), "https://foo.com/hello?x=1");
        let post = call(
            json!({"http_to_https": true, "ret_code": 302}),
            "POST",
            "/hello",
        )
        .await;
        assert_eq!(post.status, 308);
        let head = call(json!({"http_to_https": true}), "HEAD", "/").await;
        assert_eq!(head.status, 301);
    }

    #[test]
    fn https_port_from_attr() {
        let r = compile(
            &json!({"http_to_https": true}),
            Some(&json!({"https_port": 8443})),
        )
        .unwrap();
        assert_eq!(r.https_port, ":8443");
        let r = compile(
            &json!({"http_to_https": true}),
            Some(&json!({LISTENER_PORT_ATTR: 9445})),
        )
        .unwrap();
        assert_eq!(r.https_port, ":9445");
        let r = compile(
            &json!({"http_to_https": true}),
            Some(&json!({"https_port": 443})),
        )
        .unwrap();
        assert_eq!(r.https_port, "");
    }

    #[test]
    fn nginx_uri_escaping() {
        assert_eq!(
            escape_uri("/with space/ä#x?q=a b"),
            "/with%20space/%C3%A4%23x?q=a b"
        );
        assert_eq!(escape_uri("http://h/a:b&c=d"), "http://h/a:b&c=d");
    }
}
