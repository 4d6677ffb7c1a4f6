//! ferrogate: an API gateway that speaks Apache APISIX's Admin API, plugins
//! and config files.
//!
//! [`start`] brings up a whole gateway from a [`GatewayConfig`]: the store
//! (embedded redb database, or `conf/apisix.yaml` in standalone mode), the
//! snapshot publisher, the data-plane listeners and the Admin API. The
//! `ferrogate` binary is a thin wrapper around it; tests start it in-process
//! on port 0 the same way.

pub mod access_log;
pub mod alloc;
pub mod balancer;
pub mod body;
pub mod config;
pub mod connector;
pub mod control;
pub mod drain;
pub mod error;
pub mod error_log;
pub mod error_page;
mod etcd_store;
pub mod framing;
pub mod h1_codec;
pub mod h1_upstream;
pub mod h2_upstream;
pub mod head_wait;
pub mod headers;
pub mod health;
pub mod io;
pub mod keys;
pub mod limits;
pub mod linger;
pub mod metrics;
pub mod never_fails;
pub mod park;
pub mod phases;
pub mod proxy;
pub mod resident;
pub mod router;
pub mod server;
pub mod snapshot;
pub mod standalone;
pub mod tls;
pub mod tls_edge;
pub mod tproxy;
pub mod upstream;
pub mod vars;
pub mod websocket;
pub mod workers;
pub mod xdp;
pub mod yaml;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::sync::watch;
use tokio::task::JoinSet;

use admin_api::store::{RedbStore, Store};
use admin_api::{AdminState, AuthPolicy};

pub use config::GatewayConfig;
pub use error::Error;

use crate::config::Provider;
use crate::proxy::ProxyOptions;
use crate::server::{DataPlane, Edge};
use crate::snapshot::{Publisher, SharedSnapshot};
use arc_swap::ArcSwap;

/// The gateway's version, as sent in the `Server` header.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A started gateway.
pub struct Running {
    edge: Arc<ArcSwap<Edge>>,
    admin: Option<Arc<AdminState>>,
    started_with: GatewayConfig,
    /// Where the data plane listens (ports resolved when 0 was asked for).
    pub data_addrs: Vec<SocketAddr>,
    /// Where HTTPS is served (`apisix.ssl.listen`), when enabled.
    pub tls_addrs: Vec<SocketAddr>,
    /// Where the Admin API listens, when enabled.
    pub admin_addr: Option<SocketAddr>,
    /// Where the Prometheus export server listens, when it runs.
    pub metrics_addr: Option<SocketAddr>,
    access_log: Option<Arc<access_log::AccessLog>>,
    /// The in-kernel deny list, when on.
    deny: Option<Arc<xdp::DenyList>>,
    pub live: SharedSnapshot,
    shutdown: watch::Sender<bool>,
    graceful: Arc<drain::Drain>,
    tasks: JoinSet<()>,
    /// Dropped last: the workers' threads end with it.
    _workers: Option<workers::Workers>,
}

impl Running {
    /// Applies a re-read config.yaml (SIGHUP): admin keys, `allow_admin`,
    /// `admin_key_required`, trusted proxies and body limits change at once;
    /// keys that need a restart (listeners, data directory, threads,
    /// timeouts, connection cap) are named in the log and left as they are.
    /// Fails, changing nothing, only when an admin key has to be generated
    /// and cannot be saved.
    pub fn reload(&self, config: GatewayConfig) -> Result<(), Error> {
        let auth = auth_of(&config)?;
        if let Some(admin) = &self.admin {
            admin.auth.store(Arc::new(auth));
        }
        self.edge.store(Arc::new(edge_of(&config)));
        let old = &self.started_with;
        let mut restart = Vec::new();
        if old.node_listen != config.node_listen
            || old.transparent_listen != config.transparent_listen
        {
            restart.push("apisix.node_listen");
        }
        if old.ssl != config.ssl {
            restart.push("apisix.ssl");
        }
        if old.xdp != config.xdp {
            restart.push("plugin_attr.ip-restriction.xdp");
        }
        if old.admin_listen != config.admin_listen || old.enable_admin != config.enable_admin {
            restart.push("deployment.admin.admin_listen");
        }
        if old.provider != config.provider || old.data_dir != config.data_dir {
            restart.push("deployment.role");
        }
        if old.worker_threads != config.worker_threads {
            restart.push("nginx_config.worker_processes");
        }
        if old.client_header_timeout != config.client_header_timeout
            || old.keepalive_timeout != config.keepalive_timeout
            || old.max_connections != config.max_connections
        {
            restart.push("nginx_config timeouts / worker_connections");
        }
        if !restart.is_empty() {
            tracing::warn!(keys = %restart.join(", "), "changed keys take effect after a restart");
        }
        tracing::info!("configuration reloaded");
        Ok(())
    }

