//! TLS towards upstreams (`scheme: https`), with rustls.
//!
//! Certificates are verified by default, against the system's trust store
//! plus `apisix.ssl.ssl_trusted_certificate` when it names a PEM file. An
//! upstream with `"tls": {"verify": false}` skips verification (its traffic is
//! still encrypted, but anyone on the path can impersonate it); ferrogate
//! logs that once per upstream compile.

use std::path::Path;
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};

/// Why the trust store could not be built.
#[derive(Debug, thiserror::Error)]
#[error("trusted certificates: {0}")]
pub struct TlsError(String);

/// The roots upstream certificates are checked against.
pub fn trust_store(extra_pem: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A system store may hold certificates rustls cannot use; skip them.
        let _ = roots.add(cert);
    }
    if let Some(path) = extra_pem {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
        for cert in certs {
            let cert = cert.map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
            roots
                .add(cert)
                .map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
        }
    }
    Ok(roots)
}

/// A certificate an upstream's `tls` asks the gateway to present
/// (`client_cert`/`client_key`, or a `client` ssl object named by
/// `client_cert_id`).
#[derive(Clone)]
pub struct ClientCert {
    pub key: Arc<CertifiedKey>,
    /// Tells certificates apart when pools are shared: a hash of the chain.
    pub fingerprint: u64,
}

impl std::fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientCert({:016x})", self.fingerprint)
    }
}

impl ClientCert {
    /// Parses a PEM certificate chain and its key; fails with a message
    /// that never quotes the key.
    pub fn from_pem(cert: &str, key: &str) -> Result<Self, String> {
        let key = admin_api::pem::certified_key(cert, key)?;
        let mut hasher = std::hash::DefaultHasher::new();
        for c in &key.cert {
            std::hash::Hash::hash(c.as_ref(), &mut hasher);
        }
        Ok(ClientCert {
            fingerprint: std::hash::Hasher::finish(&hasher),
            key: Arc::new(key),
        })
    }
}

/// Presents the one certificate whenever a server asks for one.
#[derive(Debug)]
struct Present(Arc<CertifiedKey>);

impl ResolvesClientCert for Present {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A client configuration: verifying (`verify`) or not, presenting
/// `identity` when the server asks for a certificate.
pub fn client_config(
    roots: Arc<RootCertStore>,
    verify: bool,
    identity: Option<&ClientCert>,
) -> ClientConfig {
    let builder = ClientConfig::builder_with_provider(plugins::tls_client::provider())
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| ClientConfig::builder());
    // hyper-rustls sets ALPN itself (HTTP/1.1 only).
    let builder = if verify {
        builder.with_root_certificates(roots)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(plugins::tls_client::NoVerify::new()))
    };
    match identity {
        Some(id) => builder.with_client_cert_resolver(Arc::new(Present(id.key.clone()))),
        None => builder.with_no_client_auth(),
    }
}
