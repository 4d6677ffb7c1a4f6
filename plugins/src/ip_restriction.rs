//! `ip-restriction`: allow or deny clients by IP address or CIDR.
//!
//! Mirrors APISIX's plugin of the same name (priority 3000, access phase, so
//! it runs after every plugin's rewrite: a key-auth 401 comes first):
//!
//! ```json
//! {"whitelist": ["127.0.0.0/24", "::1"], "message": "Go away", "response_code": 403}
//! ```
//!
//! Exactly one of `whitelist` / `blacklist` (each at least one IPv4, IPv4/CIDR,
//! IPv6 or IPv6/CIDR entry). `message` (1..1024 chars, default
//! `Your IP address is not allowed`) and `response_code` (403 or 404, default
//! 403) shape the answer `{"message": ...}` to a blocked client.
//!
//! The address judged is the context's client address: the TCP peer unless
//! the gateway has a trusted proxy configured (or a `real-ip` plugin, which
//! has its own trusted list, replaced it), so `X-Forwarded-For` or
//! `X-Real-IP` from a client cannot get it past the list.
//!
//! The lists are compiled once per config snapshot into an [`IpSet`] (prefix
//! trie), so the cost per request does not grow with the list length.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde::Deserialize;
use serde_json::Value;

use crate::cidr::{parse_entry, IpSet};
use crate::ctx::Ctx;
use crate::plugin::{CompileCx, Flow, Phases, Plugin, PluginSpec, SchemaType};
use crate::registry::cached;
use crate::schema::Schema;
use crate::{full_body, ClientIp, ResponseBody};

pub const NAME: &str = "ip-restriction";
pub const PRIORITY: i32 = 3000;
/// The body text a blocked client gets unless `message` says otherwise.
pub const DEFAULT_MESSAGE: &str = "Your IP address is not allowed";
/// The status a blocked client gets unless `response_code` says otherwise.
pub const DEFAULT_RESPONSE_CODE: u16 = 403;

/// The plugin configuration, with APISIX's field names.
#[derive(Debug, Clone, Deserialize)]
pub struct IpRestrictionConf {
    #[serde(default)]
    pub whitelist: Option<Vec<String>>,
    #[serde(default)]
    pub blacklist: Option<Vec<String>>,
    #[serde(default = "default_message")]
    pub message: String,
    #[serde(default = "default_response_code")]
    pub response_code: u16,
}

fn default_message() -> String {
    DEFAULT_MESSAGE.to_string()
}

fn default_response_code() -> u16 {
    DEFAULT_RESPONSE_CODE
}

/// Validates one `ip_def` entry with APISIX's anyOf wording.
fn ip_def(value: &Value) -> Result<(), String> {
    match value.as_str().map(parse_entry) {
        Some(Ok(_)) => Ok(()),
        _ => Err("object matches none of the required".to_string()),
    }
}

/// One `ip_def` item (IPv4, IPv6, either with a CIDR prefix).
pub(crate) fn ip_def_schema() -> Schema {
    Schema::Custom(ip_def, ip_def_doc)
}

fn ip_def_doc() -> Value {
    serde_json::json!({"anyOf": [
        {"type": "string", "title": "IPv4", "format": "ipv4"},
        {"type": "string", "title": "IPv4/CIDR"},
        {"type": "string", "title": "IPv6", "format": "ipv6"},
        {"type": "string", "title": "IPv6/CIDR"},
    ]})
}

fn build_schema() -> Schema {
    let list = || {
        Schema::array(Schema::Custom(ip_def, ip_def_doc))
            .min(1)
            .done()
    };
    Schema::object()
        .prop("message", Schema::string().min(1).max(1024).done())
        .prop(
            "response_code",
            Schema::integer().min(403.0).max(404.0).int(),
        )
        .prop("whitelist", list())
        .prop("blacklist", list())
        .one_of_required(&[&["whitelist"], &["blacklist"]])
        .done()
}

/// The configuration schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

/// Schema check, then the semantic check APISIX runs after it.
pub fn check(conf: &Value) -> Result<(), String> {
    schema().validate(conf)?;
    let conf: IpRestrictionConf =
        serde_json::from_value(conf.clone()).map_err(|e| e.to_string())?;
    for entry in conf.whitelist.iter().chain(conf.blacklist.iter()).flatten() {
        parse_entry(entry).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Whether a listed client is let through or kept out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Allow,
    Deny,
}

/// The compiled rule: the address set plus the prepared rejection.
#[derive(Debug)]
pub struct Rule {
    mode: Mode,
    set: IpSet,
    status: StatusCode,
    body: Bytes,
}

/// Compiles a checked configuration.
pub fn compile(conf: &Value) -> Result<Rule, String> {
    let conf: IpRestrictionConf =
        serde_json::from_value(conf.clone()).map_err(|e| e.to_string())?;
    let (mode, entries) = match (conf.whitelist, conf.blacklist) {
        (Some(list), None) => (Mode::Allow, list),
        (None, Some(list)) => (Mode::Deny, list),
        _ => return Err("value should match only one schema".to_string()),
    };
    let set = IpSet::from_entries(&entries).map_err(|e| e.to_string())?;
    let status = StatusCode::from_u16(conf.response_code).map_err(|e| e.to_string())?;
    let mut body = serde_json::json!({ "message": conf.message }).to_string();
    body.push('\n');
    Ok(Rule {
        mode,
        set,
        status,
        body: Bytes::from(body),
    })
}

impl Rule {
    /// Whether a client at `ip` (None: unknown) is kept out.
    pub fn blocks(&self, ip: Option<ClientIp>) -> bool {
        let listed = ip.is_some_and(|ClientIp(ip)| self.set.contains(ip));
        match self.mode {
            Mode::Allow => !listed,
            Mode::Deny => listed,
        }
    }

    fn rejection(&self) -> Response<ResponseBody> {
        let mut resp = Response::new(full_body(self.body.clone()));
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}

/// The registry entry.
pub struct IpRestrictionSpec;

impl PluginSpec for IpRestrictionSpec {
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

impl Plugin for Rule {
    fn phases(&self) -> Phases {
        Phases::ACCESS
    }

    fn access(&self, ctx: &mut Ctx, _req: &mut http::request::Parts) -> Flow {
        if self.blocks(Some(ClientIp(ctx.client_ip))) {
            Flow::Respond(self.rejection())
        } else {
            Flow::Continue
        }
    }
}

#[cfg(test)]
mod tests;
