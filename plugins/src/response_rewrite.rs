//! `response-rewrite`: change the status, headers or body of the response.
//!
//! Mirrors APISIX 3.18's plugin of the same name (priority 899,
//! header_filter and body_filter phases):
//!
//! ```json
//! {"status_code": 503, "body": "{\"message\":\"down\"}",
//!  "headers": {"set": {"X-Server": "$upstream_addr"}, "remove": ["Server"]},
//!  "vars": [["status", "==", 500]]}
//! ```
//!
//! - `vars`: an expression evaluated on the response (`status`,
//!   `upstream_status`, request variables ...); the plugin does nothing
//!   when it does not hold.
//! - `status_code` (200..598) replaces the status.
//! - `body` (base64-decoded first with `body_base64`) replaces the body.
//! - `filters`: `{regex, replace, scope: once|global, options}` regex
//!   substitutions on the body, which is buffered (up to
//!   `max_resp_body_size` bytes, default 64 MiB; a larger body is cut
//!   there) and rewritten at its end. `body` and `filters` exclude each
//!   other.
//! - `headers`: `add` (`"Name: value"` lines), `set` (object), `remove`
//!   (names), applied in that order; a plain object is `set`. Values may
//!   use `$var`s.
//!
//! Whenever the body may change, `Content-Length`, `Content-Encoding`,
//! `Last-Modified` and `ETag` are dropped, as APISIX's
//! `clear_header_as_body_modified` does.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{request, response, HeaderValue, StatusCode};
use regex::bytes::{Regex, RegexBuilder};
use serde_json::{json, Map, Value};

use crate::ctx::{Ctx, RequestHead};
use crate::expr::{self, Expr};
use crate::plugin::{CompileCx, Flow, Phases, Plugin, PluginSpec, SchemaType};
use crate::registry::cached;
use crate::schema::{type_name, Schema};
use crate::template::{regex_error, scalar_text, Escape, Replacement, Template};

pub const NAME: &str = "response-rewrite";
pub const PRIORITY: i32 = 899;
/// `max_resp_body_size` unless configured.
pub const DEFAULT_MAX_BODY: usize = 67_108_864;

const NAME_PATTERN: &str = "^[^:]+$";
const ADD_PATTERN: &str = "^[^:]+:[^:]*[^/]$";
const DEPENDENCY_ERROR: &str =
    "failed to validate dependent schema for \"body\": value wasn't supposed to match schema";

fn is_header_key(k: &str) -> bool {
    !k.is_empty() && !k.contains(':')
}

/// `^[^:]+:[^:]*[^/]$`.
fn is_add_line(s: &str) -> bool {
    let Some((name, rest)) = s.split_once(':') else {
        return false;
    };
    let rest = rest.as_bytes();
    !name.is_empty()
        && rest
            .split_last()
            .is_some_and(|(last, init)| *last != b'/' && !init.contains(&b':'))
}

