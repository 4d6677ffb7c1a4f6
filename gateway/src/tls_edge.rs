//! HTTPS towards clients: the `apisix.ssl` listener settings, ssl objects
//! compiled into rustls server configurations, and the handshake that picks
//! one by SNI from the live snapshot.
//!
//! Every ssl object becomes one [`ServerConfig`] when it is stored (its
//! certificates parsed once, its protocols, its client CA), kept in the
//! snapshot's [`SniTable`]. A handshake reads the ClientHello, looks its
//! name up in the snapshot current at that moment and continues with that
//! object's configuration, so a certificate stored through the Admin API
//! serves the next handshake; connections already up keep theirs.
//!
//! Failure modes: a client without SNI (and no `fallback_sni`), or with a
//! name no object covers, gets no certificate: the connection is closed
//! during the handshake, as APISIX does. An object that does not compile
//! (which the Admin API refuses) is logged and not served.

pub mod client_auth;
pub mod sessions;
pub mod sni;

use std::sync::Arc;
use std::time::Duration;

use regex::RegexSet;
use rustls::crypto::CryptoProvider;
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SupportedCipherSuite, SupportedProtocolVersion};
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

use admin_api::model::SslConf;

use crate::config::SslListen;
use crate::snapshot::SharedSnapshot;
pub use client_auth::{ClientCa, ClientVerify, TlsInfo};
pub use sni::SniTable;

/// Sessions the shared server cache remembers for resumption.
const SESSION_CACHE_SIZE: usize = 20_000;
/// Sessions each ssl object with mutual TLS remembers (its own cache).
const MTLS_SESSION_CACHE_SIZE: usize = 2_000;

/// Listener-wide TLS settings every ssl object's configuration starts from.
pub struct TlsEdge {
    provider: Arc<CryptoProvider>,
    versions: Vec<&'static SupportedProtocolVersion>,
    /// One cache for every ssl object, so resumption survives a
    /// certificate update.
    sessions: Arc<sessions::SessionCache>,
    ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
    /// The name assumed when a client sends no SNI.
    pub fallback_sni: Option<Box<str>>,
    /// Deadline of a handshake (`client_header_timeout`).
    pub handshake_timeout: Duration,
}

impl std::fmt::Debug for TlsEdge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsEdge")
            .field("versions", &self.versions)
            .field("tickets", &self.ticketer.is_some())
            .field("fallback_sni", &self.fallback_sni)
            .finish_non_exhaustive()
    }
}

/// An ssl object ready to serve handshakes.
#[derive(Debug)]
pub struct ServedSsl {
    pub id: Arc<str>,
    /// The names it serves (`sni`/`snis`), normalized.
    pub names: Vec<String>,
    pub config: Arc<ServerConfig>,
    pub mtls: Option<Arc<MtlsPolicy>>,
}

/// Client-certificate checking of one ssl object.
#[derive(Debug)]
pub struct MtlsPolicy {
    pub ca: Arc<ClientCa>,
    /// `skip_mtls_uri_regex`: paths served without a valid certificate.
    /// `None`: the handshake already refused clients without one.
    pub skip: Option<RegexSet>,
}

impl MtlsPolicy {
    /// Whether a request for `path` may go on, given what the handshake
    /// found.
    pub fn admits(&self, path: &str, verify: &ClientVerify) -> bool {
        *verify == ClientVerify::Success || self.skip.as_ref().is_some_and(|s| s.is_match(path))
    }
}

/// The handshake did not give a connection to serve.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("no server name (SNI) and no fallback_sni")]
    NoServerName,
    #[error("failed to find any SSL certificate by SNI: {0}")]
    NoCertificate(String),
    #[error("client certificate required")]
    NoClientCertificate,
    #[error("TLS handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS handshake not finished within client_header_timeout")]
    TimedOut,
}

impl TlsEdge {
    /// Maps `apisix.ssl` onto rustls. Protocols and cipher names rustls
    /// does not implement (TLSv1.1, DHE suites) are logged once and left
    /// out; fails only when nothing usable is left.
    pub fn new(conf: &SslListen, handshake_timeout: Duration) -> Result<Self, String> {
        let versions = versions_of(&conf.protocols);
        if versions.is_empty() {
            return Err("apisix.ssl.ssl_protocols: no protocol ferrogate supports".into());
        }
        let mut provider = rustls::crypto::ring::default_provider();
        if let Some(names) = &conf.ciphers {
            provider.cipher_suites = suites_of(names, &provider.cipher_suites);
        }
        let ticketer = if conf.session_tickets {
            Some(rustls::crypto::ring::Ticketer::new().map_err(|e| e.to_string())?)
        } else {
            None
        };
        Ok(TlsEdge {
            provider: Arc::new(provider),
            versions,
            sessions: Arc::new(sessions::SessionCache::new(SESSION_CACHE_SIZE)),
            ticketer,
            fallback_sni: conf.fallback_sni.as_deref().map(Box::from),
            handshake_timeout,
        })
    }

