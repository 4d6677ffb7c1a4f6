//! Mutual TLS towards clients: an ssl object's `client.ca` and
//! `client.depth`, and what a request learns of the client certificate
//! (`$ssl_client_verify`, `$ssl_client_s_dn`, `$ssl_client_serial`).
//!
//! Chains are verified with webpki against the object's CA certificates,
//! for client authentication, allowing at most `depth` intermediates
//! between the client's certificate and a CA (OpenSSL's, so nginx's,
//! meaning of the verify depth).
//!
//! Without `skip_mtls_uri_regex` a client must present a valid certificate
//! or the handshake fails, as in APISIX. With it, the handshake takes any
//! certificate, or none (the signature over the handshake still proves the
//! client holds its key), and the request decides: paths the expressions
//! match pass, others need `$ssl_client_verify` to be `SUCCESS`.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::TrustAnchor;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use webpki::{EndEntityCert, KeyUsage};

/// The CA certificates clients of one ssl object are checked against.
pub struct ClientCa {
    anchors: Vec<TrustAnchor<'static>>,
    hints: Vec<DistinguishedName>,
    depth: usize,
    /// No certificate, or a bad one, fails the handshake.
    mandatory: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for ClientCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCa")
            .field("anchors", &self.anchors.len())
            .field("depth", &self.depth)
            .field("mandatory", &self.mandatory)
            .finish()
    }
}

/// What `$ssl_client_verify` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientVerify {
    /// No certificate was asked for or sent: `NONE`.
    None,
    /// `SUCCESS`.
    Success,
    /// `FAILED:<reason>`, the reason in OpenSSL's words.
    Failed(&'static str),
}

impl ClientVerify {
    pub fn as_var(&self) -> std::borrow::Cow<'static, str> {
        match self {
            ClientVerify::None => "NONE".into(),
            ClientVerify::Success => "SUCCESS".into(),
            ClientVerify::Failed(reason) => format!("FAILED:{reason}").into(),
        }
    }
}

impl ClientCa {
    /// Reads the PEM CA certificates of `client.ca`. Fails when none is
    /// there or one cannot be a trust anchor.
    pub fn new(ca_pem: &str, depth: u32, mandatory: bool) -> Result<Self, String> {
        let certs = admin_api::pem::parse_ca_certs(ca_pem)?;
        let mut anchors = Vec::with_capacity(certs.len());
        let mut hints = Vec::with_capacity(certs.len());
        for cert in &certs {
            let anchor = webpki::anchor_from_trusted_cert(cert)
                .map_err(|e| format!("client.ca: {e}"))?
                .to_owned();
            hints.push(DistinguishedName::from(anchor.subject.as_ref().to_vec()));
            anchors.push(anchor);
        }
        Ok(ClientCa {
            anchors,
            hints,
            depth: depth as usize,
            mandatory,
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        })
    }

    /// Checks a client's chain (leaf first).
    pub fn verify(&self, chain: &[CertificateDer<'_>], now: UnixTime) -> ClientVerify {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return ClientVerify::None;
        };
        match self.check(leaf, intermediates, now) {
            Ok(()) => ClientVerify::Success,
            Err(e) => ClientVerify::Failed(openssl_reason(&e)),
        }
    }

    fn check(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), webpki::Error> {
        let cert = EndEntityCert::try_from(leaf)?;
        let depth = self.depth;
        let within_depth = move |path: &webpki::VerifiedPath<'_>| {
            if path.intermediate_certificates().count() > depth {
                Err(webpki::Error::MaximumPathDepthExceeded)
            } else {
                Ok(())
            }
        };
        cert.verify_for_usage(
            self.algorithms.all,
            &self.anchors,
            intermediates,
            now,
            KeyUsage::client_auth(),
            None,
            Some(&within_depth),
        )
        .map(|_| ())
    }
}

/// OpenSSL's text for a verification failure, as nginx puts it after
/// `FAILED:`.
fn openssl_reason(e: &webpki::Error) -> &'static str {
    match e {
        webpki::Error::UnknownIssuer => "unable to get local issuer certificate",
        webpki::Error::CertExpired { .. } => "certificate has expired",
        webpki::Error::CertNotValidYet { .. } => "certificate is not yet valid",
        webpki::Error::MaximumPathDepthExceeded => "certificate chain too long",
        webpki::Error::InvalidSignatureForPublicKey => "certificate signature failure",
        webpki::Error::RequiredEkuNotFoundContext(_) => "unsupported certificate purpose",
        _ => "certificate verify failed",
    }
}

fn rustls_error(e: &webpki::Error) -> rustls::Error {
    rustls::Error::InvalidCertificate(match e {
        webpki::Error::UnknownIssuer | webpki::Error::MaximumPathDepthExceeded => {
            CertificateError::UnknownIssuer
        }
        webpki::Error::CertExpired { .. } => CertificateError::Expired,
        webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
        webpki::Error::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        webpki::Error::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        _ => CertificateError::BadEncoding,
    })
}

impl ClientCertVerifier for ClientCa {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self.mandatory {
            self.check(end_entity, intermediates, now)
                .map_err(|e| rustls_error(&e))?;
        }
        // Optional: the request judges, from `$ssl_client_verify`.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `$ssl_client_s_dn` (RFC 2253: last RDN first, `,`-joined) and
/// `$ssl_client_serial` (upper-case hex) of a client certificate.
pub fn subject_and_serial(cert: &CertificateDer<'_>) -> Option<(String, String)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let mut rdns: Vec<String> = Vec::new();
    for rdn in parsed.subject().iter() {
        let parts: Vec<String> = rdn
            .iter()
            .map(|atv| {
                let key = x509_parser::objects::oid2abbrev(
                    atv.attr_type(),
                    x509_parser::objects::oid_registry(),
                )
                .map(str::to_string)
                .unwrap_or_else(|_| atv.attr_type().to_id_string());
                let value = atv.as_str().map(escape_dn).unwrap_or_default();
                format!("{key}={value}")
            })
            .collect();
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    let serial = parsed
        .raw_serial_as_string()
        .replace(':', "")
        .to_uppercase();
    Some((rdns.join(","), serial))
}

/// RFC 2253 escaping of an attribute value.
fn escape_dn(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for (at, c) in value.char_indices() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (at == 0 && (c == '#' || c == ' '))
            || (c == ' ' && at + 1 == value.len());
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// What the TLS layer learnt of one client connection, for its requests.
#[derive(Debug)]
pub struct TlsInfo {
    /// `$ssl_server_name`, `$ssl_client_verify`, ...
    pub vars: Arc<plugins::TlsVars>,
    /// Whether the client certificate checked out.
    pub verify: ClientVerify,
    /// Set when the serving ssl object checks client certificates but
    /// exempts some paths: requests elsewhere need `verify == Success`.
    pub mtls: Option<Arc<super::MtlsPolicy>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dn_values_are_escaped() {
        assert_eq!(escape_dn("a,b"), "a\\,b");
        assert_eq!(escape_dn(" x "), "\\ x\\ ");
        assert_eq!(escape_dn("plain"), "plain");
        assert_eq!(escape_dn("#\u{e9} \u{e9} "), "\\#\u{e9} \u{e9}\\ ");
        assert_eq!(escape_dn(" "), "\\ ");
    }

    #[test]
    fn verify_var_words() {
        assert_eq!(ClientVerify::None.as_var(), "NONE");
        assert_eq!(ClientVerify::Success.as_var(), "SUCCESS");
        assert_eq!(
            ClientVerify::Failed("certificate has expired").as_var(),
            "FAILED:certificate has expired"
        );
    }
}
