//! Certificates for tests, made with rcgen. ring cannot generate RSA keys,
//! so the RSA keys (and the SEC1 EC key) are fixed files in `testcerts/`,
//! generated with `openssl genpkey` for these tests only.

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, IsCa, Issuer, KeyPair, PKCS_RSA_SHA256,
};

pub const RSA2048_PKCS8: &str = include_str!("testcerts/rsa2048.pkcs8.pem");
/// The same key as [`RSA2048_PKCS8`], as `RSA PRIVATE KEY`.
pub const RSA2048_PKCS1: &str = include_str!("testcerts/rsa2048.pkcs1.pem");
/// Too short for ring to sign with.
pub const RSA1024_PKCS8: &str = include_str!("testcerts/rsa1024.pkcs8.pem");
/// A P-256 key as `EC PRIVATE KEY`.
pub const P256_SEC1: &str = include_str!("testcerts/p256.sec1.pem");
/// The same key as [`P256_SEC1`], as PKCS#8 (which rcgen signs with).
const P256_PKCS8: &str = include_str!("testcerts/p256.pkcs8.pem");

/// A PEM certificate (or chain) and its PEM key.
pub struct Pem {
    pub cert: String,
    pub key: String,
}

fn self_signed(params: CertificateParams, key: KeyPair) -> Pem {
    let cert = params.self_signed(&key).unwrap().pem();
    Pem {
        cert,
        key: key.serialize_pem(),
    }
}

/// A self-signed ECDSA P-256 certificate for `name`.
pub fn ecdsa(name: &str) -> Pem {
    self_signed(
        CertificateParams::new(vec![name.to_string()]).unwrap(),
        KeyPair::generate().unwrap(),
    )
}

/// A self-signed RSA-2048 certificate for `name` (key: PKCS#8).
pub fn rsa(name: &str) -> Pem {
    let key = KeyPair::from_pem_and_sign_algo(RSA2048_PKCS8, &PKCS_RSA_SHA256).unwrap();
    self_signed(CertificateParams::new(vec![name.to_string()]).unwrap(), key)
}

/// A self-signed P-256 certificate for `name` whose key is [`P256_SEC1`].
pub fn sec1(name: &str) -> Pem {
    let mut pem = self_signed(
        CertificateParams::new(vec![name.to_string()]).unwrap(),
        KeyPair::from_pem(P256_PKCS8).unwrap(),
    );
    pem.key = P256_SEC1.to_string();
    pem
}

/// A certificate with a critical extension nobody knows.
pub fn unknown_critical_extension(name: &str) -> Pem {
    let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
    let mut ext = CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![5, 0]);
    ext.set_criticality(true);
    params.custom_extensions.push(ext);
    self_signed(params, KeyPair::generate().unwrap())
}

/// A CA and a leaf it issued for `name`: `leaf.cert` is the chain (leaf,
/// then CA), `leaf.key` the leaf's key; the second value is the CA's PEM.
pub fn chain(name: &str) -> (Pem, String) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap()
        .pem();
    (
        Pem {
            cert: format!("{leaf}{ca_cert}"),
            key: leaf_key.serialize_pem(),
        },
        ca_cert,
    )
}