    /// Reopens the log files (SIGUSR1, after logrotate renamed them).
    pub fn reopen_logs(&self) {
        // The error log first: the access log's writer says in it that it
        // reopened, and that line belongs in the new file.
        if let Err(e) = error_log::reopen() {
            tracing::error!(error = %e, "error log not reopened");
        }
        if let Some(log) = &self.access_log {
            log.sink().reopen();
        }
    }

    /// Writes out the access log lines buffered so far.
    pub fn flush_logs(&self) {
        if let Some(log) = &self.access_log {
            log.sink().flush(Duration::from_secs(2));
        }
    }

    /// Stops accepting, lets requests in flight finish for up to `grace`,
    /// then returns.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.shutdown.send(true);
        if let Some(deny) = self.deny.take() {
            deny.detach();
        }
        // Listeners stop first; then every connection is told to finish.
        while self.tasks.join_next().await.is_some() {}
        let graceful = Arc::try_unwrap(self.graceful).ok();
        if let Some(g) = graceful {
            if tokio::time::timeout(grace, g.shutdown()).await.is_err() {
                tracing::warn!(?grace, "grace period over; remaining connections dropped");
            }
        }
        if let Some(log) = self.access_log.take() {
            let sink = log.sink().clone();
            let flushed = sink.clone();
            let _ =
                tokio::task::spawn_blocking(move || flushed.flush(Duration::from_secs(2))).await;
            if sink.dropped() > 0 {
                tracing::warn!(
                    bytes = sink.dropped(),
                    "access log lines dropped while the writer was behind"
                );
            }
        }
    }
}

/// Checks what [`start`] would read besides the config file itself (the
/// trusted CA file, the standalone `apisix.yaml`), without binding or
/// writing anything: `ferrogate test`. Fails with [`Error::Tls`] or
/// [`Error::Standalone`].
pub fn check(config: &GatewayConfig) -> Result<(), Error> {
    tls::trust_store(config.ssl_trusted_certificate.as_deref())?;
    if let Some(ssl) = &config.ssl {
        tls_edge::TlsEdge::new(ssl, config.client_header_timeout).map_err(Error::TlsEdge)?;
    }
    match &config.provider {
        Provider::Yaml(path) => {
            standalone::load(path)?;
        }
        Provider::Etcd(etcd) => {
            for path in [&etcd.tls_cert, &etcd.tls_key].into_iter().flatten() {
                std::fs::metadata(path)
                    .map_err(|e| Error::Etcd(format!("cannot read {}: {e}", path.display())))?;
            }
        }
        Provider::Embedded => {}
    }
    Ok(())
}

/// `plugin_attr`, plus what plugins need to know of the listeners: the
/// HTTPS port redirect's `http_to_https` sends clients to when
/// `plugin_attr.redirect.https_port` is not set.
fn plugin_attr_of(config: &GatewayConfig) -> serde_json::Map<String, serde_json::Value> {
    let mut attr = config.plugin_attr.clone();
    if let Some(port) = config
        .ssl
        .as_ref()
        .and_then(|s| s.listen.first())
        .map(|a| a.port())
    {
        if let serde_json::Value::Object(redirect) = attr
            .entry("redirect")
            .or_insert_with(|| serde_json::json!({}))
        {
            redirect.insert(
                plugins::redirect::LISTENER_PORT_ATTR.into(),
                serde_json::json!(port),
            );
        }
    }
    attr
}

