//! APISIX's `data_encryption`: secrets kept encrypted at rest in etcd.
//!
//! APISIX encrypts the fields each plugin lists (key-auth's `key`,
//! basic-auth's `password`, ...) and the private keys of ssl objects and
//! upstream client certificates before writing them to etcd, and decrypts
//! them on reading. The cipher is AES-CBC with PKCS#7 padding, each keyring
//! entry being both the key and the IV (16 bytes: AES-128, 32 bytes: AES-256
//! with the first 16 bytes as IV), output in standard base64. Encryption uses
//! the first entry; decryption tries each in turn, so a keyring can rotate.
//! A [`Keyring`] does the same, so a value written by APISIX reads here and
//! the other way round.

use aes::cipher::{block_padding::Pkcs7, BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::Value;

use crate::Kind;

/// `apisix.data_encryption.keyring` default in APISIX 3.x.
pub const DEFAULT_KEYRING: &[&str] = &["qeddd145sfvddff3", "edd1c9f0985e76a2"];

enum Key {
    Aes128([u8; 16]),
    Aes256([u8; 32]),
}

impl Key {
    fn encrypt(&self, plain: &[u8]) -> Vec<u8> {
        match self {
            Key::Aes128(k) => cbc::Encryptor::<aes::Aes128>::new(k.into(), k.into())
                .encrypt_padded_vec::<Pkcs7>(plain),
            Key::Aes256(k) => {
                let iv: [u8; 16] = iv_of(k);
                cbc::Encryptor::<aes::Aes256>::new(k.into(), (&iv).into())
                    .encrypt_padded_vec::<Pkcs7>(plain)
            }
        }
    }

    fn decrypt(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        match self {
            Key::Aes128(k) => cbc::Decryptor::<aes::Aes128>::new(k.into(), k.into())
                .decrypt_padded_vec::<Pkcs7>(sealed)
                .ok(),
            Key::Aes256(k) => {
                let iv: [u8; 16] = iv_of(k);
                cbc::Decryptor::<aes::Aes256>::new(k.into(), (&iv).into())
                    .decrypt_padded_vec::<Pkcs7>(sealed)
                    .ok()
            }
        }
    }
}

/// OpenSSL takes as many IV bytes as the block needs from a longer IV.
fn iv_of(key: &[u8; 32]) -> [u8; 16] {
    let mut iv = [0u8; 16];
    iv.copy_from_slice(&key[..16]);
    iv
}

/// The keys of `apisix.data_encryption.keyring` and whether plugin fields
/// are encrypted (`enable_encrypt_fields`).
pub struct Keyring {
    keys: Vec<Key>,
    plugin_fields: bool,
}

impl std::fmt::Debug for Keyring {
    // Never show key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("keys", &self.keys.len())
            .field("plugin_fields", &self.plugin_fields)
            .finish()
    }
}

