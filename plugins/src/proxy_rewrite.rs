//! `proxy-rewrite`: change what the upstream is sent: URI, Host, method and
//! request headers.
//!
//! Mirrors APISIX 3.18's plugin of the same name (priority 1008, rewrite
//! phase):
//!
//! ```json
//! {"regex_uri": ["^/api/(.*)", "/v2/$1"], "host": "backend.local",
//!  "method": "POST",
//!  "headers": {"add": {"X-Tag": "$remote_addr"}, "set": {"X-Api": "v2"},
//!              "remove": ["Cookie"]}}
//! ```
//!
//! - `uri` (starts with `/`, may hold `$var`s; a `?` inside a variable's
//!   value is escaped to `%3F`) replaces the path; the client's query
//!   string is appended (with `&` when `uri` has its own).
//! - `regex_uri`: `[regex, replacement, ...]` pairs tried in order on
//!   `$uri`; the first that matches rewrites it once (`$1`, `${1}`, `$0`).
//!   Lower priority than `uri`.
//! - Either way (and even with neither: APISIX always rebuilds it) the new
//!   path is percent-encoded as nginx's `ngx_escape_uri` does (space, `#`,
//!   `%`, `?`, controls and non-ASCII), which is why a `$uri` that had a
//!   `%3F` goes up as `%253F`, byte for byte like APISIX.
//! - `use_real_request_uri_unsafe`: work on the raw request URI (query
//!   included) and send the result without any encoding.
//! - `host`: the `Host` sent upstream (an upstream's `pass_host: node` or
//!   `rewrite` still wins, as in APISIX).
//! - `method`: one of nginx's methods.
//! - `headers`: `add` (append), `set` (replace), `remove`, applied in that
//!   order; values are strings, numbers or arrays of them (one header line
//!   each) and may use `$var`s and the `regex_uri` captures `$1`. A plain
//!   object of `name: value` is `set`.
//!
//! Regexes, templates and fixed header values are compiled once.

use std::sync::{Arc, OnceLock};

use http::header::{HeaderName, HOST};
use http::uri::PathAndQuery;
use http::{request, HeaderValue, Method, Uri};
use regex::Regex;
use serde_json::{json, Map, Value};

use crate::ctx::{Ctx, OriginalHost};
use crate::plugin::{CompileCx, Flow, Phases, Plugin, PluginSpec, SchemaType};
use crate::registry::cached;
use crate::schema::{type_name, Schema};
use crate::template::{regex_error, scalar_text, Escape, Replacement, Template};

pub const NAME: &str = "proxy-rewrite";
pub const PRIORITY: i32 = 1008;

/// The methods `method` accepts (nginx's `ngx.HTTP_*`).
pub const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "MKCOL", "COPY", "MOVE", "PROPFIND", "LOCK",
    "UNLOCK", "PATCH", "TRACE",
];

const URI_PATTERN: &str = "^\\/.*";
const HOST_PATTERN: &str = "^[0-9a-zA-Z-.]+(:\\d{1,5})?$";
const NAME_PATTERN: &str = "^[^:]+$";

