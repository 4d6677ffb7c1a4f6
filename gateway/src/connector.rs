//! TLS server names for upstream connections.
//!
//! The data plane's pools ([`crate::h1_upstream`], [`crate::h2_upstream`])
//! are given the name to use directly. The active health prober goes through
//! hyper-util's client, whose connector only sees a URI: there the name to
//! verify travels in the URI's user-info part (`name@10.0.0.5:443`), which
//! [`server_name`] reads back; the prober sends its requests in origin form,
//! so the user-info never reaches the wire.

use http::uri::Authority;
use http::Uri;
use rustls_pki_types::ServerName;

/// The TLS server name for a connection to `uri` (see the module docs).
pub fn server_name(
    uri: &Uri,
) -> Result<ServerName<'static>, rustls_pki_types::InvalidDnsNameError> {
    let authority = uri.authority().map(Authority::as_str).unwrap_or_default();
    let host = match authority.rsplit_once('@') {
        Some((name, _)) => name,
        None => uri.host().unwrap_or_default(),
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(host.to_string())
}

/// The DNS name in a `Host`-style `name[:port]`; `None` for an IP address
/// (verified as the node's own) or anything that is not a DNS name.
pub fn dns_name(name: &str) -> Option<&str> {
    let name = name.rsplit_once(':').map_or(name, |(host, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            host
        } else {
            name
        }
    });
    match ServerName::try_from(name) {
        Ok(ServerName::DnsName(_)) => Some(name),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_comes_from_user_info_or_host() {
        let plain: Uri = "https://10.0.0.5:8443/x".parse().unwrap();
        assert_eq!(
            server_name(&plain).unwrap(),
            ServerName::try_from("10.0.0.5").unwrap()
        );
        let named: Uri = "https://api.example.com@10.0.0.5:8443/x".parse().unwrap();
        assert_eq!(
            server_name(&named).unwrap(),
            ServerName::try_from("api.example.com").unwrap()
        );
        let v6: Uri = "https://[::1]:8443/".parse().unwrap();
        assert!(matches!(server_name(&v6), Ok(ServerName::IpAddress(_))));
    }

    #[test]
    fn only_dns_names_are_names() {
        assert_eq!(dns_name("api.example.com:8443"), Some("api.example.com"));
        assert_eq!(dns_name("api.example.com"), Some("api.example.com"));
        assert_eq!(dns_name("192.0.2.1"), None);
        assert_eq!(dns_name("bad name"), None);
        assert_eq!(dns_name("a/b@c"), None);
    }
}
