//! Opens the etcd store `deployment.etcd` describes.

use std::sync::Arc;

use admin_api::store::Store;

use crate::config::{EtcdConf, GatewayConfig};
use crate::error::Error;

/// The local copy of etcd's configuration, in the data directory.
const CACHE_FILE: &str = "etcd-cache.redb";

#[cfg(feature = "etcd")]
pub async fn open(conf: &EtcdConf, config: &GatewayConfig) -> Result<Arc<dyn Store>, Error> {
    use admin_api::store::crypt::Keyring;
    use admin_api::store::{EtcdSettings, EtcdStore, EtcdTls};

    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| Error::Etcd(format!("cannot read {}: {e}", path.display())))
    };
    let tls = if conf.tls() {
        let ca = match &config.ssl_trusted_certificate {
            Some(path) => Some(read(path)?),
            None => None,
        };
        let identity = match (&conf.tls_cert, &conf.tls_key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        };
        Some(EtcdTls {
            ca,
            identity,
            sni: conf.tls_sni.clone(),
        })
    } else {
        None
    };
    let (keyring, _) = Keyring::new(&conf.keyring, conf.encrypt_fields);
    let settings = EtcdSettings {
        hosts: conf.hosts.clone(),
        prefix: conf.prefix.clone(),
        timeout: conf.timeout,
        auth: conf.user.clone().zip(conf.password.clone()),
        tls,
        startup_retry: conf.startup_retry,
        watch_timeout: conf.watch_timeout,
        resync_delay: conf.resync_delay,
        cache: Some(config.data_dir.join(CACHE_FILE)),
        keyring,
    };
    tracing::info!(hosts = ?conf.hosts, prefix = %conf.prefix, "config store: etcd");
    let store = EtcdStore::open(settings)
        .await
        .map_err(|e| Error::Etcd(e.to_string()))?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "etcd"))]
pub async fn open(_conf: &EtcdConf, _config: &GatewayConfig) -> Result<Arc<dyn Store>, Error> {
    Err(Error::Etcd(format!(
        "this ferrogate was built without etcd support (cargo feature `etcd`); {CACHE_FILE} unused"
    )))
}
