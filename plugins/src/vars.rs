//! Request variables by APISIX (nginx) name, read on demand.
//!
//! One lookup serves route `vars`, `chash` keys, `_meta.filter` and plugins:
//! `uri` (the normalised path), `request_uri`, `args`/`query_string`, `host`,
//! `request_method`, `remote_addr`, `remote_port`, `server_addr`,
//! `server_port`, `scheme`, `https`, `ssl_server_name`, `ssl_client_verify`,
//! `ssl_client_s_dn`, `ssl_client_serial`, `arg_NAME` (percent-decoded), `http_NAME`
//! (header, `_` for `-`, repeated headers joined with `, `) and
//! `cookie_NAME`. Response-side names (`status`, `upstream_status`,
//! `upstream_addr`, `sent_http_NAME`, `consumer_name`, `route_id`, ...) are
//! added by [`crate::ctx::Ctx::var`]. A variable the request does not have is
//! `None`; nothing here allocates unless the value has to be decoded or
//! joined.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, Method, Uri};

pub use crate::expr::Vars;

/// `ip` as text, as `Display` writes it. IPv4 (nearly every client) is
/// written digit by digit: `Display` goes through the formatting machinery
/// for each octet, which costs more than the rest of a rate-limit check.
pub fn ip_string(ip: IpAddr) -> String {
    let mut out = String::with_capacity(15);
    push_ip(&mut out, ip);
    out
}

/// Appends `ip` as [`ip_string`] writes it, without a `fmt` round trip for
/// IPv4.
pub fn push_ip(out: &mut String, ip: IpAddr) {
    let IpAddr::V4(v4) = ip else {
        use std::fmt::Write as _;
        let _ = write!(out, "{ip}");
        return;
    };
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
}

/// Facts about the client connection, set by the listener and carried in
/// the request extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The address the client connected to (`$server_addr`, `$server_port`).
    pub local: SocketAddr,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// The peer is in `apisix.trusted_addresses`: the X-Forwarded-Proto,
    /// -Host and -Port it sent are passed on instead of replaced.
    pub forwarded_trusted: bool,
    /// HTTPS connections: what the handshake settled.
    pub tls: Option<std::sync::Arc<TlsVars>>,
    /// Accepted on a transparent listener: `local` may be another host's
    /// address (the connection's original destination).
    pub transparent: bool,
}

/// The TLS facts of an HTTPS connection, as nginx's `$ssl_*` variables
/// give them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsVars {
    /// `$ssl_server_name`: the SNI the client sent (or `fallback_sni`).
    pub server_name: Option<Box<str>>,
    /// `$ssl_client_verify`: `NONE`, `SUCCESS` or `FAILED:<reason>`.
    pub client_verify: Cow<'static, str>,
    /// `$ssl_client_s_dn` (RFC 2253).
    pub client_s_dn: Option<String>,
    /// `$ssl_client_serial` (hex).
    pub client_serial: Option<String>,
}

impl ConnInfo {
    /// A connection with unknown addresses, for requests built in tests.
    pub fn unknown() -> Self {
        let any = SocketAddr::from(([0, 0, 0, 0], 0));
        ConnInfo {
            peer: any,
            local: any,
            scheme: "http",
            forwarded_trusted: false,
            tls: None,
            transparent: false,
        }
    }
}

/// Borrowed view of the request fields variables are read from.
#[derive(Clone, Copy)]
pub struct ReqRef<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    /// The normalised path (`$uri`).
    pub path: &'a str,
    /// Lower-cased, without port.
    pub host: Option<&'a str>,
    /// The judged client address (`$remote_addr`).
    pub client_ip: Option<IpAddr>,
    /// The client port real-ip found with that address, if any
    /// (`$remote_port`; the TCP peer's otherwise).
    pub client_port: Option<u16>,
    pub conn: Option<&'a ConnInfo>,
}

