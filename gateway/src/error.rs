//! Why the gateway library could not do what was asked: start
//! ([`crate::start`]), check a configuration ([`crate::check`]), apply a
//! reload ([`crate::Running::reload`]), make the admin key or take the PID
//! file. Every message names the address, file or directory involved.
//!
//! Where the message already ends with the OS error (`cannot listen on …:
//! Address already in use`), that error is kept in the variant but not
//! reported again as its [`source`](std::error::Error::source), so that a
//! report walking the chain does not print it twice.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use admin_api::store::StoreError;

use crate::standalone::StandaloneError;
use crate::tls::TlsError;

/// The gateway library's error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not bind its address (in use, not permitted, not
    /// an address of this machine).
    #[error("cannot listen on {addr} for the {what}: {error}")]
    Bind {
        addr: SocketAddr,
        /// Which listener: `data plane` or `Admin API`.
        what: &'static str,
        error: io::Error,
    },
    /// The data directory was missing and could not be created.
    #[error("cannot create the data directory {}", path.display())]
    DataDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The generated admin key could not be saved.
    #[error("cannot write {}", path.display())]
    KeyFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The PID file could not be opened or written.
    #[error("cannot write the PID file {}: {error}", path.display())]
    PidFile { path: PathBuf, error: io::Error },
    /// Another process holds the lock on the PID file of this data
    /// directory.
    #[error("another ferrogate is running with the data directory {}", data_dir.display())]
    AlreadyRunning { data_dir: PathBuf },
    /// The embedded config store could not be opened.
    #[error("cannot open the config store {}", path.display())]
    Store {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    /// etcd could not be used: settings files unreadable, or etcd
    /// unreachable with no local copy of its configuration.
    #[error("etcd (deployment.etcd): {0}")]
    Etcd(String),
    /// The first snapshot could not be read from the store.
    #[error(transparent)]
    Snapshot(StoreError),
    /// The standalone `apisix.yaml` could not be loaded.
    #[error(transparent)]
    Standalone(#[from] StandaloneError),
    /// `apisix.ssl.ssl_trusted_certificate` could not be read.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The access log cannot be opened.
    #[error("nginx_config.http.access_log: {0}")]
    AccessLog(String),
    /// `plugin_attr.prometheus` cannot be used.
    #[error("plugin_attr.prometheus: {0}")]
    Metrics(String),
    /// `apisix.ssl` leaves nothing rustls can serve.
    #[error("{0}")]
    TlsEdge(String),
    /// The `Server` header built from the version is not a header value.
    #[error(transparent)]
    ServerHeader(#[from] http::header::InvalidHeaderValue),
    /// Any other I/O failure (socket options, the key file's permissions),
    /// reported as the OS reports it.
    #[error(transparent)]
    Io(#[from] io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_what_failed() {
        let e = Error::Bind {
            addr: "127.0.0.1:9080".parse().unwrap(),
            what: "data plane",
            error: io::Error::from(io::ErrorKind::AddrInUse),
        };
        assert_eq!(
            e.to_string(),
            format!(
                "cannot listen on 127.0.0.1:9080 for the data plane: {}",
                io::Error::from(io::ErrorKind::AddrInUse)
            )
        );
        assert!(
            std::error::Error::source(&e).is_none(),
            "the OS error is in the message already"
        );
        let e = Error::DataDir {
            path: "/srv/data".into(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
        assert_eq!(e.to_string(), "cannot create the data directory /srv/data");
        assert!(std::error::Error::source(&e).is_some());
        let e = Error::AlreadyRunning {
            data_dir: "/srv/data".into(),
        };
        assert_eq!(
            e.to_string(),
            "another ferrogate is running with the data directory /srv/data"
        );
    }

    #[tokio::test]
    async fn a_taken_address_is_a_bind_error() {
        let first = crate::server::bind("127.0.0.1:0".parse().unwrap(), "data plane")
            .await
            .unwrap();
        let addr = first.local_addr().unwrap();
        // SO_REUSEADDR does not let a second socket listen on a port in use.
        match crate::server::bind(addr, "Admin API").await {
            Err(Error::Bind { addr: a, what, .. }) => {
                assert_eq!(a, addr);
                assert_eq!(what, "Admin API");
            }
            other => panic!("expected a bind error, got {:?}", other.map(|_| ())),
        }
    }
}
