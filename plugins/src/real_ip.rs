//! `real-ip`: take the client's address from a header, argument or other
//! variable, for everything after it (ip-restriction, limits, logs, the
//! upstream's `X-Real-IP` and `X-Forwarded-For`).
//!
//! Mirrors APISIX 3.18's plugin of the same name (priority 23000, rewrite
//! phase):
//!
//! ```json
//! {"source": "http_x_forwarded_for", "trusted_addresses": ["10.0.0.0/8"], "recursive": true}
//! ```
//!
//! - `source` (required): a variable, `http_<header>`, `arg_<name>`,
//!   `cookie_<name>` and the like. Its value is `ip`, `ip:port`, `[v6]` or
//!   `[v6]:port`; anything else leaves the address as it was.
//! - `http_x_forwarded_for` is special: the last header line counts, and in
//!   it the right-most address; with `recursive` and `trusted_addresses`,
//!   the right-most address that is not trusted (all trusted: the first).
//! - `trusted_addresses`: when set, only requests from those peers are
//!   believed; others keep their TCP peer address.
//!
//! Only this request changes: the next one on the connection starts from
//! the TCP peer again. Route matching (`remote_addrs`) happened before
//! plugins and saw the peer. The trusted set is compiled once per
//! configuration.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, OnceLock};

use http::request;
use serde::Deserialize;
use serde_json::Value;

use crate::cidr::{parse_entry, IpSet};
use crate::ctx::Ctx;
use crate::plugin::{CompileCx, Flow, Phases, Plugin, PluginSpec, SchemaType};
use crate::registry::cached;
use crate::schema::Schema;

pub const NAME: &str = "real-ip";
pub const PRIORITY: i32 = 23000;
const XFF_SOURCE: &str = "http_x_forwarded_for";

/// The plugin configuration, with APISIX's names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct RealIpConf {
    pub source: String,
    #[serde(default)]
    pub trusted_addresses: Option<Vec<String>>,
    #[serde(default)]
    pub recursive: bool,
}

fn build_schema() -> Schema {
    Schema::object()
        .prop("source", Schema::string().min(1).done())
        .prop(
            "trusted_addresses",
            Schema::array(crate::ip_restriction::ip_def_schema())
                .min(1)
                .done(),
        )
        .prop(
            "recursive",
            Schema::Custom(
                |v| Schema::Boolean.validate(v),
                || serde_json::json!({"type": "boolean", "default": false}),
            ),
        )
        .required(&["source"])
        .done()
}

/// The configuration schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

/// Schema check, then each trusted address must be an IP or CIDR.
pub fn check(conf: &Value) -> Result<(), String> {
    schema().validate(conf)?;
    let conf = RealIpConf::deserialize(conf).map_err(|e| e.to_string())?;
    for entry in conf.trusted_addresses.iter().flatten() {
        parse_entry(entry).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The compiled plugin.
pub struct RealIp {
    source: String,
    trusted: Option<IpSet>,
    recursive: bool,
}

pub fn compile(conf: &Value) -> Result<RealIp, String> {
    let conf = RealIpConf::deserialize(conf).map_err(|e| e.to_string())?;
    let trusted = match &conf.trusted_addresses {
        Some(list) => Some(IpSet::from_entries(list).map_err(|e| e.to_string())?),
        None => None,
    };
    Ok(RealIp {
        source: conf.source,
        trusted,
        recursive: conf.recursive,
    })
}

/// `ip`, `ip:port`, `[v6]`, `[v6]:port` or a bare IPv6 address. A port
/// that is not a number counts as none; one outside 1..=65535 makes the
/// whole value unusable.
pub fn parse_address(text: &str) -> Option<(IpAddr, Option<u16>)> {
    let text = text.trim();
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        (v6, after.strip_prefix(':'))
    } else if text.matches(':').count() >= 2 {
        (text, None)
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        }
    };
    let ip: IpAddr = if text.starts_with('[') {
        IpAddr::V6(host.parse::<Ipv6Addr>().ok()?)
    } else {
        host.parse().ok()?
    };
    let port = match port {
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            match p.parse::<u16>() {
                Ok(n) if n > 0 => Some(n),
                _ => return None,
            }
        }
        _ => None,
    };
    Some((ip, port))
}

impl RealIp {
    fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.as_ref().is_some_and(|t| t.contains(ip))
    }

    /// The address text `source` names for this request.
    fn address<'a>(&self, ctx: &'a Ctx, req: &'a request::Parts) -> Option<String> {
        if self.source != XFF_SOURCE {
            return ctx.var(Some(req), &self.source).map(|v| v.into_owned());
        }
        let line = req
            .headers
            .get_all(http::header::HeaderName::from_static("x-forwarded-for"))
            .iter()
            .next_back()?
            .to_str()
            .ok()?;
        if self.recursive && self.trusted.is_some() {
            let hops: Vec<&str> = line.split(',').map(str::trim).collect();
            let untrusted = hops
                .iter()
                .skip(1)
                .rev()
                .find(|hop| parse_address(hop).is_none_or(|(ip, _)| !self.trusts(ip)));
            return Some(untrusted.or(hops.first()).copied()?.to_string());
        }
        Some(match line.rsplit_once(',') {
            Some((_, last)) => last.trim_start().to_string(),
            None => line.to_string(),
        })
    }
}

