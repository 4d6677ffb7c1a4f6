//! `ssls` objects (`/apisix/ssls/{id}`): certificates served by SNI, or
//! presented to upstreams (`type: client`).

use serde::Deserialize;

/// An ssl object as stored. Its `Debug` leaves certificates and keys out.
#[derive(Clone, Deserialize, Default, PartialEq)]
pub struct SslConf {
    /// `server` (default): served to clients whose SNI matches; `client`:
    /// presented to upstreams that name it in `tls.client_cert_id`.
    #[serde(default, rename = "type")]
    pub kind: SslType,
    /// PEM chain, leaf first.
    #[serde(default)]
    pub cert: String,
    /// PEM private key of `cert`.
    #[serde(default)]
    pub key: String,
    /// More certificates for the same names (e.g. RSA beside ECDSA); the
    /// handshake picks one the client can verify.
    #[serde(default)]
    pub certs: Vec<String>,
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub sni: Option<String>,
    #[serde(default)]
    pub snis: Option<Vec<String>>,
    /// Mutual TLS: clients must present a certificate issued by `ca`.
    #[serde(default)]
    pub client: Option<SslClient>,
    /// 1 enabled (default), 0 disabled: not served.
    #[serde(default = "enabled")]
    pub status: i64,
    /// `TLSv1.1`, `TLSv1.2`, `TLSv1.3`; unset: the listener's
    /// `apisix.ssl.ssl_protocols`.
    #[serde(default)]
    pub ssl_protocols: Option<Vec<String>>,
}

fn enabled() -> i64 {
    1
}

impl std::fmt::Debug for SslConf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SslConf")
            .field("type", &self.kind)
            .field("certs", &(1 + self.certs.len()))
            .field("sni", &self.sni)
            .field("snis", &self.snis)
            .field("client", &self.client.as_ref().map(|c| c.depth))
            .field("status", &self.status)
            .field("ssl_protocols", &self.ssl_protocols)
            .finish_non_exhaustive()
    }
}

/// `type` of an ssl object.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SslType {
    #[default]
    Server,
    Client,
}

/// `client` of an ssl object.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
pub struct SslClient {
    /// PEM CA certificate(s) client certificates must chain to.
    pub ca: String,
    /// Longest chain of intermediates accepted below `ca`. Default 1.
    #[serde(default = "default_depth")]
    pub depth: u32,
    /// Request paths (regular expressions, matched against the URI) that
    /// do not need a client certificate. When set, the handshake accepts
    /// clients without one and the check moves to the request.
    #[serde(default)]
    pub skip_mtls_uri_regex: Option<Vec<String>>,
}

fn default_depth() -> u32 {
    1
}

impl SslConf {
    /// The names this object serves, lower-case, without a trailing dot.
    pub fn names(&self) -> Vec<String> {
        let list: Vec<&String> = match (&self.snis, &self.sni) {
            (Some(snis), _) if !snis.is_empty() => snis.iter().collect(),
            (_, Some(sni)) => vec![sni],
            _ => Vec::new(),
        };
        list.into_iter()
            .map(|s| s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase())
            .collect()
    }

    /// Every (cert, key) pair: `cert`/`key` first, then `certs`/`keys`.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        std::iter::once((self.cert.as_str(), self.key.as_str())).chain(
            self.certs
                .iter()
                .zip(self.keys.iter())
                .map(|(c, k)| (c.as_str(), k.as_str())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_leaves_keys_out() {
        let conf = SslConf {
            cert: "-----BEGIN CERTIFICATE-----".into(),
            key: "-----BEGIN PRIVATE KEY-----secret".into(),
            keys: vec!["secret2".into()],
            certs: vec!["c".into()],
            snis: Some(vec!["A.test.".into()]),
            ..SslConf::default()
        };
        let shown = format!("{conf:?}");
        assert!(
            !shown.contains("secret") && !shown.contains("PRIVATE"),
            "{shown}"
        );
        assert_eq!(conf.names(), vec!["a.test"]);
        let tls = crate::model::UpstreamTls {
            client_key: Some("-----BEGIN PRIVATE KEY-----secret".into()),
            ..Default::default()
        };
        assert!(!format!("{tls:?}").contains("secret"));
    }
}