fn is_host(s: &str) -> bool {
    let (host, port) = match s.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && port.is_none_or(|p| (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
}

/// A key `^[^:]+$` applies to.
fn is_header_key(k: &str) -> bool {
    !k.is_empty() && !k.contains(':')
}

fn is_scalar(v: &Value) -> bool {
    v.is_string() || v.is_number()
}

fn is_scalar_or_list(v: &Value) -> bool {
    is_scalar(v)
        || v.as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(is_scalar))
}

/// An object with at least one property whose `^[^:]+$` keys hold values
/// `ok` accepts (JSON schema `patternProperties`).
fn pattern_map(v: &Value, ok: fn(&Value) -> bool) -> Result<(), String> {
    let Some(obj) = v.as_object() else {
        return Err(format!("wrong type: expected object, got {}", type_name(v)));
    };
    for (k, val) in obj {
        if is_header_key(k) && !ok(val) {
            return Err(format!(
                "failed to validate {k} (matching \"{NAME_PATTERN}\"): value should match only one schema, but matches none"
            ));
        }
    }
    if obj.is_empty() {
        return Err("expect object to have at least 1 properties".into());
    }
    Ok(())
}

fn scalar_doc() -> Value {
    json!({"oneOf": [{"type": "string"}, {"type": "number"}]})
}

fn list_map_doc() -> Value {
    json!({"type": "object", "minProperties": 1, "patternProperties": {NAME_PATTERN: {"oneOf": [
        {"type": "string"}, {"type": "number"},
        {"type": "array", "minItems": 1, "items": scalar_doc()},
    ]}}})
}

fn flat_map_doc() -> Value {
    json!({"type": "object", "minProperties": 1,
           "patternProperties": {NAME_PATTERN: scalar_doc()}})
}

fn build_schema() -> Schema {
    let list_map = || Schema::Custom(|v| pattern_map(v, is_scalar_or_list), list_map_doc);
    let new_form = Schema::object()
        .min_properties(1)
        .no_additional()
        .prop("add", list_map())
        .prop("set", list_map())
        .prop(
            "remove",
            Schema::array(Schema::string().pattern(NAME_PATTERN, is_header_key).done())
                .min(1)
                .done(),
        )
        .done();
    let flat_form = Schema::Custom(|v| pattern_map(v, is_scalar), flat_map_doc);
    Schema::object()
        .min_properties(1)
        .prop(
            "uri",
            Schema::string()
                .min(1)
                .max(4096)
                .pattern(URI_PATTERN, |s| s.starts_with('/'))
                .done(),
        )
        .prop("method", Schema::string().enumerated(METHODS).done())
        .prop(
            "regex_uri",
            Schema::array(Schema::string().done()).min(2).done(),
        )
        .prop(
            "host",
            Schema::string().pattern(HOST_PATTERN, is_host).done(),
        )
        .prop("headers", Schema::OneOf(vec![new_form, flat_form]))
        .prop("use_real_request_uri_unsafe", Schema::Boolean)
        .done()
}

/// The configuration schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

/// APISIX's `is_new_headers_conf`: `add`, `set` or `remove` hold a table.
fn is_new_headers_conf(headers: &Map<String, Value>) -> bool {
    ["add", "set", "remove"]
        .iter()
        .any(|k| matches!(headers.get(*k), Some(Value::Object(_) | Value::Array(_))))
}

/// APISIX's `check_set_headers` for the plain-object form.
fn check_set_headers(headers: &Map<String, Value>) -> Result<(), String> {
    for (field, value) in headers {
        if !is_scalar(value) {
            return Err("invalid type as header value".into());
        }
        if field.is_empty() {
            return Err("invalid field length in header".into());
        }
        if !field.bytes().all(|b| b > 32 && b < 127 && b != b':') {
            return Err("invalid field character in header".into());
        }
        if let Some(s) = value.as_str() {
            if s.bytes().any(|b| !(32..127).contains(&b)) {
                return Err("invalid value character in header".into());
            }
        }
    }
    Ok(())
}

/// Compiles `regex_uri` pairs, with APISIX's error wording.
fn compile_regex_uri(list: &[Value]) -> Result<Vec<(Regex, Replacement)>, String> {
    if list.len() % 2 == 1 {
        return Err("The length of regex_uri should be an even number".into());
    }
    list.chunks(2)
        .map(|pair| {
            let pattern = pair[0].as_str().unwrap_or_default();
            let replacement = pair[1].as_str().unwrap_or_default();
            let invalid = |e: String| format!("invalid regex_uri({pattern}, {replacement}): {e}");
            let re = Regex::new(pattern).map_err(|e| invalid(regex_error(pattern, &e)))?;
            let rep = Replacement::parse(replacement).map_err(invalid)?;
            Ok((re, rep))
        })
        .collect()
}

/// Schema check, then the semantic checks APISIX runs after it.
pub fn check(conf: &Value) -> Result<(), String> {
    schema().validate(conf)?;
    if let Some(list) = conf.get("regex_uri").and_then(Value::as_array) {
        compile_regex_uri(list)?;
    }
    if let Some(headers) = conf.get("headers").and_then(Value::as_object) {
        if !is_new_headers_conf(headers) {
            check_set_headers(headers)?;
        }
    }
    Ok(())
}

/// A header value: fixed, or a template filled in per request.
#[derive(Debug)]
enum Val {
    Fixed(HeaderValue),
    Dyn(Template),
}

impl Val {
    fn compile(name: &str, text: &str) -> Result<Val, String> {
        let t = Template::with_captures(text);
        match t.literal() {
            Some(lit) => HeaderValue::from_str(lit)
                .map(Val::Fixed)
                .map_err(|_| format!("invalid value of header {name}: {text:?}")),
            None => Ok(Val::Dyn(t)),
        }
    }

    fn value(
        &self,
        ctx: &Ctx,
        req: &request::Parts,
        caps: &[Option<String>],
    ) -> Option<HeaderValue> {
        match self {
            Val::Fixed(v) => Some(v.clone()),
            Val::Dyn(t) => {
                let text = t.render(&ctx.vars(Some(req)), caps, Escape::None).text;
                match HeaderValue::try_from(text) {
                    Ok(v) => Some(v),
                    Err(_) => {
                        tracing::debug!(
                            plugin = NAME,
                            "header value with invalid characters skipped"
                        );
                        None
                    }
                }
            }
        }
    }

    fn uses_captures(&self) -> bool {
        matches!(self, Val::Dyn(t) if t.uses_captures())
    }
}

/// `headers`, compiled.
#[derive(Debug, Default)]
struct HeaderOps {
    add: Vec<(HeaderName, Vec<Val>)>,
    set: Vec<(HeaderName, Vec<Val>)>,
    remove: Vec<HeaderName>,
}

fn header_name(name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("invalid header name {name:?}"))
}