/// An object of `^[^:]+$` keys with string or number values.
fn scalar_map(v: &Value) -> Result<(), String> {
    let Some(obj) = v.as_object() else {
        return Err(format!("wrong type: expected object, got {}", type_name(v)));
    };
    for (k, val) in obj {
        if is_header_key(k) && !(val.is_string() || val.is_number()) {
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

fn scalar_map_doc() -> Value {
    json!({"type": "object", "minProperties": 1, "patternProperties": {
        NAME_PATTERN: {"oneOf": [{"type": "string"}, {"type": "number"}]}
    }})
}

fn build_base() -> Schema {
    let new_form = Schema::object()
        .prop(
            "add",
            Schema::array(Schema::string().pattern(ADD_PATTERN, is_add_line).done())
                .min(1)
                .done(),
        )
        .prop("set", Schema::Custom(scalar_map, scalar_map_doc))
        .prop(
            "remove",
            Schema::array(Schema::string().pattern(NAME_PATTERN, is_header_key).done())
                .min(1)
                .done(),
        )
        .done();
    let filter = Schema::object()
        .required(&["regex", "replace"])
        .prop("regex", Schema::string().min(1).done())
        .prop(
            "scope",
            Schema::string().enumerated(&["once", "global"]).done(),
        )
        .prop("replace", Schema::string().done())
        .prop("options", Schema::string().done())
        .done();
    Schema::object()
        .prop("max_resp_body_size", Schema::integer().min(1.0).int())
        .prop(
            "headers",
            Schema::AnyOf(vec![Schema::Custom(scalar_map, scalar_map_doc), new_form]),
        )
        .prop("body", Schema::string().done())
        .prop("body_base64", Schema::Boolean)
        .prop("status_code", Schema::integer().min(200.0).max(598.0).int())
        .prop("vars", Schema::array(Schema::Any).done())
        .prop("filters", Schema::array(filter).min(1).done())
        .done()
}

fn base() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_base)
}

fn validate_top(conf: &Value) -> Result<(), String> {
    base().validate(conf)?;
    if conf.get("body").is_some() && conf.get("filters").is_some() {
        return Err(DEPENDENCY_ERROR.into());
    }
    Ok(())
}

fn doc_top() -> Value {
    let mut doc = base().to_json();
    if let Some(map) = doc.as_object_mut() {
        map.insert(
            "dependencies".into(),
            json!({"body": {"not": {"required": ["filters"]}},
                   "filters": {"not": {"required": ["body"]}}}),
        );
    }
    doc
}

/// The configuration schema (with `dependencies`: `body` xor `filters`).
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, || Schema::Custom(validate_top, doc_top))
}

/// `ngx.decode_base64`: standard alphabet, padding optional, anything after
/// the first `=` ignored; `None` when invalid.
pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    fn sextet(b: u8) -> Option<u8> {
        match b {
            b'A'..=b'Z' => Some(b - b'A'),
            b'a'..=b'z' => Some(b - b'a' + 26),
            b'0'..=b'9' => Some(b - b'0' + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let data = text.as_bytes();
    let data = &data[..data.iter().position(|&b| b == b'=').unwrap_or(data.len())];
    if data.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() / 4 * 3 + 2);
    for group in data.chunks(4) {
        let mut acc: u32 = 0;
        for &b in group {
            acc = (acc << 6) | u32::from(sextet(b)?);
        }
        let bytes = acc.to_be_bytes();
        match group.len() {
            4 => out.extend_from_slice(&bytes[1..4]),
            3 => out.extend_from_slice(&(acc << 6).to_be_bytes()[1..3]),
            2 => out.push((acc >> 4) as u8),
            _ => {}
        }
    }
    Some(out)
}

/// Builds a filter's regex with ngx_lua's option letters.
fn filter_regex(pattern: &str, options: &str) -> Result<Regex, String> {
    let mut builder_pattern = Cow::Borrowed(pattern);
    let mut ci = false;
    let mut multi = false;
    let mut dotall = false;
    let mut extended = false;
    for c in options.chars() {
        match c {
            'i' => ci = true,
            'm' => multi = true,
            's' => dotall = true,
            'x' => extended = true,
            'a' => builder_pattern = Cow::Owned(format!("\\A(?:{pattern})")),
            // JIT, caching, DFA, duplicate names, UTF-8: no meaning here.
            'j' | 'o' | 'd' | 'D' | 'J' | 'u' | 'U' => {}
            other => return Err(format!("unknown flag \"{other}\" (flags \"{options}\")")),
        }
    }
    RegexBuilder::new(&builder_pattern)
        .case_insensitive(ci)
        .multi_line(multi)
        .dot_matches_new_line(dotall)
        .ignore_whitespace(extended)
        .build()
        .map_err(|e| regex_error(pattern, &e))
}

fn new_headers_conf(headers: &Map<String, Value>) -> bool {
    ["add", "set", "remove"]
        .iter()
        .any(|k| matches!(headers.get(*k), Some(Value::Object(_) | Value::Array(_))))
}

/// Schema check, then the semantic checks APISIX runs after it.
pub fn check(conf: &Value) -> Result<(), String> {
    schema().validate(conf)?;
    if let Some(headers) = conf.get("headers").and_then(Value::as_object) {
        if !new_headers_conf(headers) {
            for (field, value) in headers {
                if !(value.is_string() || value.is_number()) {
                    return Err("invalid type as header value".into());
                }
                if field.is_empty() {
                    return Err("invalid field length in header".into());
                }
            }
        }
    }
    if conf.get("body_base64").and_then(Value::as_bool) == Some(true) {
        let body = conf.get("body").and_then(Value::as_str).unwrap_or_default();
        if body.is_empty() || decode_base64(body).is_none() {
            return Err("invalid base64 content".into());
        }
    }
    if let Some(vars) = conf.get("vars") {
        expr::compile(vars)
            .map_err(|e| format!("failed to validate the 'vars' expression: {e}"))?;
    }
    for f in conf
        .get("filters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let pattern = f.get("regex").and_then(Value::as_str).unwrap_or_default();
        let options = f.get("options").and_then(Value::as_str).unwrap_or("jo");
        filter_regex(pattern, options)
            .map_err(|e| format!("regex \"{pattern}\" validation failed: {e}"))?;
    }
    Ok(())
}

/// A header value: fixed, or a template filled in per response.
#[derive(Debug)]
enum Val {
    Fixed(HeaderValue),
    Dyn(Template),
}

impl Val {
    fn compile(name: &str, text: &str) -> Result<Val, String> {
        let t = Template::new(text);
        match t.literal() {
            Some(lit) => HeaderValue::from_str(lit)
                .map(Val::Fixed)
                .map_err(|_| format!("invalid value of header {name}: {text:?}")),
            None => Ok(Val::Dyn(t)),
        }
    }

    fn value(&self, ctx: &Ctx) -> Option<HeaderValue> {
        match self {
            Val::Fixed(v) => Some(v.clone()),
            Val::Dyn(t) => {
                HeaderValue::try_from(t.render(&ctx.vars(None), &[], Escape::None).text).ok()
            }
        }
    }
}

fn header_name(name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("invalid header name {name:?}"))
}