    /// Compiles a `server` ssl object. Fails with a message naming what is
    /// wrong (never key material).
    pub fn compile(&self, id: &str, conf: &SslConf) -> Result<ServedSsl, String> {
        let keys = conf
            .pairs()
            .map(|(cert, key)| admin_api::pem::certified_key(cert, key).map(Arc::new))
            .collect::<Result<Vec<_>, String>>()?;
        let versions = match &conf.ssl_protocols {
            Some(list) => {
                let v = versions_of(list);
                if v.is_empty() {
                    return Err(format!(
                        "ssl_protocols {list:?}: no protocol ferrogate supports"
                    ));
                }
                v
            }
            None => self.versions.clone(),
        };
        let builder = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&versions)
            .map_err(|e| e.to_string())?;
        let mtls = match &conf.client {
            Some(client) => {
                let mandatory = client.skip_mtls_uri_regex.is_none();
                let ca = Arc::new(ClientCa::new(&client.ca, client.depth, mandatory)?);
                let skip = match &client.skip_mtls_uri_regex {
                    Some(list) => Some(admin_api::validate::ssl::skip_mtls_uri_regex_set(list)?),
                    None => None,
                };
                Some(Arc::new(MtlsPolicy { ca, skip }))
            }
            None => None,
        };
        let builder = match &mtls {
            Some(policy) => builder.with_client_cert_verifier(policy.ca.clone()),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(CertSet {
            keys,
            suites: self.provider.cipher_suites.clone(),
        }));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        if mtls.is_some() {
            // A resumed session skips the client certificate check, so an
            // object that checks them resumes only sessions it made itself
            // (not one from before its CA was set or changed).
            config.session_storage = Arc::new(sessions::SessionCache::new(MTLS_SESSION_CACHE_SIZE));
            if self.ticketer.is_some() {
                config.ticketer =
                    rustls::crypto::ring::Ticketer::new().map_err(|e| e.to_string())?;
            }
        } else {
            config.session_storage = self.sessions.clone();
            if let Some(t) = &self.ticketer {
                config.ticketer = t.clone();
            }
        }
        Ok(ServedSsl {
            id: Arc::from(id),
            names: conf.names(),
            config: Arc::new(config),
            mtls,
        })
    }

    /// Runs the server side of a handshake on `stream`, choosing the
    /// certificate from the snapshot live at the ClientHello; bounded by
    /// `client_header_timeout`.
    pub async fn accept<IO>(
        &self,
        stream: IO,
        live: &SharedSnapshot,
    ) -> Result<(TlsStream<IO>, TlsInfo), HandshakeError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let handshake = async {
            let start = LazyConfigAcceptor::new(Acceptor::default(), stream).await?;
            let hello = start.client_hello();
            let name: Box<str> = match hello.server_name() {
                Some(n) => sni::normalize(n).into(),
                None => self
                    .fallback_sni
                    .clone()
                    .ok_or(HandshakeError::NoServerName)?,
            };
            let served = live
                .load()
                .certs
                .find(&name)
                .cloned()
                .ok_or_else(|| HandshakeError::NoCertificate(name.to_string()))?;
            let stream = start.into_stream(served.config.clone()).await?;
            let (verify, subject) = match &served.mtls {
                None => (ClientVerify::None, None),
                Some(policy) => {
                    let chain = stream.get_ref().1.peer_certificates().unwrap_or_default();
                    let verify = match (policy.skip.is_none(), chain.is_empty()) {
                        // The handshake refuses what does not verify.
                        (true, false) => ClientVerify::Success,
                        // Mandatory, yet none: only a resumed session could
                        // get here; refuse rather than trust it.
                        (true, true) => return Err(HandshakeError::NoClientCertificate),
                        (false, _) => policy.ca.verify(chain, rustls::pki_types::UnixTime::now()),
                    };
                    (
                        verify,
                        chain.first().and_then(client_auth::subject_and_serial),
                    )
                }
            };
            let (client_s_dn, client_serial) = subject.unzip();
            let info = TlsInfo {
                vars: Arc::new(plugins::TlsVars {
                    server_name: Some(name),
                    client_verify: verify.as_var(),
                    client_s_dn,
                    client_serial,
                }),
                verify,
                mtls: served.mtls.clone().filter(|p| p.skip.is_some()),
            };
            Ok((stream, info))
        };
        tokio::time::timeout(self.handshake_timeout, handshake)
            .await
            .unwrap_or(Err(HandshakeError::TimedOut))
    }
}