fn compile_value_map(map: Option<&Value>) -> Result<Vec<(HeaderName, Vec<Val>)>, String> {
    let Some(map) = map.and_then(Value::as_object) else {
        return Ok(Vec::new());
    };
    map.iter()
        .map(|(name, v)| {
            let texts: Vec<String> = match v {
                Value::Array(items) => items.iter().filter_map(scalar_text).collect(),
                other => scalar_text(other).into_iter().collect(),
            };
            let vals = texts
                .iter()
                .map(|t| Val::compile(name, t))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((header_name(name)?, vals))
        })
        .collect()
}

impl HeaderOps {
    fn compile(headers: &Map<String, Value>) -> Result<HeaderOps, String> {
        if !is_new_headers_conf(headers) {
            let flat = Value::Object(headers.clone());
            return Ok(HeaderOps {
                set: compile_value_map(Some(&flat))?,
                ..HeaderOps::default()
            });
        }
        let remove = headers
            .get("remove")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(Value::as_str)
                    .map(header_name)
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        Ok(HeaderOps {
            add: compile_value_map(headers.get("add"))?,
            set: compile_value_map(headers.get("set"))?,
            remove,
        })
    }

    fn uses_captures(&self) -> bool {
        self.add
            .iter()
            .chain(&self.set)
            .any(|(_, vals)| vals.iter().any(Val::uses_captures))
    }

    fn apply(&self, ctx: &Ctx, req: &mut request::Parts, caps: &[Option<String>]) {
        for (name, vals) in &self.add {
            for v in vals {
                if let Some(value) = v.value(ctx, req, caps) {
                    req.headers.append(name.clone(), value);
                }
            }
        }
        for (name, vals) in &self.set {
            let mut first = true;
            for v in vals {
                if let Some(value) = v.value(ctx, req, caps) {
                    if first {
                        req.headers.insert(name.clone(), value);
                        first = false;
                    } else {
                        req.headers.append(name.clone(), value);
                    }
                }
            }
        }
        for name in &self.remove {
            req.headers.remove(name);
        }
    }
}

/// The compiled plugin.
#[derive(Debug)]
pub struct ProxyRewrite {
    uri: Option<Template>,
    regex_uri: Vec<(Regex, Replacement)>,
    host: Option<HeaderValue>,
    method: Option<Method>,
    headers: Option<HeaderOps>,
    unsafe_uri: bool,
    /// Header values use `regex_uri` captures: keep them.
    keep_captures: bool,
}