/// Starts everything `config` describes. Fails when the data directory,
/// config store, standalone file or trusted CA file cannot be read or made
/// ([`Error::DataDir`], [`Error::Store`], [`Error::Standalone`],
/// [`Error::Tls`]), the first snapshot cannot be built
/// ([`Error::Snapshot`]), or a listener cannot be bound ([`Error::Bind`]).
pub async fn start(config: GatewayConfig) -> Result<Running, Error> {
    if !config.unused_keys.is_empty() {
        tracing::info!(
            keys = %config.unused_keys.join(", "),
            "config keys accepted but not used by this ferrogate version"
        );
    }
    let server_header = if config.server_tokens {
        HeaderValue::from_str(&format!("ferrogate/{VERSION}"))?
    } else {
        HeaderValue::from_static("ferrogate")
    };
    let options = ProxyOptions {
        always_show_upstream_status: config.show_upstream_status,
    };

    let (store, standalone): (Arc<dyn Store>, Option<_>) = match &config.provider {
        Provider::Embedded => {
            keys::ensure_private_dir(&config.data_dir)?;
            let path = config.data_dir.join("config.redb");
            let store = RedbStore::open(&path).map_err(|source| Error::Store {
                path: path.clone(),
                source,
            })?;
            tracing::info!(path = %path.display(), "embedded config store");
            (Arc::new(store), None)
        }
        Provider::Etcd(etcd) => {
            keys::ensure_private_dir(&config.data_dir)?;
            let store = etcd_store::open(etcd, &config).await?;
            (store, None)
        }
        Provider::Yaml(path) => {
            let store = standalone::load(path)?;
            tracing::info!(file = %path.display(), "standalone mode: configuration from file");
            (store.clone(), Some((path.clone(), store)))
        }
    };
    // Before any plugin compiles: the families take their labels and
    // buckets from here.
    let prometheus = if prometheus_enabled(&config) {
        Some(
            plugins::prometheus::Metrics::install(config.plugin_attr.get("prometheus"))
                .map_err(Error::Metrics)?,
        )
    } else {
        None
    };
    let access_log = if config.access_log.enabled {
        let log = access_log::start(&config.access_log).map_err(Error::AccessLog)?;
        tracing::info!(path = %config.access_log.path.display(), "access log");
        Some(log)
    } else {
        None
    };
    let roots = tls::trust_store(config.ssl_trusted_certificate.as_deref())?;
    let tls_edge = match &config.ssl {
        Some(ssl) => Some(Arc::new(
            tls_edge::TlsEdge::new(ssl, config.client_header_timeout).map_err(Error::TlsEdge)?,
        )),
        None => None,
    };
    let publisher = Publisher::start(
        store.as_ref(),
        options,
        Arc::new(roots),
        plugin_attr_of(&config),
        tls_edge.clone(),
        access_log.as_ref().map(|log| Arc::new(log.plugin_set())),
    )
    .map_err(Error::Snapshot)?;
    let live = publisher.live();

    let (shutdown, shutdown_rx) = watch::channel(false);
    let graceful = Arc::new(drain::Drain::new());
    let mut tasks = JoinSet::new();

    let edge = Arc::new(ArcSwap::from_pointee(edge_of(&config)));
    let plane = DataPlane {
        live: live.clone(),
        server_header: server_header.clone(),
        edge: edge.clone(),
        header_timeout: config.client_header_timeout,
        keepalive_timeout: config.keepalive_timeout,
        send_timeout: config.send_timeout,
        connections: Arc::new(tokio::sync::Semaphore::new(config.max_connections)),
    };
    // The Admin API's socket is bound before the data plane's: once the
    // data port answers, the Admin port does too (scripts and orchestrators
    // wait for one port, then configure through the other).
    let admin_listener = if config.enable_admin && standalone.is_none() {
        Some(server::bind(config.admin_listen, "Admin API").await?)
    } else {
        None
    };
    // worker_processes > 1: that many single-threaded workers, each with
    // its own listening sockets (see `workers`).
    let workers = match config.worker_threads {
        Some(n) if n > 1 => Some(workers::Workers::start(n)?),
        _ => None,
    };
    let mut data_addrs = Vec::new();
    for addr in &config.node_listen {
        let transparent = config.transparent_listen.contains(addr);
        let bind_error = |error| Error::Bind {
            addr: *addr,
            what: "data plane",
            error,
        };
        let bound = match &workers {
            Some(workers) => {
                // A transparent listener stays one socket, on the first worker.
                let listeners = if transparent {
                    vec![tproxy::bind(*addr).map_err(bind_error)?]
                } else {
                    workers::bind_shared(*addr, workers.len()).map_err(bind_error)?
                };
                let bound = listeners[0].local_addr()?;
                let (plane, rx, graceful) = (plane.clone(), shutdown_rx.clone(), graceful.clone());
                workers.serve_each(listeners, &mut tasks, move |l| {
                    server::serve_data_plane(
                        l,
                        transparent,
                        plane.clone(),
                        rx.clone(),
                        graceful.clone(),
                    )
                });
                bound
            }
            None => {
                let listener = if transparent {
                    tproxy::bind(*addr)
                        .and_then(tokio::net::TcpListener::from_std)
                        .map_err(bind_error)?
                } else {
                    server::bind(*addr, "data plane").await?
                };
                let bound = listener.local_addr()?;
                tasks.spawn(server::serve_data_plane(
                    listener,
                    transparent,
                    plane.clone(),
                    shutdown_rx.clone(),
                    graceful.clone(),
                ));
                bound
            }
        };
        tracing::info!(addr = %bound, "data plane listening");
        data_addrs.push(bound);
    }

    let mut tls_addrs = Vec::new();
    if let (Some(ssl), Some(edge)) = (&config.ssl, &tls_edge) {
        for addr in &ssl.listen {
            let bound = match &workers {
                Some(workers) => {
                    let listeners = match workers::bind_shared(*addr, workers.len()) {
                        Ok(l) => l,
                        Err(e) if !ssl.listen_given => {
                            tracing::warn!(error = %e, "default HTTPS port unavailable; HTTPS not served (set apisix.ssl.listen or apisix.ssl.enable)");
                            continue;
                        }
                        Err(error) => {
                            return Err(Error::Bind {
                                addr: *addr,
                                what: "HTTPS",
                                error,
                            })
                        }
                    };
                    let bound = listeners[0].local_addr()?;
                    let (plane, edge, rx, graceful) = (
                        plane.clone(),
                        edge.clone(),
                        shutdown_rx.clone(),
                        graceful.clone(),
                    );
                    workers.serve_each(listeners, &mut tasks, move |l| {
                        server::serve_tls(
                            l,
                            plane.clone(),
                            edge.clone(),
                            rx.clone(),
                            graceful.clone(),
                        )
                    });
                    bound
                }
                None => {
                    let listener = match server::bind(*addr, "HTTPS").await {
                        Ok(l) => l,
                        // APISIX listens on 9443 unless told otherwise; a
                        // gateway whose file says nothing of HTTPS still
                        // starts when that port is taken.
                        Err(e) if !ssl.listen_given => {
                            tracing::warn!(error = %e, "default HTTPS port unavailable; HTTPS not served (set apisix.ssl.listen or apisix.ssl.enable)");
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    let bound = listener.local_addr()?;
                    tasks.spawn(server::serve_tls(
                        listener,
                        plane.clone(),
                        edge.clone(),
                        shutdown_rx.clone(),
                        graceful.clone(),
                    ));
                    bound
                }
            };
            tracing::info!(addr = %bound, "HTTPS listening");
            tls_addrs.push(bound);
        }
    }

    let deny = config.xdp.as_ref().and_then(|conf| {
        let ports: std::collections::BTreeSet<u16> = data_addrs
            .iter()
            .chain(&tls_addrs)
            .map(SocketAddr::port)
            .collect();
        let ports: Vec<u16> = ports.into_iter().collect();
        match xdp::DenyList::start(conf, &ports) {
            Ok(list) => {
                let list = Arc::new(list);
                let trusted = config
                    .real_ip
                    .as_ref()
                    .map(|r| r.trusted_nets.clone())
                    .unwrap_or_default();
                publisher.follow_with(list.clone(), trusted);
                tracing::info!(interfaces = ?conf.interfaces, ?ports, native = conf.native,
                    "in-kernel deny list (XDP) attached");
                Some(list)
            }
            Err(e) => {
                tracing::warn!(error = %e,
                    "in-kernel deny list (XDP) is off; ip-restriction keeps enforcing it in user space");
                None
            }
        }
    });

    let mut admin_state = None;
    let admin_addr = if let Some(listener) = admin_listener {
        let auth = auth_of(&config)?;
        if !config.admin_key_required {
            tracing::warn!(
                "admin_key_required is false: the Admin API accepts requests without a key"
            );
        }
        if !config.admin_listen.ip().is_loopback() {
            tracing::warn!(addr = %config.admin_listen, "the Admin API listens beyond this machine");
        }
        let state = Arc::new(AdminState::new(store.clone(), auth, server_header));
        admin_state = Some(state.clone());
        let bound = listener.local_addr()?;
        tracing::info!(addr = %bound, "Admin API listening");
        tasks.spawn(server::serve_admin(
            listener,
            admin_api::router(state),
            shutdown_rx.clone(),
            graceful.clone(),
        ));
        Some(bound)
    } else {
        None
    };

    let metrics_addr = match prometheus {
        Some(m) => {
            start_metrics(
                m,
                store.clone(),
                &config,
                deny.clone(),
                &shutdown_rx,
                &graceful,
                &mut tasks,
            )
            .await?
        }
        None => None,
    };

    if let Some((path, store)) = standalone {
        let mut rx = shutdown_rx.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = standalone::watch(path, store) => {}
                _ = rx.changed() => {}
            }
        });
    }

    Ok(Running {
        data_addrs,
        tls_addrs,
        admin_addr,
        metrics_addr,
        access_log,
        deny,
        live,
        shutdown,
        graceful,
        tasks,
        _workers: workers,
        edge,
        admin: admin_state,
        started_with: config,
    })
}

