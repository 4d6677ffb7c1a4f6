//! `deployment.etcd` and `apisix.data_encryption`: where a cluster of
//! gateways keeps its shared configuration, and how secrets are kept there.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::{key_err, lookup, opt_bool, opt_str, ConfigError};

/// `deployment.etcd`, with APISIX's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConf {
    /// `host`: `http(s)://` URLs of one etcd cluster (default
    /// `http://127.0.0.1:2379`; a single string is taken as a list of one).
    pub hosts: Vec<String>,
    /// `prefix` (default `/apisix`), without a trailing slash.
    pub prefix: String,
    /// `timeout` in seconds (default 30).
    pub timeout: Duration,
    /// `watch_timeout` in seconds (default 50).
    pub watch_timeout: Duration,
    /// `resync_delay` in seconds (default 5).
    pub resync_delay: Duration,
    /// `startup_retry` (default 2).
    pub startup_retry: u32,
    pub user: Option<String>,
    pub password: Option<String>,
    /// `tls.cert` and `tls.key`: a client certificate, relative to the prefix.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// `tls.sni`.
    pub tls_sni: Option<String>,
    /// `apisix.data_encryption.enable_encrypt_fields` (default true).
    pub encrypt_fields: bool,
    /// `apisix.data_encryption.keyring` (default APISIX's two keys; an
    /// empty list stores values as they are).
    pub keyring: Vec<String>,
}

/// Config keys this module reads.
pub const KEYS: &[&str] = &[
    "deployment.etcd.host",
    "deployment.etcd.prefix",
    "deployment.etcd.timeout",
    "deployment.etcd.watch_timeout",
    "deployment.etcd.resync_delay",
    "deployment.etcd.startup_retry",
    "deployment.etcd.user",
    "deployment.etcd.password",
    "deployment.etcd.tls.cert",
    "deployment.etcd.tls.key",
    "deployment.etcd.tls.verify",
    "deployment.etcd.tls.sni",
    "apisix.data_encryption.enable_encrypt_fields",
    "apisix.data_encryption.keyring",
];

fn seconds(doc: &Value, path: &str, default: u64) -> Result<Duration, ConfigError> {
    match lookup(doc, path) {
        None | Some(Value::Null) => Ok(Duration::from_secs(default)),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|f| *f > 0.0)
            .and_then(super::seconds_capped)
            .ok_or_else(|| key_err(path, "expected a positive number of seconds")),
        Some(_) => Err(key_err(path, "expected a number of seconds")),
    }
}

fn strings(doc: &Value, path: &str) -> Result<Option<Vec<String>>, ConfigError> {
    match lookup(doc, path) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(vec![s.clone()])),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .map(Some)
            .ok_or_else(|| key_err(path, "expected a list of strings")),
        Some(_) => Err(key_err(path, "expected a list of strings")),
    }
}

impl EtcdConf {
    pub fn parse(doc: &Value, prefix_dir: &std::path::Path) -> Result<Self, ConfigError> {
        let hosts = strings(doc, "deployment.etcd.host")?
            .unwrap_or_else(|| vec!["http://127.0.0.1:2379".into()]);
        if hosts.is_empty() {
            return Err(key_err("deployment.etcd.host", "expected at least one URL"));
        }
        for host in &hosts {
            if !(host.starts_with("http://") || host.starts_with("https://")) {
                return Err(key_err(
                    "deployment.etcd.host",
                    format!("`{host}` must start with http:// or https://"),
                ));
            }
        }
        let tls_hosts = hosts.iter().filter(|h| h.starts_with("https://")).count();
        if tls_hosts != 0 && tls_hosts != hosts.len() {
            return Err(key_err(
                "deployment.etcd.host",
                "mixes http:// and https:// endpoints",
            ));
        }
        let prefix = opt_str(doc, "deployment.etcd.prefix")?.unwrap_or_else(|| "/apisix".into());
        let prefix = prefix.trim_end_matches('/').to_string();
        if !prefix.starts_with('/') {
            return Err(key_err("deployment.etcd.prefix", "must start with /"));
        }
        let startup_retry = match lookup(doc, "deployment.etcd.startup_retry") {
            None | Some(Value::Null) => 2,
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| key_err("deployment.etcd.startup_retry", "expected a count"))?,
        };
        if opt_bool(doc, "deployment.etcd.tls.verify")? == Some(false) {
            return Err(key_err(
                "deployment.etcd.tls.verify",
                "false is not supported: ferrogate always verifies etcd's certificate (trust a private CA with apisix.ssl.ssl_trusted_certificate)",
            ));
        }
        let path = |key: &str| -> Result<Option<PathBuf>, ConfigError> {
            Ok(opt_str(doc, key)?.map(|p| prefix_dir.join(p)))
        };
        let tls_cert = path("deployment.etcd.tls.cert")?;
        let tls_key = path("deployment.etcd.tls.key")?;
        if tls_cert.is_some() != tls_key.is_some() {
            return Err(key_err("deployment.etcd.tls", "cert and key go together"));
        }
        let user = opt_str(doc, "deployment.etcd.user")?;
        let password = opt_str(doc, "deployment.etcd.password")?;
        if user.is_some() && password.is_none() {
            return Err(key_err("deployment.etcd.password", "required with user"));
        }
        let keyring = strings(doc, "apisix.data_encryption.keyring")?.unwrap_or_else(|| {
            admin_api::store::crypt::DEFAULT_KEYRING
                .iter()
                .map(|k| k.to_string())
                .collect()
        });
        for (i, key) in keyring.iter().enumerate() {
            if key.len() != 16 && key.len() != 32 {
                return Err(key_err(
                    &format!("apisix.data_encryption.keyring[{i}]"),
                    "expected 16 characters (AES-128) or 32 (AES-256)",
                ));
            }
        }
        Ok(EtcdConf {
            hosts,
            prefix,
            timeout: seconds(doc, "deployment.etcd.timeout", 30)?,
            watch_timeout: seconds(doc, "deployment.etcd.watch_timeout", 50)?,
            resync_delay: seconds(doc, "deployment.etcd.resync_delay", 5)?,
            startup_retry,
            user,
            password,
            tls_cert,
            tls_key,
            tls_sni: opt_str(doc, "deployment.etcd.tls.sni")?,
            encrypt_fields: opt_bool(doc, "apisix.data_encryption.enable_encrypt_fields")?
                .unwrap_or(true),
            keyring,
        })
    }

    /// Whether the endpoints speak TLS.
    pub fn tls(&self) -> bool {
        self.hosts.iter().all(|h| h.starts_with("https://"))
    }
}
