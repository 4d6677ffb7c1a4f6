//! The key limit-req and limit-conn count by: `key_type` `var` (`key` is a
//! variable name, such as `remote_addr` or `http_x_api_user`) or
//! `var_combination` (`key` is a `$var` template). A variable the request
//! does not have, or a combination that resolves none, falls back to the
//! client address, as in APISIX.

use std::borrow::Cow;

use http::request;
use serde_json::Value;

use crate::ctx::Ctx;
use crate::template::{Escape, Template};

/// A compiled `key`/`key_type`.
pub enum LimitKey {
    Var(String),
    Combination(Template),
}

impl LimitKey {
    /// From a checked configuration's `key` and `key_type`.
    pub fn compile(conf: &Value) -> LimitKey {
        let key = conf
            .get("key")
            .and_then(Value::as_str)
            .unwrap_or("remote_addr");
        match conf.get("key_type").and_then(Value::as_str) {
            Some("var_combination") => LimitKey::Combination(Template::new(key)),
            _ => LimitKey::Var(key.to_string()),
        }
    }

    /// This request's key.
    pub fn resolve<'a>(&'a self, ctx: &'a Ctx, req: &'a request::Parts) -> Cow<'a, str> {
        let found = match self {
            LimitKey::Var(name) => ctx.var(Some(req), name),
            LimitKey::Combination(t) => {
                let r = t.render(&ctx.vars(Some(req)), &[], Escape::None);
                (r.resolved > 0).then_some(Cow::Owned(r.text))
            }
        };
        found.unwrap_or_else(|| Cow::Owned(ctx.client_ip.to_string()))
    }
}

/// limit-req's and limit-conn's answer to anything but `policy: local`
/// (the Admin API refuses what would never apply).
pub fn refuse_remote_policy(conf: &Value) -> Result<(), String> {
    match conf
        .get("policy")
        .and_then(Value::as_str)
        .unwrap_or("local")
    {
        "local" => Ok(()),
        other => Err(format!(
            "policy {other} is not supported yet: only policy local is available"
        )),
    }
}