/// Whether the `prometheus` plugin is enabled: listed in config.yaml's
/// `plugins`, or no list given.
fn prometheus_enabled(config: &GatewayConfig) -> bool {
    config
        .enabled_plugins
        .as_ref()
        .is_none_or(|list| list.iter().any(|p| p == plugins::prometheus::NAME))
}

/// The gateway's side of the metrics: what the store and the health checks
/// report.
struct MetricSources {
    store: Arc<dyn Store>,
    deny: Option<Arc<xdp::DenyList>>,
}

/// The kinds APISIX reports `apisix_etcd_modify_indexes` for.
const INDEXED_KINDS: [&str; 8] = [
    "routes",
    "services",
    "ssls",
    "consumers",
    "global_rules",
    "upstreams",
    "stream_routes",
    "protos",
];

impl metrics::Sources for MetricSources {
    fn xdp_drops(&self) -> Option<(u64, u64)> {
        self.deny.as_ref().map(|d| d.drops())
    }

    fn upstream_health(&self) -> Vec<metrics::NodeHealth> {
        health::node_statuses()
            .into_iter()
            .map(|(name, ip, port, healthy)| metrics::NodeHealth {
                name,
                ip,
                port: port.to_string(),
                healthy,
            })
            .collect()
    }

    fn etcd(&self) -> Option<(bool, Vec<(String, i64)>)> {
        let reachable = self.store.remote_reachable()?;
        let as_gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut keys = Vec::new();
        let mut max = 0;
        for kind in INDEXED_KINDS {
            let prefix = format!("{}/{kind}/", admin_api::store::KEY_PREFIX);
            let top = self
                .store
                .list(&prefix)
                .map(|entries| entries.iter().map(|e| e.modified_index).max().unwrap_or(0))
                .unwrap_or(0);
            max = max.max(top);
            keys.push((kind.to_string(), as_gauge(top)));
        }
        keys.push(("max_modify_index".into(), as_gauge(max)));
        if let Ok(revision) = self.store.revision() {
            keys.push(("x_etcd_index".into(), as_gauge(revision)));
        }
        Some((reachable, keys))
    }
}

