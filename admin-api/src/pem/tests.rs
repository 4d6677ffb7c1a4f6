use super::*;
use crate::testcerts::{self, Pem};

fn err<T>(r: Result<T, String>) -> String {
    match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    }
}

/// A PEM block of `label` around base64 of `der`.
fn pem_block(label: &str, der: &[u8]) -> String {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                text.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                text.push('=');
            }
        }
    }
    format!("-----BEGIN {label}-----\n{text}\n-----END {label}-----\n")
}

#[test]
fn ecdsa_and_rsa_certificates_with_their_keys() {
    for pem in [testcerts::ecdsa("a.com"), testcerts::rsa("b.com")] {
        let chain = parse_cert_chain(&pem.cert).unwrap();
        assert_eq!(chain.len(), 1);
        parse_private_key(&pem.key).unwrap();
        let ck = certified_key(&pem.cert, &pem.key).unwrap();
        assert_eq!(ck.cert, chain);
    }
}

#[test]
fn pkcs1_and_sec1_keys_are_read() {
    let rsa = testcerts::rsa("a.com");
    certified_key(&rsa.cert, testcerts::RSA2048_PKCS1).unwrap();
    assert!(matches!(
        parse_private_key(testcerts::RSA2048_PKCS1),
        Ok(PrivateKeyDer::Pkcs1(_))
    ));
    assert!(matches!(
        parse_private_key(testcerts::P256_SEC1),
        Ok(PrivateKeyDer::Sec1(_))
    ));
}

#[test]
fn a_chain_is_read_leaf_first_and_its_ca_as_anchor() {
    let (leaf, ca) = testcerts::chain("a.com");
    let chain = parse_cert_chain(&leaf.cert).unwrap();
    assert_eq!(chain.len(), 2);
    certified_key(&leaf.cert, &leaf.key).unwrap();
    assert_eq!(parse_ca_certs(&ca).unwrap().len(), 1);
    // A bundle of two CAs, with text around the blocks.
    let bundle = format!("first\n{ca}\nsecond\n{}", testcerts::ecdsa("x").cert);
    assert_eq!(parse_ca_certs(&bundle).unwrap().len(), 2);
}

#[test]
fn text_that_is_no_certificate_gets_openssl_reason() {
    let first = "failed to parse cert: PEM_read_bio_X509_AUX() failed";
    assert_eq!(err(parse_cert_chain(&"x".repeat(200))), first);
    assert_eq!(err(parse_cert_chain("")), first);
    assert_eq!(err(parse_ca_certs("nothing")), first);
    let key = testcerts::ecdsa("a").key;
    assert_eq!(err(parse_cert_chain(&key)), first, "a key alone");
    // Armour without a valid body.
    let bad_base64 = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
    assert_eq!(err(parse_cert_chain(bad_base64)), first);
    let bad_der = pem_block("CERTIFICATE", b"not a certificate at all");
    assert_eq!(err(parse_cert_chain(&bad_der)), first);
    assert_eq!(err(parse_ca_certs(&bad_der)), first);
    // The second certificate of a chain is read by another function.
    let good = testcerts::ecdsa("a").cert;
    let next = "failed to parse cert: PEM_read_bio_X509() failed";
    assert_eq!(err(parse_cert_chain(&format!("{good}{bad_der}"))), next);
    assert_eq!(err(parse_cert_chain(&format!("{good}{bad_base64}"))), next);
    let unterminated = format!("{good}-----BEGIN CERTIFICATE-----\nAAAA\n");
    assert_eq!(err(parse_cert_chain(&unterminated)), next);
}

#[test]
fn certificates_rustls_cannot_use_say_why() {
    let odd = testcerts::unknown_critical_extension("a.com");
    let e = err(parse_cert_chain(&odd.cert));
    assert!(
        e.starts_with("failed to parse cert: certificate 1 is not supported: ")
            && e.contains("UnsupportedCriticalExtension"),
        "{e}"
    );
    let good = testcerts::ecdsa("a").cert;
    let e = err(parse_cert_chain(&format!("{good}{}", odd.cert)));
    assert!(e.contains("certificate 2 is not supported"), "{e}");
}

#[test]
fn unreadable_keys_get_openssl_reason() {
    let reason = "failed to parse key: PEM_read_bio_PrivateKey() failed";
    let cert = testcerts::ecdsa("a").cert;
    assert_eq!(err(parse_private_key(&cert)), reason, "a certificate");
    assert_eq!(
        err(parse_private_key(
            "-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n"
        )),
        reason
    );
    let encrypted = pem_block("ENCRYPTED PRIVATE KEY", &[0x30, 0x03, 0x02, 0x01, 0x00]);
    assert_eq!(err(parse_private_key(&encrypted)), reason);
}

#[test]
fn keys_that_are_not_pem_are_taken_for_encrypted_ones() {
    assert_eq!(
        err(parse_private_key(&"AAA".repeat(128))),
        "failed to decrypt previous encrypted key"
    );
    let key = testcerts::ecdsa("a").key;
    assert_eq!(
        err(parse_private_key(&format!("\n{key}"))),
        "failed to decrypt previous encrypted key",
        "as APISIX, the text must start with the armour"
    );
}

#[test]
fn keys_ring_cannot_sign_with_are_refused() {
    let e = err(parse_private_key(testcerts::RSA1024_PKCS8));
    assert!(e.starts_with("failed to parse key: unsupported key"), "{e}");
    let garbage = pem_block("PRIVATE KEY", b"0123456789abcdef0123456789abcdef");
    let e = err(parse_private_key(&garbage));
    assert!(e.starts_with("failed to parse key: unsupported key"), "{e}");
}

#[test]
fn a_key_of_another_certificate_is_refused() {
    let a = testcerts::ecdsa("a.com");
    let b = testcerts::ecdsa("a.com");
    let rsa = testcerts::rsa("a.com");
    let mismatch = "failed to parse key: the key does not match the certificate";
    assert_eq!(err(certified_key(&a.cert, &b.key)), mismatch);
    assert_eq!(err(certified_key(&a.cert, &rsa.key)), mismatch);
    assert_eq!(err(certified_key(&rsa.cert, &a.key)), mismatch);
    // The key must belong to the first certificate of the chain.
    let (leaf, ca) = testcerts::chain("a.com");
    let reversed = format!("{ca}{}", leaf.cert.replace(&ca, ""));
    assert_eq!(err(certified_key(&reversed, &leaf.key)), mismatch);
    // Certificate errors come before key errors.
    assert_eq!(
        err(certified_key("junk", "junk")),
        "failed to parse cert: PEM_read_bio_X509_AUX() failed"
    );
}

#[test]
fn messages_never_carry_key_material() {
    let Pem { cert, key } = testcerts::ecdsa("a.com");
    let other = testcerts::ecdsa("b.com");
    let broken_key = key.replace("-----END", "x-----END");
    let cases = [
        certified_key(&cert, &other.key).map(|_| ()),
        certified_key(&cert, &broken_key).map(|_| ()),
        certified_key(&cert, &key[5..]).map(|_| ()),
        parse_private_key(testcerts::RSA1024_PKCS8).map(|_| ()),
    ];
    let body_lines: Vec<&str> = key
        .lines()
        .chain(other.key.lines())
        .chain(testcerts::RSA1024_PKCS8.lines())
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for case in cases {
        let e = case.unwrap_err();
        for line in &body_lines {
            assert!(!e.contains(&line[..16]), "{e}");
        }
    }
}