/// Compiles a checked configuration.
pub fn compile(conf: &Value) -> Result<ProxyRewrite, String> {
    let regex_uri = match conf.get("regex_uri").and_then(Value::as_array) {
        Some(list) => compile_regex_uri(list)?,
        None => Vec::new(),
    };
    let host = conf
        .get("host")
        .and_then(Value::as_str)
        .map(|h| HeaderValue::from_str(h).map_err(|_| format!("invalid host {h:?}")))
        .transpose()?;
    let method = conf
        .get("method")
        .and_then(Value::as_str)
        .map(|m| Method::from_bytes(m.as_bytes()).map_err(|_| format!("invalid method {m:?}")))
        .transpose()?;
    let headers = conf
        .get("headers")
        .and_then(Value::as_object)
        .map(HeaderOps::compile)
        .transpose()?;
    let keep_captures =
        !regex_uri.is_empty() && headers.as_ref().is_some_and(HeaderOps::uses_captures);
    Ok(ProxyRewrite {
        uri: conf.get("uri").and_then(Value::as_str).map(Template::new),
        regex_uri,
        host,
        method,
        headers,
        unsafe_uri: conf
            .get("use_real_request_uri_unsafe")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        keep_captures,
    })
}

/// nginx's `ngx_escape_uri(NGX_ESCAPE_URI)`: space, `#`, `%`, `?`,
/// controls, DEL and non-ASCII bytes as `%XX`.
fn nginx_escape(s: &str, out: &mut String) {
    escape_into(s, out, |b| {
        b <= b' ' || matches!(b, b'#' | b'%' | b'?') || b >= 0x7f
    });
}

/// APISIX's `escape_uri_control_chars`: controls and DEL only.
fn escape_controls(s: &str, out: &mut String) {
    escape_into(s, out, |b| b < 0x20 || b == 0x7f);
}

/// Copies `s` to `out` with the bytes `escape` selects as `%XX`. `escape`
/// must take all bytes of a multi-byte character or none (both callers
/// escape every non-ASCII byte, or no non-ASCII byte).
fn escape_into(s: &str, out: &mut String, escape: impl Fn(u8) -> bool) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut run = 0;
    let bytes = s.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if escape(b) {
            // After an escaped lead byte `run` sits inside its character,
            // and the run up to the next byte (escaped too) is empty:
            // indexing there would panic on the character boundary.
            out.push_str(s.get(run..i).unwrap_or_default());
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
            run = i + 1;
        }
    }
    out.push_str(s.get(run..).unwrap_or_default());
}

fn needs_nginx_escape(path: &str) -> bool {
    path.bytes()
        .any(|b| b <= b' ' || matches!(b, b'#' | b'%' | b'?') || b >= 0x7f)
}

/// Sets the request target, keeping scheme and authority. Bytes the HTTP
/// library refuses (and nginx would send raw) are percent-encoded first.
fn set_path_and_query(uri: &mut Uri, target: &str) -> Result<(), String> {
    let parsed = PathAndQuery::try_from(target)
        .ok()
        .filter(|pq| pq.as_str().len() == target.len());
    let pq = match parsed {
        Some(pq) => pq,
        None => {
            let (path, query) = match target.find('?') {
                Some(i) => (&target[..i], Some(&target[i + 1..])),
                None => (target, None),
            };
            let mut safe = String::with_capacity(target.len() + 16);
            escape_into(path, &mut safe, |b| {
                b <= b' ' || matches!(b, b'#' | b'<' | b'>' | b'`') || b >= 0x7f
            });
            if let Some(q) = query {
                safe.push('?');
                escape_into(q, &mut safe, |b| {
                    b <= b' ' || matches!(b, b'#' | b'"' | b'<' | b'>') || b >= 0x7f
                });
            }
            PathAndQuery::try_from(safe.as_str()).map_err(|e| e.to_string())?
        }
    };
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = Some(pq);
    *uri = Uri::from_parts(parts).map_err(|e| e.to_string())?;
    Ok(())
}

impl ProxyRewrite {
    /// The first `regex_uri` pair that matches `subject`, applied once;
    /// its captures go to `caps` when header values use them.
    fn apply_regex(&self, subject: &str, caps: &mut Vec<Option<String>>) -> Option<String> {
        self.regex_uri.iter().find_map(|(re, rep)| {
            let c = re.captures(subject)?;
            let whole = c.get(0)?;
            let mut out = String::with_capacity(subject.len() + 16);
            out.push_str(&subject[..whole.start()]);
            rep.expand_str(&c, &mut out);
            out.push_str(&subject[whole.end()..]);
            if self.keep_captures {
                *caps = c
                    .iter()
                    .map(|m| m.map(|m| m.as_str().to_string()))
                    .collect();
            }
            Some(out)
        })
    }