impl Keyring {
    /// Entries that are not 16 or 32 bytes long are skipped, as APISIX does;
    /// their positions come back as the error list.
    pub fn new(entries: &[String], plugin_fields: bool) -> (Self, Vec<usize>) {
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let bytes = entry.as_bytes();
            if let Ok(k) = <[u8; 16]>::try_from(bytes) {
                keys.push(Key::Aes128(k));
            } else if let Ok(k) = <[u8; 32]>::try_from(bytes) {
                keys.push(Key::Aes256(k));
            } else {
                skipped.push(i);
            }
        }
        (
            Keyring {
                keys,
                plugin_fields,
            },
            skipped,
        )
    }

    /// No keys: values are written and read as they are.
    pub fn none() -> Self {
        Keyring {
            keys: Vec::new(),
            plugin_fields: false,
        }
    }

    /// `plain` encrypted with the first key, in base64; `None` without keys.
    pub fn encrypt(&self, plain: &str) -> Option<String> {
        let key = self.keys.first()?;
        Some(STANDARD.encode(key.encrypt(plain.as_bytes())))
    }

    /// The plain text of `sealed`, from the first key that decrypts it.
    pub fn decrypt(&self, sealed: &str) -> Option<String> {
        let bytes = STANDARD.decode(sealed).ok()?;
        // A wrong key yields valid padding now and then (1 in 256): only
        // text counts as opened, else the next key is tried.
        self.keys
            .iter()
            .find_map(|k| k.decrypt(&bytes).and_then(|p| String::from_utf8(p).ok()))
    }

    /// Encrypts the secrets of an object of `kind` before it is written.
    pub fn seal(&self, kind: Kind, value: &mut Value) {
        if self.keys.is_empty() {
            return;
        }
        self.each_secret(kind, value, &mut |field, is_key| {
            let Value::String(text) = field else { return };
            // APISIX encrypts PEM private keys only (other forms pass).
            if is_key && !text.starts_with("---") {
                return;
            }
            if let Some(sealed) = self.encrypt(text) {
                *text = sealed;
            }
        });
    }

    /// Decrypts the secrets of an object of `kind` after it is read. A field
    /// no key decrypts is left as it is and named in the returned list (a
    /// value written before encryption was turned on reads as plain text).
    pub fn open(&self, kind: Kind, value: &mut Value) -> Vec<String> {
        let mut failed = Vec::new();
        if self.keys.is_empty() {
            return failed;
        }
        self.each_secret(kind, value, &mut |field, is_key| {
            let Value::String(text) = field else { return };
            if is_key && text.starts_with("---") {
                return;
            }
            match self.decrypt(text) {
                Some(plain) => *text = plain,
                None => failed.push(
                    if is_key {
                        "private key"
                    } else {
                        "plugin field"
                    }
                    .into(),
                ),
            }
        });
        failed
    }

    /// Calls `f` on each secret field; the flag says it is a private key.
    fn each_secret(&self, kind: Kind, value: &mut Value, f: &mut dyn FnMut(&mut Value, bool)) {
        match kind {
            Kind::Ssls => {
                if let Some(key) = value.get_mut("key") {
                    f(key, true);
                }
                if let Some(Value::Array(keys)) = value.get_mut("keys") {
                    keys.iter_mut().for_each(|k| f(k, true));
                }
            }
            Kind::Upstreams => {
                if let Some(key) = value.pointer_mut("/tls/client_key") {
                    f(key, true);
                }
            }
            // APISIX encrypts the client key of an upstream written inside
            // a route or service too.
            Kind::Routes | Kind::Services => {
                if let Some(key) = value.pointer_mut("/upstream/tls/client_key") {
                    f(key, true);
                }
            }
            _ => {}
        }
        if !self.plugin_fields || kind == Kind::PluginMetadata {
            return;
        }
        let Some(Value::Object(plugins)) = value.get_mut("plugins") else {
            return;
        };
        for (name, conf) in plugins.iter_mut() {
            let Some(spec) = plugins::find(name) else {
                continue;
            };
            for path in spec.encrypt_fields() {
                each_at_path(conf, path, &mut |v| f(v, false));
            }
        }
    }
}

