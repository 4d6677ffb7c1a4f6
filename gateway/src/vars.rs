//! Request variables for route `vars` and `chash` keys: the shared lookup
//! of [`plugins::vars`] over a whole request before any plugin ran.

use std::borrow::Cow;

use http::Request;

use plugins::expr::Vars;
use plugins::vars::{ConnInfo, ReqRef};
use plugins::ClientIp;

/// Request variables for `vars`, read on demand.
pub struct RequestVars<'a, B> {
    pub req: &'a Request<B>,
    /// Lower-cased, without port.
    pub host: Option<&'a str>,
    /// The normalised path (`$uri`).
    pub path: &'a str,
}

impl<'a, B> RequestVars<'a, B> {
    fn view(&self) -> ReqRef<'a> {
        let req = self.req;
        ReqRef {
            client_port: None,
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            path: self.path,
            host: self.host,
            client_ip: req.extensions().get::<ClientIp>().map(|c| c.0),
            conn: req.extensions().get::<ConnInfo>(),
        }
    }
}

impl<B> Vars for RequestVars<'_, B> {
    fn var(&self, name: &str) -> Option<Cow<'_, str>> {
        self.view().var(name)
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