    /// Rewrites the request target; returns the `regex_uri` captures.
    fn rewrite_uri(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Vec<Option<String>> {
        let mut caps = Vec::new();
        if self.unsafe_uri {
            self.rewrite_uri_unsafe(ctx, req, &mut caps);
            return caps;
        }
        // With neither `uri` nor `regex_uri`, APISIX still re-encodes
        // `$uri`: nothing changes when it is the request's path already and
        // has nothing to encode.
        if self.uri.is_none()
            && self.regex_uri.is_empty()
            && ctx.path.is_none()
            && !needs_nginx_escape(req.uri.path())
        {
            return caps;
        }
        let current = ctx.path.as_deref().unwrap_or_else(|| req.uri.path());
        // A `?` the rewrite introduced separates a query; one that came
        // decoded from the client's path is escaped with the rest.
        let (upstream, separator) = match &self.uri {
            Some(t) => (
                t.render(&ctx.vars(Some(req)), &[], Escape::QuestionMark)
                    .text,
                true,
            ),
            None => (
                self.apply_regex(current, &mut caps)
                    .unwrap_or_else(|| current.to_string()),
                !current.contains('?'),
            ),
        };
        let split = if separator { upstream.find('?') } else { None };
        let mut target = String::with_capacity(upstream.len() + 32);
        match split {
            Some(at) => {
                nginx_escape(&upstream[..at], &mut target);
                escape_controls(&upstream[at..], &mut target);
            }
            None => nginx_escape(&upstream, &mut target),
        }
        if let Some(args) = req.uri.query() {
            target.push(if split.is_some() { '&' } else { '?' });
            target.push_str(args);
        }
        match set_path_and_query(&mut req.uri, &target) {
            // `$uri` is the new path now.
            Ok(()) => ctx.path = None,
            Err(e) => tracing::error!(
                plugin = NAME,
                "failed to set the upstream uri {target:?}: {e}"
            ),
        }
        caps
    }

    fn rewrite_uri_unsafe(
        &self,
        ctx: &mut Ctx,
        req: &mut request::Parts,
        caps: &mut Vec<Option<String>>,
    ) {
        let real = req
            .uri
            .path_and_query()
            .map_or("/", PathAndQuery::as_str)
            .to_string();
        let upstream = if let Some(t) = &self.uri {
            let mut uri = t
                .render(&ctx.vars(Some(req)), &[], Escape::QuestionMark)
                .text;
            if let Some(at) = real.find('?') {
                if uri.contains('?') {
                    uri.push('&');
                    uri.push_str(&real[at + 1..]);
                } else {
                    uri.push_str(&real[at..]);
                }
            }
            uri
        } else if !self.regex_uri.is_empty() {
            match self.apply_regex(&real, caps) {
                Some(u) => u,
                None => return,
            }
        } else {
            return;
        };
        // `$uri` stays what it was; only the target sent upstream changes.
        let old_path = ctx
            .path
            .as_deref()
            .unwrap_or_else(|| req.uri.path())
            .to_string();
        match set_path_and_query(&mut req.uri, &upstream) {
            Ok(()) => {
                ctx.path = (old_path != req.uri.path()).then(|| old_path.into_boxed_str());
            }
            Err(e) => tracing::error!(
                plugin = NAME,
                "failed to set the upstream uri {upstream:?}: {e}"
            ),
        }
    }
}

impl Plugin for ProxyRewrite {
    fn phases(&self) -> Phases {
        Phases::REWRITE
    }

    fn rewrite(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        let caps = self.rewrite_uri(ctx, req);
        if let Some(ops) = &self.headers {
            ops.apply(ctx, req, &caps);
        }
        // After `headers`: the upstream Host is `host` whatever they set.
        if let Some(host) = &self.host {
            if let Some(original) = req.headers.insert(HOST, host.clone()) {
                if req.extensions.get::<OriginalHost>().is_none() {
                    req.extensions.insert(OriginalHost(original));
                }
            }
        }
        if let Some(m) = &self.method {
            req.method = m.clone();
        }
        Flow::Continue
    }
}

/// The registry entry.
pub struct ProxyRewriteSpec;

impl PluginSpec for ProxyRewriteSpec {
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
mod tests;
