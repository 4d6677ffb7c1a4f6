//! PEM certificates and private keys, read the way the data plane uses them
//! (rustls with the `ring` provider), failing with APISIX's messages.
//!
//! APISIX reads certificates with OpenSSL and reports OpenSSL's function
//! names (`failed to parse cert: PEM_read_bio_X509_AUX() failed`); those
//! texts are kept for everything OpenSSL would refuse too (no PEM block, bad
//! base64, bad DER). ferrogate is stricter in three ways, each with its own
//! reason: a certificate rustls cannot use (not X.509 v3, an unknown critical
//! extension), a key `ring` cannot sign with (RSA under 2048 bits, P-521,
//! DSA), and a key that does not belong to its certificate.
//!
//! No message here ever contains key material: reasons are fixed texts.

use std::sync::Arc;

use rustls::sign::{CertifiedKey, SigningKey};
use rustls::{CertificateError, InconsistentKeys, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// OpenSSL's reason, as APISIX reports it, when the first certificate of a
/// PEM text cannot be read.
const FIRST_CERT_UNREADABLE: &str = "PEM_read_bio_X509_AUX() failed";
/// The same for a later certificate of the chain.
const NEXT_CERT_UNREADABLE: &str = "PEM_read_bio_X509() failed";
/// OpenSSL's reason, as APISIX reports it, for a key it cannot read.
const KEY_UNREADABLE: &str = "PEM_read_bio_PrivateKey() failed";
/// APISIX's message for a key that is not PEM: it takes such a key for one
/// encrypted with its `data_encryption` keyring, which ferrogate does not
/// have.
const KEY_ENCRYPTED: &str = "failed to decrypt previous encrypted key";
/// Why a PEM key that parses is refused: `ring` cannot sign with it.
const KEY_UNSUPPORTED: &str =
    "unsupported key (ferrogate takes RSA of 2048 to 8192 bits, ECDSA P-256 or P-384, Ed25519)";
/// Why a key is refused that does not belong to the certificate.
pub const KEY_MISMATCH: &str = "the key does not match the certificate";

/// Reads a PEM certificate chain, leaf first; every certificate must parse
/// as an X.509 v3 certificate rustls can use. Text around the PEM blocks and
/// blocks of other kinds (a key in the same text) are skipped, as OpenSSL
/// does.
///
/// `Err` is the whole message, `failed to parse cert: <reason>`.
pub fn parse_cert_chain(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = read_certs(pem)?;
    for (i, der) in chain.iter().enumerate() {
        rustls::server::ParsedCertificate::try_from(der).map_err(|e| cert_error(i, e))?;
    }
    Ok(chain)
}

/// Reads PEM CA certificates (for `client.ca`): each must parse as a trust
/// anchor, which, unlike [`parse_cert_chain`], admits X.509 v1 roots.
///
/// `Err` is the whole message, `failed to parse cert: <reason>`.
pub fn parse_ca_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = read_certs(pem)?;
    let mut store = RootCertStore::empty();
    for (i, der) in certs.iter().enumerate() {
        store.add(der.clone()).map_err(|e| cert_error(i, e))?;
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC, the first one in
/// the text) that the `ring` provider can sign with. A text that does not
/// start with `---` is refused with APISIX's message for a key encrypted
/// with its keyring: `failed to decrypt previous encrypted key`.
///
/// `Err` is the whole message (`failed to parse key: <reason>` otherwise),
/// never any part of the key.
pub fn parse_private_key(pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    load_key(pem).map(|(der, _)| der)
}

/// Reads a certificate chain and its private key into what rustls serves
/// or presents, with the `ring` provider, after checking that the key
/// belongs to the leaf certificate (`failed to parse key: the key does not
/// match the certificate`). Certificate errors come first, as in APISIX.
///
/// `Err` is the whole message, as from [`parse_cert_chain`] and
/// [`parse_private_key`].
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, String> {
    let chain = parse_cert_chain(cert_pem)?;
    let (_, signing_key) = load_key(key_pem)?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // `ring` keys always know their public key; a provider that could
        // not tell is not a reason to refuse.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(certified),
        Err(_) => Err(format!("failed to parse key: {KEY_MISMATCH}")),
    }
}

fn load_key(pem: &str) -> Result<(PrivateKeyDer<'static>, Arc<dyn SigningKey>), String> {
    if !pem.starts_with("---") {
        return Err(KEY_ENCRYPTED.to_string());
    }
    // The PEM error may quote a line of the text: not repeated.
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| format!("failed to parse key: {KEY_UNREADABLE}"))?;
    let signing_key = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(der.clone_key())
        .map_err(|_| format!("failed to parse key: {KEY_UNSUPPORTED}"))?;
    Ok((der, signing_key))
}

fn read_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        match item {
            Ok(der) => certs.push(der),
            Err(_) => return Err(cert_unreadable(certs.len())),
        }
    }
    if certs.is_empty() {
        return Err(cert_unreadable(0));
    }
    Ok(certs)
}

fn cert_unreadable(index: usize) -> String {
    let reason = if index == 0 {
        FIRST_CERT_UNREADABLE
    } else {
        NEXT_CERT_UNREADABLE
    };
    format!("failed to parse cert: {reason}")
}

/// `index` is 0-based.
fn cert_error(index: usize, e: rustls::Error) -> String {
    let reason = match e {
        // What OpenSSL refuses as well: APISIX's words.
        rustls::Error::InvalidCertificate(CertificateError::BadEncoding) => {
            return cert_unreadable(index)
        }
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => other.to_string(),
        other => other.to_string(),
    };
    format!(
        "failed to parse cert: certificate {} is not supported: {reason}",
        index + 1
    )
}

#[cfg(test)]
mod tests;