impl<'a> ReqRef<'a> {
    /// Looks up one variable.
    pub fn var(&self, name: &str) -> Option<Cow<'a, str>> {
        if let Some(arg) = name.strip_prefix("arg_") {
            return query_arg(self.uri.query()?, arg).map(Cow::Owned);
        }
        if let Some(h) = name.strip_prefix("http_") {
            return header_var(self.headers, h);
        }
        if let Some(c) = name.strip_prefix("cookie_") {
            return cookie(self.headers, c).map(Cow::Borrowed);
        }
        let conn = self.conn;
        match name {
            "uri" => Some(Cow::Borrowed(self.path)),
            "request_uri" => Some(Cow::Borrowed(
                self.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
            )),
            "args" | "query_string" => self.uri.query().map(Cow::Borrowed),
            "is_args" => Some(Cow::Borrowed(if self.uri.query().is_some() {
                "?"
            } else {
                ""
            })),
            "host" => self.host.map(Cow::Borrowed),
            "request_method" => Some(Cow::Borrowed(self.method.as_str())),
            "remote_addr" => self.client_ip.map(|ip| Cow::Owned(ip_string(ip))),
            "remote_port" => self
                .client_port
                .or(conn.map(|c| c.peer.port()))
                .map(|p| Cow::Owned(p.to_string())),
            "realip_remote_addr" => conn.map(|c| Cow::Owned(canonical(c.peer.ip()).to_string())),
            "realip_remote_port" => conn.map(|c| Cow::Owned(c.peer.port().to_string())),
            "server_addr" => conn.map(|c| Cow::Owned(canonical(c.local.ip()).to_string())),
            "server_port" => conn.map(|c| Cow::Owned(c.local.port().to_string())),
            "scheme" => conn.map(|c| Cow::Borrowed(c.scheme)),
            "https" => conn.map(|c| Cow::Borrowed(if c.tls.is_some() { "on" } else { "" })),
            "ssl_server_name" => conn
                .and_then(|c| c.tls.as_ref()?.server_name.as_deref())
                .map(Cow::Borrowed),
            "ssl_client_verify" => conn
                .and_then(|c| c.tls.as_ref())
                .map(|t| Cow::Borrowed(t.client_verify.as_ref())),
            "ssl_client_s_dn" => conn
                .and_then(|c| c.tls.as_ref()?.client_s_dn.as_deref())
                .map(Cow::Borrowed),
            "ssl_client_serial" => conn
                .and_then(|c| c.tls.as_ref()?.client_serial.as_deref())
                .map(Cow::Borrowed),
            _ => None,
        }
    }
}

/// An IPv4 address seen through a dual-stack socket (`::ffff:a.b.c.d`) as
/// plain IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The first value of query argument `name`, percent-decoded.
pub fn query_arg(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

/// `$http_x_tier`: the header `x-tier`, repeated values joined by `, `.
pub fn header_var<'a>(headers: &'a HeaderMap, underscored: &str) -> Option<Cow<'a, str>> {
    let mut values = if underscored.contains('_') {
        headers
            .get_all(underscored.replace('_', "-").as_str())
            .iter()
    } else {
        headers.get_all(underscored).iter()
    }
    .filter_map(|v| v.to_str().ok());
    let first = values.next()?;
    match values.next() {
        None => Some(Cow::Borrowed(first)),
        Some(second) => {
            let mut joined = format!("{first}, {second}");
            for more in values {
                joined.push_str(", ");
                joined.push_str(more);
            }
            Some(Cow::Owned(joined))
        }
    }
}

/// The value of cookie `name` from the `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// Decodes `%XX` escapes and `+`; invalid escapes are kept as they are.
pub fn percent_decode(s: &str) -> String {
    String::from_utf8_lossy(&percent_decode_bytes(s)).into_owned()
}

/// `%XX` and `+` decoded, as nginx decodes arguments; bytes, not text.
/// Invalid escapes (`%zz`, `%+1`, a `%` near the end) are kept as they are.
pub fn percent_decode_bytes(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h << 4) | l);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_keeps_invalid_escapes() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        // `+` after a kept `%` is still a space.
        assert_eq!(percent_decode("%zz%+1%4"), "%zz% 1%4");
        assert_eq!(percent_decode_bytes("%ff"), vec![0xff]);
    }

    #[test]
    fn request_variables() {
        let uri: Uri = "/a/b?x=1&name=J%20D&flag".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.append("x-tier", "gold".parse().unwrap());
        headers.append("x-tier", "silver".parse().unwrap());
        headers.append("cookie", "a=1; sid=xyz".parse().unwrap());
        let conn = ConnInfo {
            peer: "10.0.0.9:5555".parse().unwrap(),
            local: "[::ffff:127.0.0.1]:9080".parse().unwrap(),
            scheme: "http",
            forwarded_trusted: false,
            tls: None,
            transparent: false,
        };
        let r = ReqRef {
            client_port: None,
            method: &Method::GET,
            uri: &uri,
            headers: &headers,
            path: "/a/b",
            host: Some("example.com"),
            client_ip: Some("10.0.0.9".parse().unwrap()),
            conn: Some(&conn),
        };
        let v = |n: &str| r.var(n).map(|c| c.into_owned());
        assert_eq!(v("uri").as_deref(), Some("/a/b"));
        assert_eq!(
            v("request_uri").as_deref(),
            Some("/a/b?x=1&name=J%20D&flag")
        );
        assert_eq!(v("arg_name").as_deref(), Some("J D"));
        assert_eq!(v("arg_flag").as_deref(), Some(""));
        assert_eq!(v("arg_none"), None);
        assert_eq!(v("http_x_tier").as_deref(), Some("gold, silver"));
        assert_eq!(v("cookie_sid").as_deref(), Some("xyz"));
        assert_eq!(v("remote_addr").as_deref(), Some("10.0.0.9"));
        for text in [
            "0.0.0.0",
            "1.20.199.255",
            "100.9.10.99",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(ip_string(ip), text);
        }
        assert_eq!(v("remote_port").as_deref(), Some("5555"));
        assert_eq!(v("server_addr").as_deref(), Some("127.0.0.1"));
        assert_eq!(v("server_port").as_deref(), Some("9080"));
        assert_eq!(v("is_args").as_deref(), Some("?"));
        assert_eq!(v("nope"), None);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c%zz%"), "a b c%zz%");
    }
}