/// rustls's protocol versions for APISIX's names; others are logged.
fn versions_of(names: &[String]) -> Vec<&'static SupportedProtocolVersion> {
    let mut out = Vec::new();
    for name in names {
        match name.as_str() {
            "TLSv1.3" => out.push(&rustls::version::TLS13),
            "TLSv1.2" => out.push(&rustls::version::TLS12),
            other => tracing::warn!(protocol = other, "TLS protocol not supported; left out"),
        }
    }
    out
}

/// The suites named in an OpenSSL cipher list (`:`-separated). TLS 1.3
/// suites are always kept: OpenSSL's cipher list does not govern them
/// either. Names with no equivalent are logged once; with no usable TLS
/// 1.2 name at all, the provider's defaults stay.
fn suites_of(names: &str, all: &[SupportedCipherSuite]) -> Vec<SupportedCipherSuite> {
    use rustls::CipherSuite as C;
    let mut chosen: Vec<SupportedCipherSuite> = all
        .iter()
        .filter(|s| s.version() == &rustls::version::TLS13)
        .copied()
        .collect();
    let tls13 = chosen.len();
    let mut unknown = Vec::new();
    for name in names.split(':').map(str::trim).filter(|n| !n.is_empty()) {
        let id = match name {
            "ECDHE-ECDSA-AES128-GCM-SHA256" => C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            "ECDHE-RSA-AES128-GCM-SHA256" => C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            "ECDHE-ECDSA-AES256-GCM-SHA384" => C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            "ECDHE-RSA-AES256-GCM-SHA384" => C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            "ECDHE-ECDSA-CHACHA20-POLY1305" => C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            "ECDHE-RSA-CHACHA20-POLY1305" => C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
            "TLS_AES_128_GCM_SHA256"
            | "TLS_AES_256_GCM_SHA384"
            | "TLS_CHACHA20_POLY1305_SHA256" => continue,
            other => {
                unknown.push(other);
                continue;
            }
        };
        if let Some(s) = all.iter().find(|s| s.suite() == id) {
            if !chosen.contains(s) {
                chosen.push(*s);
            }
        }
    }
    if !unknown.is_empty() {
        tracing::info!(
            ciphers = %unknown.join(":"),
            "ssl_ciphers names without a rustls equivalent are left out"
        );
    }
    if chosen.len() == tls13 {
        tracing::warn!("ssl_ciphers names no TLS 1.2 suite rustls has; its defaults stay");
        return all.to_vec();
    }
    chosen
}

/// The certificates of one ssl object; each handshake gets the first one
/// the client can use (an ECDSA-capable client gets ECDSA, an RSA-only
/// client RSA): one it can verify the signature of and, for a TLS 1.2-only
/// client, one a cipher suite it offers can carry.
#[derive(Debug)]
struct CertSet {
    keys: Vec<Arc<CertifiedKey>>,
    suites: Vec<SupportedCipherSuite>,
}

impl ResolvesServerCert for CertSet {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if self.keys.len() == 1 {
            return self.keys.first().cloned();
        }
        let schemes = hello.signature_schemes();
        let offered: Vec<&SupportedCipherSuite> = self
            .suites
            .iter()
            .filter(|s| hello.cipher_suites().contains(&s.suite()))
            .collect();
        let tls13 = offered
            .iter()
            .any(|s| s.version() == &rustls::version::TLS13);
        self.keys
            .iter()
            .find(|k| {
                let algorithm = k.key.algorithm();
                k.key.choose_scheme(schemes).is_some()
                    && (tls13
                        || offered
                            .iter()
                            .any(|s| s.usable_for_signature_algorithm(algorithm)))
            })
            .or_else(|| self.keys.first())
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apisix_default_ciphers_map_to_rustls_suites() {
        let all = rustls::crypto::ring::default_provider().cipher_suites;
        let names =
            "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES128-GCM-SHA256";
        let chosen = suites_of(names, &all);
        let tls12: Vec<_> = chosen
            .iter()
            .filter(|s| s.version() == &rustls::version::TLS12)
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            tls12,
            vec![
                rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
            ]
        );
        assert!(chosen
            .iter()
            .any(|s| s.version() == &rustls::version::TLS13));
        // Nothing usable: defaults.
        assert_eq!(
            suites_of("DHE-RSA-AES128-GCM-SHA256", &all).len(),
            all.len()
        );
    }

    #[test]
    fn protocols_map_and_old_ones_are_dropped() {
        let v = versions_of(&["TLSv1.1".into(), "TLSv1.3".into()]);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].version, rustls::ProtocolVersion::TLSv1_3);
    }
}