/// `headers`, compiled.
#[derive(Debug, Default)]
struct HeaderOps {
    add: Vec<(HeaderName, Val)>,
    set: Vec<(HeaderName, Val)>,
    remove: Vec<HeaderName>,
}

/// `Name: value` as APISIX splits it (`^([^:\s]+)\s*:\s*([^:]+)$`).
fn split_add_line(line: &str) -> Option<(&str, &str)> {
    let (name, value) = line.split_once(':')?;
    let name = name.trim_end();
    if name.is_empty() || name.contains(char::is_whitespace) || value.contains(':') {
        return None;
    }
    let trimmed = value.trim_start();
    if !trimmed.is_empty() {
        return Some((name, trimmed));
    }
    // `\s*` gives back one character for `[^:]+`.
    let last = value.char_indices().last()?.0;
    Some((name, &value[last..]))
}

impl HeaderOps {
    fn compile(headers: &Map<String, Value>) -> Result<Option<HeaderOps>, String> {
        let set_of = |map: Option<&Value>| -> Result<Vec<(HeaderName, Val)>, String> {
            map.and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| scalar_text(v).map(|t| (k, t)))
                .map(|(k, t)| Ok((header_name(k)?, Val::compile(k, &t)?)))
                .collect()
        };
        if !new_headers_conf(headers) {
            let flat = Value::Object(headers.clone());
            return Ok(Some(HeaderOps {
                set: set_of(Some(&flat))?,
                ..HeaderOps::default()
            }));
        }
        let mut add = Vec::new();
        for line in headers
            .get("add")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            let Some((name, value)) = split_add_line(line) else {
                // APISIX fails to build the operations and skips them all.
                tracing::warn!(
                    plugin = NAME,
                    "invalid header line {line:?}: headers are not changed"
                );
                return Ok(None);
            };
            add.push((header_name(name)?, Val::compile(name, value)?));
        }
        let remove = headers
            .get("remove")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(header_name)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(HeaderOps {
            add,
            set: set_of(headers.get("set"))?,
            remove,
        }))
    }

    fn templates(&self) -> impl Iterator<Item = &Template> {
        self.add
            .iter()
            .chain(&self.set)
            .filter_map(|(_, v)| match v {
                Val::Dyn(t) => Some(t),
                Val::Fixed(_) => None,
            })
    }

    fn apply(&self, ctx: &Ctx, resp: &mut response::Parts) {
        for (name, v) in &self.add {
            if let Some(value) = v.value(ctx) {
                resp.headers.append(name.clone(), value);
            }
        }
        for (name, v) in &self.set {
            if let Some(value) = v.value(ctx) {
                resp.headers.insert(name.clone(), value);
            }
        }
        for name in &self.remove {
            resp.headers.remove(name);
        }
    }
}

