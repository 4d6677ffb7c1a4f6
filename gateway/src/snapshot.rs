//! Compiled configuration snapshots and their hot swap.
//!
//! A [`Snapshot`] holds everything a request needs: the router, every
//! route's plugin chain and upstream picker, and the global rules wrapped
//! around them, as one tower service. The [`Compiler`] keeps the stored
//! objects and their compiled forms; on every store change it recompiles
//! what the change touches (one route; the routes of a changed service or
//! upstream; the global chain), rebuilds the router from the compiled routes
//! and publishes the new snapshot with a single `ArcSwap::store`. A request
//! loads the snapshot once, at the edge, so the request after an Admin API
//! answer always sees the change, on new and on kept-alive connections alike,
//! and a request in flight finishes on the snapshot it started with.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tower::{Service, ServiceExt};

use admin_api::expr;
use admin_api::model::{id_text, GlobalRuleConf, RouteConf, ServiceConf, UpstreamConf};
use admin_api::store::{Entry, Event, Store, StoreError, Watcher};
use admin_api::Kind;
use plugins::cidr::IpSet;
use plugins::registry::build_chain;
use plugins::{json_response, ClientIp, CompiledPlugin, HttpService, ResponseBody};

use crate::body::ClientBody;
use crate::proxy::{ProxyOptions, ProxyService, ProxyTarget};
use crate::router::{
    normalize_host, normalize_path, Candidate, HostSet, Matcher, MethodSet, RequestView,
    RouteTable, Router,
};
use crate::upstream::{BalancerCache, Clients, CompiledUpstream, Timeouts};
use crate::vars::RequestVars;

/// The service every request goes through.
pub type GatewayService = HttpService<ClientBody>;

/// One immutable, complete compiled configuration.
pub struct Snapshot {
    /// Increases with every published snapshot.
    pub version: u64,
    pub service: GatewayService,
    pub routes: usize,
}

/// The live snapshot, shared by the listeners and the compiler.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

/// A route compiled for the router.
pub struct CompiledRoute {
    pub id: String,
    pub uris: Vec<String>,
    pub priority: i64,
    pub order: u64,
    pub matcher: Arc<Matcher>,
    pub service: GatewayService,
}

struct RouteRecord {
    conf: RouteConf,
    order: u64,
    compiled: Option<Arc<CompiledRoute>>,
}

/// Keeps stored objects and their compiled forms; builds snapshots.
pub struct Compiler {
    routes: BTreeMap<String, RouteRecord>,
    services: BTreeMap<String, ServiceConf>,
    upstreams: BTreeMap<String, UpstreamConf>,
    upstream_cache: BTreeMap<String, Arc<CompiledUpstream>>,
    global_rules: BTreeMap<String, GlobalRuleConf>,
    /// Compiled plugins of every global rule, rebuilt when a rule changes.
    global_chain: Vec<(i32, CompiledPlugin)>,
    table: RouteTable<Arc<CompiledRoute>>,
    balancers: BalancerCache,
    clients: Clients,
    options: ProxyOptions,
    version: AtomicU64,
}

impl Compiler {
    pub fn new(options: ProxyOptions) -> Self {
        Compiler {
            routes: BTreeMap::new(),
            services: BTreeMap::new(),
            upstreams: BTreeMap::new(),
            upstream_cache: BTreeMap::new(),
            global_rules: BTreeMap::new(),
            global_chain: Vec::new(),
            table: RouteTable::default(),
            balancers: BalancerCache::new(tokio::runtime::Handle::try_current().ok()),
            clients: Clients::default(),
            options,
            version: AtomicU64::new(0),
        }
    }

    /// Loads every object of `store`, compiles, and returns the first snapshot.
    pub fn load(&mut self, store: &dyn Store) -> Result<Snapshot, StoreError> {
        for kind in [
            Kind::Upstreams,
            Kind::Services,
            Kind::GlobalRules,
            Kind::Routes,
        ] {
            for entry in store.list(&kind.prefix())? {
                self.record(&Event::Put(entry));
            }
        }
        let ids: Vec<String> = self.routes.keys().cloned().collect();
        for id in ids {
            self.compile_route(&id);
        }
        self.compile_global_rules();
        Ok(self.snapshot())
    }

    /// Applies one change; returns the snapshot to publish.
    pub fn apply(&mut self, event: &Event) -> Snapshot {
        let touched = self.record(event);
        for id in touched {
            self.compile_route(&id);
        }
        self.snapshot()
    }