/// Visits the values at a dotted path, walking into arrays on the way
/// (`rules.key` reaches `key` of every element of `rules`).
fn each_at_path(value: &mut Value, path: &str, f: &mut dyn FnMut(&mut Value)) {
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (path, None),
    };
    match value {
        Value::Array(items) => items.iter_mut().for_each(|v| each_at_path(v, path, f)),
        Value::Object(map) => {
            if let Some(next) = map.get_mut(head) {
                match rest {
                    Some(rest) => each_at_path(next, rest, f),
                    None => f(next),
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ring(keys: &[&str]) -> Keyring {
        let entries: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        Keyring::new(&entries, true).0
    }

    #[test]
    fn apisix_vectors() {
        // APISIX's own test vectors (t/node/data_encrypt.t).
        let k = ring(&["edd1c9f0985e76a2"]);
        assert_eq!(k.encrypt("bar").unwrap(), "77+NmbYqNfN+oLm0aX5akg==");
        assert_eq!(k.decrypt("vU/ZHVJw7b0XscDJ1Fhtig==").unwrap(), "auth-two");
        let default = ring(DEFAULT_KEYRING);
        assert_eq!(
            default.encrypt("auth-two").unwrap(),
            "Miw9nx9VcNLvGX0g835QIQ=="
        );
        // The second key still decrypts what the first did not write.
        assert_eq!(default.decrypt("77+NmbYqNfN+oLm0aX5akg==").unwrap(), "bar");
        assert_eq!(default.decrypt("not base64!"), None);
    }

    #[test]
    fn aes_256_round_trip_and_bad_lengths_skipped() {
        let (k, skipped) = Keyring::new(
            &["short".into(), "0123456789abcdef0123456789abcdef".into()],
            true,
        );
        assert_eq!(skipped, [0]);
        let sealed = k.encrypt("secret").unwrap();
        assert_ne!(sealed, "secret");
        assert_eq!(k.decrypt(&sealed).unwrap(), "secret");
    }

    #[test]
    fn plugin_fields_and_private_keys() {
        let k = ring(DEFAULT_KEYRING);
        let mut consumer = json!({"username": "jack", "plugins": {
            "key-auth": {"key": "auth-two"}, "basic-auth": {"username": "j", "password": "p"}}});
        k.seal(Kind::Consumers, &mut consumer);
        assert_eq!(
            consumer["plugins"]["key-auth"]["key"],
            "Miw9nx9VcNLvGX0g835QIQ=="
        );
        assert_eq!(consumer["plugins"]["basic-auth"]["username"], "j");
        assert_ne!(consumer["plugins"]["basic-auth"]["password"], "p");
        assert!(k.open(Kind::Consumers, &mut consumer).is_empty());
        assert_eq!(consumer["plugins"]["key-auth"]["key"], "auth-two");
        assert_eq!(consumer["plugins"]["basic-auth"]["password"], "p");

        let pem = "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n";
        let mut ssl = json!({"key": pem, "keys": [pem, "already-sealed"]});
        k.seal(Kind::Ssls, &mut ssl);
        assert!(!ssl["key"].as_str().unwrap().starts_with("---"));
        assert_eq!(ssl["keys"][1], "already-sealed");
        let failed = k.open(Kind::Ssls, &mut ssl);
        assert_eq!(ssl["key"], pem);
        assert_eq!(ssl["keys"][0], pem);
        assert_eq!(failed.len(), 1, "the value no key opens is reported");

        let mut route =
            json!({"uri": "/", "upstream": {"tls": {"client_cert": "c", "client_key": pem}}});
        k.seal(Kind::Routes, &mut route);
        assert_ne!(route["upstream"]["tls"]["client_key"], pem);
        k.open(Kind::Routes, &mut route);
        assert_eq!(route["upstream"]["tls"]["client_key"], pem);
    }

    #[test]
    fn every_key_of_the_ring_is_tried() {
        // Many values sealed with the second key: a wrong first key that
        // happens to unpad must not stop the search.
        let second = ring(&["edd1c9f0985e76a2"]);
        let both = ring(DEFAULT_KEYRING);
        for i in 0..2000 {
            let plain = format!("secret-{i}");
            let sealed = second.encrypt(&plain).unwrap();
            assert_eq!(both.decrypt(&sealed).as_deref(), Some(plain.as_str()));
        }
    }

    #[test]
    fn fields_off_leaves_plugins_alone() {
        let (k, _) = Keyring::new(&["edd1c9f0985e76a2".into()], false);
        let mut consumer = json!({"username": "jack", "plugins": {"key-auth": {"key": "k"}}});
        k.seal(Kind::Consumers, &mut consumer);
        assert_eq!(consumer["plugins"]["key-auth"]["key"], "k");
    }
}