/// One `filters` entry, compiled.
#[derive(Debug)]
struct Filter {
    re: Regex,
    replace: Replacement,
    global: bool,
}

/// The compiled plugin.
#[derive(Debug)]
pub struct ResponseRewrite {
    status: Option<StatusCode>,
    body: Option<Bytes>,
    filters: Vec<Filter>,
    max_body: usize,
    headers: Option<HeaderOps>,
    vars: Option<Expr>,
    /// `vars` or header values read request variables: keep the request
    /// head for the response phases.
    keep_request: bool,
}

/// Variables [`Ctx::var`] answers without the request.
fn response_side(name: &str) -> bool {
    matches!(
        name,
        "status"
            | "upstream_status"
            | "upstream_addr"
            | "route_id"
            | "service_id"
            | "consumer_name"
            | "request_time"
            | "body_bytes_sent"
            | "remote_addr"
            | "host"
    ) || name.starts_with("sent_http_")
}

fn expr_needs_request(e: &Expr) -> bool {
    match e {
        Expr::All(list) | Expr::Any(list) => list.iter().any(expr_needs_request),
        Expr::Not(inner) => expr_needs_request(inner),
        Expr::Rule { var, .. } => !response_side(var),
    }
}

/// Compiles a checked configuration.
pub fn compile(conf: &Value) -> Result<ResponseRewrite, String> {
    let status = conf
        .get("status_code")
        .and_then(Value::as_u64)
        .map(|s| {
            u16::try_from(s)
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .ok_or_else(|| format!("invalid status_code {s}"))
        })
        .transpose()?;
    let body = match conf.get("body").and_then(Value::as_str) {
        Some(text) if conf.get("body_base64").and_then(Value::as_bool) == Some(true) => Some(
            Bytes::from(decode_base64(text).ok_or_else(|| "invalid base64 content".to_string())?),
        ),
        Some(text) => Some(Bytes::from(text.to_string())),
        None => None,
    };
    let mut filters = Vec::new();
    for f in conf
        .get("filters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let pattern = f.get("regex").and_then(Value::as_str).unwrap_or_default();
        let options = f.get("options").and_then(Value::as_str).unwrap_or("jo");
        let re = filter_regex(pattern, options)
            .map_err(|e| format!("regex \"{pattern}\" validation failed: {e}"))?;
        let replace_text = f.get("replace").and_then(Value::as_str).unwrap_or_default();
        let replace = Replacement::parse(replace_text)
            .map_err(|e| format!("invalid replace of regex \"{pattern}\": {e}"))?;
        filters.push(Filter {
            re,
            replace,
            global: f.get("scope").and_then(Value::as_str) == Some("global"),
        });
    }
    let headers = match conf.get("headers").and_then(Value::as_object) {
        Some(h) => HeaderOps::compile(h)?,
        None => None,
    };
    let vars = conf
        .get("vars")
        .map(expr::compile)
        .transpose()
        .map_err(|e| format!("failed to validate the 'vars' expression: {e}"))?;
    let keep_request = vars.as_ref().is_some_and(expr_needs_request)
        || headers.as_ref().is_some_and(|h| {
            h.templates()
                .flat_map(Template::var_names)
                .any(|n| !response_side(n))
        });
    let max_body = conf
        .get("max_resp_body_size")
        .and_then(Value::as_u64)
        .map_or(DEFAULT_MAX_BODY, |n| {
            usize::try_from(n).unwrap_or(usize::MAX)
        });
    Ok(ResponseRewrite {
        status,
        body,
        filters,
        max_body,
        headers,
        vars,
        keep_request,
    })
}

/// Per-response state of the body-changing instances (a global rule and a
/// route may both have one).
#[derive(Clone, Default)]
struct BodyStates(Vec<BodyState>);

