//! How upstream connections are made and what the gateway keeps per
//! connection.
//!
//! - **Requests per connection** (`keepalive_pool.requests`, nginx's
//!   `keepalive_requests`): every connection carries a [`RequestCount`] as
//!   hyper's connection extra, so each answer says which connection it came
//!   on; once a connection has served its share, the proxy poisons it and
//!   the pool drops it instead of reusing it.
//! - **TLS server name** (HTTP/1.1 upstreams; HTTP/2 ones are in
//!   [`crate::h2_upstream`]): the name sent as SNI and checked against the
//!   certificate is the URI's host, unless the URI's authority carries a
//!   name in its user-info part (`name@10.0.0.5:443`). The proxy puts
//!   `upstream_host` there for `pass_host: rewrite`, so the upstream sees the
//!   name the request is for, and because the pool is keyed by the whole
//!   authority, a connection made for one name is never reused for another.
//!   The user-info never reaches the wire: requests are sent in origin form
//!   with their own `Host`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::uri::Authority;
use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use rustls_pki_types::ServerName;

/// Requests sent on one upstream connection so far.
#[derive(Debug, Clone, Default)]
pub struct RequestCount(Arc<AtomicU32>);

impl RequestCount {
    /// Counts one more answer; true once `limit` answers have come on this
    /// connection (it must not carry another request).
    pub fn served_out(&self, limit: u32) -> bool {
        self.0.fetch_add(1, Ordering::Relaxed).saturating_add(1) >= limit
    }
}

/// Gives every connection made by `C` its own [`RequestCount`].
#[derive(Debug, Clone)]
pub struct CountingConnector<C> {
    inner: C,
}

impl<C> CountingConnector<C> {
    pub fn new(inner: C) -> Self {
        CountingConnector { inner }
    }
}

impl<C> tower::Service<Uri> for CountingConnector<C>
where
    C: tower::Service<Uri>,
    C::Future: Send + 'static,
{
    type Response = Counted<C::Response>;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, C::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connecting = self.inner.call(dst);
        Box::pin(async move {
            Ok(Counted {
                io: connecting.await?,
                requests: RequestCount::default(),
            })
        })
    }
}

/// A connection with its [`RequestCount`].
#[derive(Debug)]
pub struct Counted<T> {
    io: T,
    requests: RequestCount,
}

impl<T: Connection> Connection for Counted<T> {
    fn connected(&self) -> Connected {
        self.io.connected().extra(self.requests.clone())
    }
}

impl<T: Read + Unpin> Read for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
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

/// `authority` dialled, with `name` as the TLS server name; `None` when
/// `name` is not a DNS name (see [`dns_name`]).
pub fn with_server_name(name: &str, authority: &Authority) -> Option<Authority> {
    dns_name(name).and_then(|name| format!("{name}@{authority}").parse().ok())
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
    fn only_dns_names_become_server_names() {
        let node: Authority = "10.0.0.5:8443".parse().unwrap();
        assert_eq!(
            with_server_name("api.example.com:8443", &node)
                .unwrap()
                .as_str(),
            "api.example.com@10.0.0.5:8443"
        );
        assert!(with_server_name("192.0.2.1", &node).is_none());
        assert!(with_server_name("bad name", &node).is_none());
        assert!(with_server_name("a/b@c", &node).is_none());
    }

    #[test]
    fn a_connection_is_served_out_at_its_limit() {
        let count = RequestCount::default();
        assert!(!count.served_out(3));
        assert!(!count.served_out(3));
        assert!(count.served_out(3));
        assert!(RequestCount::default().served_out(1));
    }
}