/// Starts the exposition timer and, unless `enable_export_server` is
/// false, the export server; its address.
async fn start_metrics(
    metrics: Arc<plugins::prometheus::Metrics>,
    store: Arc<dyn Store>,
    config: &GatewayConfig,
    deny: Option<Arc<xdp::DenyList>>,
    shutdown: &watch::Receiver<bool>,
    graceful: &Arc<drain::Drain>,
    tasks: &mut JoinSet<()>,
) -> Result<Option<SocketAddr>, Error> {
    let etcd = store.remote_reachable().is_some();
    let timer = metrics::start_exporter(
        metrics.clone(),
        Arc::new(MetricSources { store, deny }),
        etcd,
        shutdown.clone(),
    )
    .map_err(Error::Metrics)?;
    tasks.spawn(timer);
    let Some(addr) = metrics::export_addr(&metrics) else {
        return Ok(None);
    };
    let listener = match server::bind(addr, "Prometheus export server").await {
        Ok(l) => l,
        // APISIX exports on 127.0.0.1:9091 unless told otherwise; a gateway
        // whose file does not name the address still starts when that port
        // is taken (another gateway on the machine has it).
        Err(e)
            if config
                .plugin_attr
                .get("prometheus")
                .and_then(|p| p.get("export_addr"))
                .is_none() =>
        {
            tracing::warn!(error = %e, "default Prometheus export port unavailable; metrics not exported (set plugin_attr.prometheus.export_addr)");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, uri = %metrics.settings.export_uri, "Prometheus export server listening");
    tasks.spawn(server::serve_admin(
        listener,
        metrics::export_router(metrics),
        shutdown.clone(),
        graceful.clone(),
    ));
    Ok(Some(bound))
}

fn edge_of(config: &GatewayConfig) -> Edge {
    Edge {
        real_ip: config.real_ip.clone(),
        trusted_addresses: config.trusted_addresses.clone(),
        body: limits::BodyLimits {
            max_size: config.client_max_body_size,
            idle_timeout: config.client_body_timeout,
        },
    }
}

fn auth_of(config: &GatewayConfig) -> Result<AuthPolicy, Error> {
    Ok(AuthPolicy {
        keys: keys::admin_keys(config)?,
        key_required: config.admin_key_required,
        allow: config.allow_admin.clone(),
    })
}