#[derive(Clone)]
struct BodyState {
    /// The instance, by address.
    id: usize,
    matched: bool,
    /// `body`: sent already.
    sent: bool,
    /// `filters`: the body is encoded; left alone.
    passthrough: bool,
    /// `filters`: the rewritten body went out; the rest is dropped.
    done: bool,
    buf: Vec<u8>,
}

impl ResponseRewrite {
    fn id(&self) -> usize {
        self as *const ResponseRewrite as usize
    }

    fn changes_body(&self) -> bool {
        self.body.is_some() || !self.filters.is_empty()
    }

    fn run_filters(&self, body: Vec<u8>) -> Bytes {
        let mut cur = body;
        for f in &self.filters {
            let next = if f.global {
                f.re.replace_all(&cur, &f.replace)
            } else {
                f.re.replace(&cur, &f.replace)
            };
            if let Cow::Owned(changed) = next {
                cur = changed;
            }
        }
        Bytes::from(cur)
    }
}

impl Plugin for ResponseRewrite {
    fn phases(&self) -> Phases {
        let mut p = Phases::HEADER_FILTER;
        if self.changes_body() {
            p |= Phases::BODY_FILTER;
        }
        if self.keep_request {
            p |= Phases::REWRITE;
        }
        p
    }

    fn rewrite(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        if ctx.request.is_none() {
            ctx.request = Some(Box::new(RequestHead {
                method: req.method.clone(),
                uri: req.uri.clone(),
                headers: req.headers.clone(),
            }));
        }
        Flow::Continue
    }

    fn header_filter(&self, ctx: &mut Ctx, resp: &mut response::Parts) {
        let matched = self.vars.as_ref().is_none_or(|e| e.eval(&ctx.vars(None)));
        let mut passthrough = false;
        if matched {
            if let Some(status) = self.status {
                resp.status = status;
                ctx.status = Some(status);
            }
            if self.changes_body() {
                let encoded = resp
                    .headers
                    .get(header::CONTENT_ENCODING)
                    .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
                if encoded && self.body.is_none() {
                    // No decoder here: an encoded body is passed on as it is.
                    tracing::debug!(
                        plugin = NAME,
                        "filters skipped: the response body is encoded"
                    );
                    passthrough = true;
                } else {
                    for h in [
                        header::CONTENT_LENGTH,
                        header::CONTENT_ENCODING,
                        header::LAST_MODIFIED,
                        header::ETAG,
                    ] {
                        resp.headers.remove(h);
                    }
                }
            }
            if let Some(ops) = &self.headers {
                ops.apply(ctx, resp);
            }
        }
        if self.changes_body() {
            let state = BodyState {
                id: self.id(),
                matched,
                sent: false,
                passthrough,
                done: false,
                buf: Vec::new(),
            };
            match ctx.data.get_mut::<BodyStates>() {
                Some(states) => {
                    states.0.retain(|s| s.id != state.id);
                    states.0.push(state);
                }
                None => {
                    ctx.data.insert(BodyStates(vec![state]));
                }
            }
        }
    }

    fn body_filter(&self, ctx: &mut Ctx, chunk: &mut Bytes, end: bool) {
        let id = self.id();
        let Some(st) = ctx
            .data
            .get_mut::<BodyStates>()
            .and_then(|s| s.0.iter_mut().find(|s| s.id == id))
        else {
            return;
        };
        if !st.matched || st.passthrough {
            return;
        }
        if let Some(body) = &self.body {
            *chunk = if st.sent { Bytes::new() } else { body.clone() };
            st.sent = true;
            return;
        }
        if st.done {
            *chunk = Bytes::new();
            return;
        }
        let room = self.max_body.saturating_sub(st.buf.len());
        let full = chunk.len() >= room;
        st.buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if full || end {
            st.done = true;
            let body = std::mem::take(&mut st.buf);
            *chunk = self.run_filters(body);
        } else {
            *chunk = Bytes::new();
        }
    }
}

/// The registry entry.
pub struct ResponseRewriteSpec;

impl PluginSpec for ResponseRewriteSpec {
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