    /// Stores the parsed object; returns the routes that must be recompiled.
    fn record(&mut self, event: &Event) -> Vec<String> {
        let (key, entry) = match event {
            Event::Put(e) => (e.key.as_str(), Some(e)),
            Event::Delete { key } => (key.as_str(), None),
        };
        let Some((kind, id)) = Kind::parse_key(key) else {
            return Vec::new();
        };
        let id = id.to_string();
        match kind {
            Kind::Routes => {
                match entry.and_then(|e| parse::<RouteConf>(e).map(|c| (c, e.created_index))) {
                    Some((conf, order)) => {
                        // The old compiled form stays until the new one
                        // replaces it in the route table.
                        let compiled = self.routes.get_mut(&id).and_then(|r| r.compiled.take());
                        self.routes.insert(
                            id.clone(),
                            RouteRecord {
                                conf,
                                order,
                                compiled,
                            },
                        );
                    }
                    None => {
                        if let Some(old) = self.routes.remove(&id).and_then(|r| r.compiled) {
                            self.unroute(&old);
                        }
                        self.balancers.forget(&format!("routes/{id}"));
                    }
                }
                vec![id]
            }
            Kind::Services => {
                match entry.and_then(parse::<ServiceConf>) {
                    Some(conf) => {
                        self.services.insert(id.clone(), conf);
                    }
                    None => {
                        self.services.remove(&id);
                        self.balancers.forget(&format!("services/{id}"));
                    }
                }
                self.routes_where(|r| {
                    r.service_id.as_ref().and_then(id_text).as_deref() == Some(id.as_str())
                })
            }
            Kind::Upstreams => {
                self.upstream_cache.remove(&id);
                match entry.and_then(parse::<UpstreamConf>) {
                    Some(conf) => {
                        self.upstreams.insert(id.clone(), conf);
                    }
                    None => {
                        self.upstreams.remove(&id);
                        self.balancers.forget(&format!("upstreams/{id}"));
                    }
                }
                let services: Vec<String> = self
                    .services
                    .iter()
                    .filter(|(_, s)| {
                        s.upstream_id.as_ref().and_then(id_text).as_deref() == Some(id.as_str())
                    })
                    .map(|(k, _)| k.clone())
                    .collect();
                self.routes_where(|r| {
                    let sid = r.service_id.as_ref().and_then(id_text);
                    r.upstream_id.as_ref().and_then(id_text).as_deref() == Some(id.as_str())
                        || sid.is_some_and(|s| services.contains(&s))
                })
            }
            Kind::GlobalRules => {
                match entry.and_then(parse::<GlobalRuleConf>) {
                    Some(conf) => {
                        self.global_rules.insert(id, conf);
                    }
                    None => {
                        self.global_rules.remove(&id);
                    }
                }
                self.compile_global_rules();
                Vec::new()
            }
        }
    }

