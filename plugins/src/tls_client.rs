//! TLS toward the services plugins talk to (log collectors, trace
//! collectors), with rustls: the system's trust store, or no verification
//! where APISIX's plugin says so (`ssl_verify: false`, tcp-logger's `tls`).
//! The gateway's upstream TLS uses [`NoVerify`] too.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The crypto provider every TLS client here uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The system's trust store, read once; certificates rustls cannot use are
/// skipped.
pub fn native_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            Arc::new(roots)
        })
        .clone()
}

/// A client configuration that checks the server's certificate against the
/// system's trust store (`verify`), or accepts any certificate.
pub fn client_config(verify: bool) -> Arc<ClientConfig> {
    static CONFIGS: OnceLock<[Arc<ClientConfig>; 2]> = OnceLock::new();
    let [verifying, trusting] = CONFIGS.get_or_init(|| {
        let builder = || {
            ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap_or_else(|_| ClientConfig::builder())
        };
        [
            Arc::new(
                builder()
                    .with_root_certificates(native_roots())
                    .with_no_client_auth(),
            ),
            Arc::new(
                builder()
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(NoVerify::new()))
                    .with_no_client_auth(),
            ),
        ]
    });
    if verify {
        verifying.clone()
    } else {
        trusting.clone()
    }
}

/// Accepts any certificate (APISIX's `ssl_verify: false`), still checking
/// that the handshake is signed by the key in it: the traffic is encrypted,
/// but anyone on the path could impersonate the server.
#[derive(Debug)]
pub struct NoVerify(Arc<CryptoProvider>);

impl NoVerify {
    pub fn new() -> Self {
        NoVerify(provider())
    }
}

impl Default for NoVerify {
    fn default() -> Self {
        NoVerify::new()
    }
}

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An HTTP client for `http://` and `https://` collectors (HTTP/1.1),
/// verifying certificates or not as `verify` says.
pub type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<bytes::Bytes>,
>;

/// See [`HttpsClient`].
pub fn https_client(verify: bool) -> HttpsClient {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*client_config(verify)).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector)
}
