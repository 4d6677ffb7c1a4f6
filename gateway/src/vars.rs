//! Request variables by APISIX (nginx) name, read on demand: `uri`,
//! `request_uri`, `args`, `host`, `remote_addr`, `request_method`, `scheme`,
//! `server_port`, `arg_NAME`, `http_NAME` (header, `_` for `-`) and
//! `cookie_NAME`. Used by route `vars` and by `chash` keys.

use std::borrow::Cow;

use http::Request;

use admin_api::expr::Vars;
use plugins::ClientIp;

use crate::proxy::ConnMeta;

/// Request variables for `vars`, read on demand.
pub struct RequestVars<'a, B> {
    pub req: &'a Request<B>,
    /// Lower-cased, without port.
    pub host: Option<&'a str>,
    /// The normalised path (`$uri`).
    pub path: &'a str,
}

impl<B> Vars for RequestVars<'_, B> {
    fn var(&self, name: &str) -> Option<Cow<'_, str>> {
        let req = self.req;
        if let Some(arg) = name.strip_prefix("arg_") {
            let query = req.uri().query()?;
            return query.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == arg).then(|| Cow::Owned(admin_api::auth::percent_decode(v)))
            });
        }
        if let Some(h) = name.strip_prefix("http_") {
            let header = h.replace('_', "-");
            let values: Vec<&str> = req
                .headers()
                .get_all(header.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            return match values.as_slice() {
                [] => None,
                [one] => Some(Cow::Borrowed(one)),
                many => Some(Cow::Owned(many.join(", "))),
            };
        }
        if let Some(c) = name.strip_prefix("cookie_") {
            return req
                .headers()
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|kv| {
                    let (k, v) = kv.trim().split_once('=')?;
                    (k == c).then_some(Cow::Borrowed(v))
                });
        }
        match name {
            "uri" => Some(Cow::Borrowed(self.path)),
            "request_uri" => Some(Cow::Borrowed(
                req.uri()
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/"),
            )),
            "args" | "query_string" => req.uri().query().map(Cow::Borrowed),
            "host" => self.host.map(Cow::Borrowed),
            "request_method" => Some(Cow::Borrowed(req.method().as_str())),
            "remote_addr" => req
                .extensions()
                .get::<ClientIp>()
                .map(|c| Cow::Owned(c.0.to_string())),
            "scheme" => req
                .extensions()
                .get::<ConnMeta>()
                .map(|m| Cow::Borrowed(m.scheme)),
            "server_port" => req
                .extensions()
                .get::<ConnMeta>()
                .map(|m| Cow::Owned(m.local_port.to_string())),
            _ => None,
        }
    }
}

impl<B> RequestVars<'_, B> {
    /// Expands `$name` references in a `vars_combinations` template;
    /// unknown variables expand to nothing, as in nginx.
    pub fn expand(&self, template: &str) -> String {
        let mut out = String::new();
        let mut rest = template;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let name_len = rest[at + 1..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len() - at - 1);
            let name = &rest[at + 1..at + 1 + name_len];
            if let Some(v) = self.var(name) {
                out.push_str(&v);
            }
            rest = &rest[at + 1 + name_len..];
        }
        out.push_str(rest);
        out
    }
}