    fn routes_where(&self, pred: impl Fn(&RouteConf) -> bool) -> Vec<String> {
        self.routes
            .iter()
            .filter(|(_, r)| pred(&r.conf))
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn upstream_object(&mut self, id: &str) -> Option<Arc<CompiledUpstream>> {
        if let Some(up) = self.upstream_cache.get(id) {
            return Some(up.clone());
        }
        let conf = self.upstreams.get(id)?;
        match CompiledUpstream::compile(conf, &format!("upstreams/{id}"), &mut self.balancers) {
            Ok(up) => {
                let up = Arc::new(up);
                self.upstream_cache.insert(id.to_string(), up.clone());
                Some(up)
            }
            Err(e) => {
                tracing::error!(upstream = id, error = %e, "skipping upstream that does not compile");
                None
            }
        }
    }

    fn compile_route(&mut self, id: &str) {
        let Some(record) = self.routes.get(id) else {
            return;
        };
        let conf = record.conf.clone();
        let order = record.order;
        let compiled = if conf.status == 0 {
            None
        } else {
            match self.build_route(id, &conf, order) {
                Ok(r) => Some(Arc::new(r)),
                Err(e) => {
                    tracing::error!(route = id, error = %e, "route left out of the router");
                    None
                }
            }
        };
        let previous = self
            .routes
            .get_mut(id)
            .and_then(|record| std::mem::replace(&mut record.compiled, compiled.clone()));
        if let Some(old) = previous {
            self.unroute(&old);
        }
        if let Some(route) = compiled {
            self.table.add(
                &route.uris,
                Candidate {
                    priority: route.priority,
                    order: route.order,
                    matcher: route.matcher.clone(),
                    target: route.clone(),
                },
            );
        }
    }

    fn unroute(&mut self, old: &Arc<CompiledRoute>) {
        self.table
            .remove_where(&old.uris, |c| Arc::ptr_eq(&c.target, old));
    }

    fn compile_global_rules(&mut self) {
        let mut chain = Vec::new();
        for (id, rule) in &self.global_rules {
            match compile_plugins(&rule.plugins) {
                Ok(plugins) => chain.extend(plugins),
                Err(e) => tracing::error!(global_rule = %id, error = %e, "global rule skipped"),
            }
        }
        self.global_chain = chain;
    }

    fn build_route(
        &mut self,
        id: &str,
        conf: &RouteConf,
        order: u64,
    ) -> Result<CompiledRoute, String> {
        let service = conf
            .service_id
            .as_ref()
            .and_then(id_text)
            .and_then(|sid| self.services.get(&sid).cloned().map(|s| (sid, s)));
        // Route fields win over the service's: upstream, plugins, hosts.
        let upstream = if let Some(up) = &conf.upstream {
            let compiled =
                CompiledUpstream::compile(up, &format!("routes/{id}"), &mut self.balancers)
                    .map_err(|e| e.to_string())?;
            Some(Arc::new(compiled))
        } else if let Some(uid) = conf.upstream_id.as_ref().and_then(id_text) {
            self.upstream_object(&uid)
        } else if let Some((sid, svc)) = &service {
            if let Some(up) = &svc.upstream {
                let compiled =
                    CompiledUpstream::compile(up, &format!("services/{sid}"), &mut self.balancers)
                        .map_err(|e| e.to_string())?;
                Some(Arc::new(compiled))
            } else {
                svc.upstream_id
                    .as_ref()
                    .and_then(id_text)
                    .and_then(|uid| self.upstream_object(&uid))
            }
        } else {
            None
        };
        let mut plugin_confs: BTreeMap<String, Value> = service
            .as_ref()
            .and_then(|(_, s)| s.plugins.clone())
            .unwrap_or_default();
        plugin_confs.extend(conf.plugins.clone().unwrap_or_default());
        let chain = compile_plugins(&plugin_confs)?;

        let timeouts = Timeouts::from_conf(conf.timeout.as_ref())
            .or_else(|| upstream.as_ref().map(|u| u.timeouts))
            .unwrap_or(Timeouts::DEFAULT);
        let websocket = conf
            .enable_websocket
            .or_else(|| service.as_ref().and_then(|(_, s)| s.enable_websocket))
            .unwrap_or(false);
        let verify = upstream.as_ref().is_none_or(|u| u.verify);
        let http2 = upstream
            .as_ref()
            .filter(|u| u.http2)
            .map(|u| u.scheme == http::uri::Scheme::HTTPS);
        let pool = upstream
            .as_ref()
            .map(|u| u.keepalive_pool)
            .unwrap_or_default();
        let proxy = ProxyService::new(ProxyTarget {
            upstream,
            timeouts,
            client: self.clients.get(timeouts.connect, verify, pool, http2),
            options: self.options,
            websocket,
        });
        let service_chain = build_chain(&chain, HttpService::new(proxy));

        let hosts: Vec<String> = match (&conf.host, &conf.hosts) {
            (Some(h), _) => vec![h.clone()],
            (None, Some(hs)) => hs.clone(),
            (None, None) => service
                .as_ref()
                .and_then(|(_, s)| s.hosts.clone())
                .unwrap_or_default(),
        };
        let remote_addrs: Option<Vec<String>> = match (&conf.remote_addr, &conf.remote_addrs) {
            (Some(a), _) => Some(vec![a.clone()]),
            (None, Some(list)) => Some(list.clone()),
            _ => None,
        };
        let matcher = Matcher {
            methods: MethodSet::from_names(conf.methods.as_deref().unwrap_or_default()),
            hosts: HostSet::new(&hosts),
            remote_addrs: remote_addrs
                .map(|l| IpSet::from_entries(&l))
                .transpose()
                .map_err(|e| e.to_string())?,
            vars: conf.vars.as_ref().map(expr::compile).transpose()?,
        };
        let uris = match (&conf.uri, &conf.uris) {
            (Some(u), _) => vec![u.clone()],
            (None, Some(us)) => us.clone(),
            (None, None) => return Err("route has no uri".into()),
        };
        Ok(CompiledRoute {
            id: id.to_string(),
            uris,
            priority: conf.priority,
            order,
            matcher: Arc::new(matcher),
            service: service_chain,
        })
    }

    fn snapshot(&self) -> Snapshot {
        let router = self.table.router();
        let routes = self
            .routes
            .values()
            .filter(|r| r.compiled.is_some())
            .count();
        let dispatch = HttpService::new(Dispatch {
            router: Arc::new(router),
        });
        Snapshot {
            version: self.version.fetch_add(1, Ordering::Relaxed) + 1,
            service: build_chain(&self.global_chain, dispatch),
            routes,
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(entry: &Entry) -> Option<T> {
    match serde_json::from_value(entry.value.clone()) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!(key = %entry.key, error = %e, "stored object does not parse; ignored");
            None
        }
    }
}

fn compile_plugins(confs: &BTreeMap<String, Value>) -> Result<Vec<(i32, CompiledPlugin)>, String> {
    confs
        .iter()
        .map(|(name, conf)| plugins::compile(name, conf).map_err(|e| e.to_string()))
        .collect()
}

/// Finds the route and hands the request to its chain.
#[derive(Clone)]
struct Dispatch {
    router: Arc<Router<Arc<CompiledRoute>>>,
}

impl Service<Request<ClientBody>> for Dispatch {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ClientBody>) -> Self::Future {
        match find_route(&self.router, &req) {
            Ok(Some(route)) => Box::pin(route.service.clone().oneshot(req)),
            Ok(None) => Box::pin(std::future::ready(Ok(route_not_found()))),
            Err(bad) => Box::pin(std::future::ready(Ok(*bad))),
        }
    }
}

fn find_route<B>(
    router: &Router<Arc<CompiledRoute>>,
    req: &Request<B>,
) -> Result<Option<Arc<CompiledRoute>>, Box<Response<ResponseBody>>> {
    let Some(path) = normalize_path(req.uri().path()) else {
        return Err(Box::new(crate::proxy::error_page(
            StatusCode::BAD_REQUEST,
            None,
        )));
    };
    let raw_host = request_host(req);
    let host = raw_host.map(normalize_host);
    let client_ip = req.extensions().get::<ClientIp>().map(|c| c.0);
    let vars = RequestVars {
        req,
        host: host.as_deref(),
        path: &path,
    };
    let view = RequestView {
        method: req.method(),
        path: &path,
        host: host.as_deref(),
        client_ip,
        vars: &vars,
    };
    Ok(router.find(&view).cloned())
}

/// APISIX's 404 for an unmatched request.
pub fn route_not_found() -> Response<ResponseBody> {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"error_msg": "404 Route Not Found"}),
    )
}

fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
}

/// Publishes a new snapshot for every store change.
pub struct Publisher {
    compiler: Mutex<Compiler>,
    live: SharedSnapshot,
}

impl Publisher {
    /// Loads `store`, publishes the first snapshot and returns the publisher
    /// (subscribe it to the store to follow changes).
    pub fn start(
        store: &dyn Store,
        options: ProxyOptions,
        roots: Arc<rustls::RootCertStore>,
    ) -> Result<Arc<Self>, StoreError> {
        let mut compiler = Compiler::new(options);
        compiler.balancers.roots = roots.clone();
        compiler.clients = Clients::new(roots);
        let first = compiler.load(store)?;
        tracing::info!(
            routes = first.routes,
            version = first.version,
            "configuration loaded"
        );
        Ok(Arc::new(Publisher {
            compiler: Mutex::new(compiler),
            live: Arc::new(ArcSwap::from_pointee(first)),
        }))
    }

    pub fn live(&self) -> SharedSnapshot {
        self.live.clone()
    }
}

impl Watcher for Publisher {
    fn on_change(&self, event: &Event) {
        let mut compiler = self.compiler.lock().unwrap_or_else(|p| p.into_inner());
        // A bug in compiling one object must not take the gateway down or
        // leave it half-updated: keep serving the previous snapshot.
        let applied =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compiler.apply(event)));
        let Ok(next) = applied else {
            tracing::error!(
                ?event,
                "compiling a configuration change failed; previous configuration kept"
            );
            return;
        };
        tracing::debug!(
            version = next.version,
            routes = next.routes,
            "configuration swapped"
        );
        self.live.store(Arc::new(next));
    }
}
