//! Making upstream connections: TCP within the `connect` timeout's budget,
//! then TLS with a given server name ([`dial`]), for the data plane's pools
//! ([`crate::h1_upstream`], [`crate::h2_upstream`]); and TLS server names.
//!
//! The active health prober goes through
//! hyper-util's client, whose connector only sees a URI: there the name to
//! verify travels in the URI's user-info part (`name@10.0.0.5:443`), which
//! [`server_name`] reads back; the prober sends its requests in origin form,
//! so the user-info never reaches the wire.

use std::net::IpAddr;
use std::sync::Arc;

use http::uri::Authority;
use http::Uri;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Why no connection to a node could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    TimedOut(std::time::Duration),
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS server name {0:?} is invalid")]
    ServerName(String),
    #[error("HTTP handshake: {0}")]
    Handshake(#[from] hyper::Error),
}

/// A byte stream to a node, plain or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// Connects to `node` (a DNS name is resolved; each address is tried in
/// turn), from `source` when given (a client's address, see
/// [`crate::tproxy::connect_from`]), then, with `tls` = (config, server
/// name), runs the TLS handshake.
pub async fn dial(
    node: &Authority,
    tls: Option<(&Arc<ClientConfig>, &str)>,
    source: Option<IpAddr>,
) -> Result<Box<dyn Stream>, ConnectError> {
    let tcp = match source {
        None => TcpStream::connect(node.as_str()).await?,
        Some(source) => connect_from(source, node).await?,
    };
    let _ = tcp.set_nodelay(true);
    let Some((config, name)) = tls else {
        return Ok(Box::new(tcp));
    };
    let server_name = ServerName::try_from(name.to_string())
        .map_err(|_| ConnectError::ServerName(name.to_string()))?;
    let stream = tokio_rustls::TlsConnector::from(config.clone())
        .connect(server_name, tcp)
        .await?;
    Ok(Box::new(stream))
}

/// Connects from `source` to the first of `node`'s addresses in its family.
async fn connect_from(source: IpAddr, node: &Authority) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host(node.as_str()).await? {
        if addr.is_ipv4() != source.is_ipv4() {
            continue;
        }
        match crate::tproxy::connect_from(source, addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{node} has no address in the family of the client's {source}"),
        )
    }))
}

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