impl Plugin for RealIp {
    fn phases(&self) -> Phases {
        Phases::REWRITE
    }

    fn rewrite(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        if self.trusted.is_some() && !self.trusts(ctx.client_ip) {
            return Flow::Continue;
        }
        let Some(text) = self.address(ctx, req) else {
            return Flow::Continue;
        };
        match parse_address(&text) {
            Some((ip, port)) => {
                ctx.client_ip = crate::vars::canonical(ip);
                if port.is_some() {
                    ctx.client_port = port;
                }
            }
            None => tracing::debug!(plugin = NAME, value = %text, "not a client address; ignored"),
        }
        Flow::Continue
    }
}

pub struct RealIpSpec;

impl PluginSpec for RealIpSpec {
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
    use serde_json::json;

    fn reason(conf: Value) -> String {
        testing::refusal(NAME, &conf)
    }

    #[test]
    fn schema_errors() {
        assert_eq!(registry::find(NAME).unwrap().priority(), 23000);
        assert_eq!(reason(json!({})), "property \"source\" is required");
        assert_eq!(
            reason(json!({"source": "http_x", "trusted_addresses": ["127.0.0.1/33"]})),
            "property \"trusted_addresses\" validation failed: failed to validate item 1: object matches none of the required"
        );
        assert!(registry::check(NAME, &json!({"source": "arg_ip"}), SchemaType::Route).is_ok());
    }

    #[test]
    fn addresses_and_ports() {
        let p = |s: &str| parse_address(s);
        assert_eq!(p("1.2.3.4"), Some(("1.2.3.4".parse().unwrap(), None)));
        assert_eq!(
            p("1.2.3.4:7090"),
            Some(("1.2.3.4".parse().unwrap(), Some(7090)))
        );
        assert_eq!(p("[::1]:80"), Some(("::1".parse().unwrap(), Some(80))));
        assert_eq!(p("[::1]"), Some(("::1".parse().unwrap(), None)));
        assert_eq!(p("::2:80"), Some(("::2:80".parse().unwrap(), None)));
        assert_eq!(p("1.2.3.4:http"), Some(("1.2.3.4".parse().unwrap(), None)));
        assert_eq!(p("1.1.1.1:65536"), None);
        assert_eq!(p("1.1.1.1:0"), None);
        assert_eq!(p("1.1.1.1.1"), None);
        assert_eq!(p("example.com"), None);
        assert_eq!(p("1.1.1.1, 2.2.2.2"), None);
    }

    async fn client_seen(conf: Value, peer: &str, headers: &[(&str, &str)], path: &str) -> Value {
        let set =
            testing::compile(&json!({NAME: conf, "ip-restriction": {"blacklist": ["10.9.9.9"]}}))
                .unwrap();
        let chain = testing::chain(Vec::new(), set, ConsumerIndex::default());
        let a = testing::send(chain, testing::request(peer, path, headers)).await;
        if a.status.as_u16() == 403 {
            return json!("denied");
        }
        a.json()["client_ip"].clone()
    }

    #[tokio::test]
    async fn later_plugins_and_the_upstream_see_the_address() {
        let xff = json!({"source": "http_x_forwarded_for"});
        let seen = client_seen(
            xff.clone(),
            "127.0.0.1",
            &[("x-forwarded-for", "1.1.1.1, 10.2.3.4")],
            "/",
        )
        .await;
        assert_eq!(seen, "10.2.3.4");
        let denied = client_seen(
            xff.clone(),
            "127.0.0.1",
            &[("x-forwarded-for", "10.9.9.9")],
            "/",
        )
        .await;
        assert_eq!(denied, "denied");
        // Garbage leaves the peer address.
        let kept = client_seen(xff, "127.0.0.1", &[("x-forwarded-for", "not-an-ip")], "/").await;
        assert_eq!(kept, "127.0.0.1");
        let arg = client_seen(
            json!({"source": "arg_realip"}),
            "127.0.0.1",
            &[],
            "/?realip=5.6.7.8:99",
        )
        .await;
        assert_eq!(arg, "5.6.7.8");
    }

    #[tokio::test]
    async fn trusted_addresses_gate_and_recursion() {
        let conf = json!({"source": "http_x_forwarded_for", "trusted_addresses": ["192.128.0.0/16", "127.0.0.0/24"], "recursive": true});
        let xff = [("x-forwarded-for", "1.1.1.1, 192.128.1.1, 127.0.0.1")];
        assert_eq!(
            client_seen(conf.clone(), "127.0.0.1", &xff, "/").await,
            "1.1.1.1"
        );
        // A peer outside the trusted set is not believed.
        assert_eq!(
            client_seen(conf.clone(), "10.0.0.7", &xff, "/").await,
            "10.0.0.7"
        );
        let all_trusted = [("x-forwarded-for", "192.128.0.1, 127.0.0.1")];
        assert_eq!(
            client_seen(conf, "127.0.0.1", &all_trusted, "/").await,
            "192.128.0.1"
        );
    }
}
