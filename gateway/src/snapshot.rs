//! Compiled configuration snapshots and their hot swap.
//!
//! A [`Snapshot`] holds everything a request needs: the router with every
//! route's compiled plugin set and proxy, the global rules and the consumer
//! index. The [`Compiler`] keeps the stored objects and their compiled
//! forms; for every change, or batch of changes (a standalone YAML reload),
//! it recompiles what the change touches (a route; the routes of a changed
//! service, upstream or plugin config; the global rules; the consumers),
//! rebuilds the router and produces exactly one new snapshot, published with
//! a single `ArcSwap::store`. A request loads the snapshot once, at the edge,
//! so the request after an Admin API answer always sees the change, on new
//! and kept-alive connections alike, and a request in flight finishes on the
//! snapshot it started with.
//!
//! Failure modes: an object that fails to compile keeps its previous
//! compiled form (the Admin API refuses what would not compile, so this
//! only happens with a store written by something else) and is logged. A
//! panic while compiling rolls the compiler back to the objects it had
//! before the change and publishes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::{Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use tower::Service;

use admin_api::model::{
    id_text, GlobalRuleConf, RouteConf, ServiceConf, SslConf, SslType, UpstreamConf,
};
use admin_api::resource::credential_parts;
use admin_api::store::{Change, Entry, Event, Store, StoreError, Watcher, KEY_PREFIX};
use admin_api::Kind;
use plugins::chain::{Chain, GlobalRules, PluginSet};
use plugins::consumer::{Consumer, ConsumerIndex, Credential};
use plugins::expr;
use plugins::plugin::{PluginKind, StateCache};
use plugins::registry::{self, CompileEnv};
use plugins::{json_response, ClientIp, ConnInfo, Ctx, ResponseBody};

use crate::body::ClientBody;
use crate::proxy::{ProxyOptions, ProxyService, ProxyTarget};
use crate::router::{
    normalize_host, normalize_path, Candidate, HostSet, Matcher, MethodSet, RequestView,
    RouteTable, Router,
};
use crate::tls::ClientCert;
use crate::tls_edge::{ServedSsl, SniTable, TlsEdge};
use crate::upstream::{BalancerCache, Clients, CompiledUpstream, Timeouts};
use crate::vars::RequestVars;

/// The certificate an upstream's `tls` names: inline, or a `client` ssl
/// object. `Ok(None)` when it names none; an error when it names one that
/// is not there or does not parse.
fn client_cert_for(
    up: &UpstreamConf,
    client_ssls: &BTreeMap<String, ClientCert>,
) -> Result<Option<ClientCert>, String> {
    let Some(tls) = &up.tls else { return Ok(None) };
    if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
        return ClientCert::from_pem(cert, key).map(Some);
    }
    match tls.client_cert_id.as_ref().and_then(id_text) {
        Some(id) => client_ssls
            .get(&id)
            .cloned()
            .map(Some)
            .ok_or_else(|| format!("client ssl object {id} does not exist")),
        None => Ok(None),
    }
}

/// One request's way through [`Dispatch::serve`]: routing is done, the
/// future runs the plugins and the proxy.
pub type Dispatched = Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send>>;

/// One immutable, complete compiled configuration.
pub struct Snapshot {
    /// Increases with every published snapshot.
    pub version: u64,
    pub service: Dispatch,
    pub routes: usize,
    /// Server certificates by SNI (empty without an HTTPS listener).
    pub certs: Arc<SniTable<ServedSsl>>,
}

/// The live snapshot, shared by the listeners and the compiler.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

/// A route compiled for the router.
pub struct CompiledRoute {
    pub id: Arc<str>,
    pub service_id: Option<Arc<str>>,
    pub uris: Vec<String>,
    /// Name, uris and hosts, for the plugins' labels and logs.
    pub info: Arc<plugins::ctx::RouteInfo>,
    pub priority: i64,
    pub order: u64,
    pub matcher: Arc<Matcher>,
    /// The route's plugins with its plugin config and service merged in.
    pub plugins: Arc<PluginSet>,
    pub proxy: ProxyService,
}

struct RouteRecord {
    refs: RouteRefs,
    order: u64,
    compiled: Option<Arc<CompiledRoute>>,
}

/// What a route refers to: all a change elsewhere needs to know which routes
/// to compile again. The route's own config is parsed again from its stored
/// text when that happens, rather than kept parsed for every route.
#[derive(Debug, Default)]
struct RouteRefs {
    service_id: Option<String>,
    upstream_id: Option<String>,
    plugin_config_id: Option<String>,
    /// `upstream_id`s the route's own traffic-split names.
    split_upstream_ids: Vec<String>,
}

impl RouteRefs {
    fn of(conf: &RouteConf) -> Self {
        use plugins::traffic_split::{upstream_refs, UpstreamRef, NAME};
        let split_upstream_ids = conf
            .plugins
            .as_ref()
            .and_then(|p| p.get(NAME))
            .map(|split| {
                upstream_refs(split)
                    .into_iter()
                    .filter_map(|r| match r {
                        UpstreamRef::Id(id) => Some(id),
                        UpstreamRef::Inline(_) => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        RouteRefs {
            service_id: conf.service_id.as_ref().and_then(id_text),
            upstream_id: conf.upstream_id.as_ref().and_then(id_text),
            plugin_config_id: conf.plugin_config_id.as_ref().and_then(id_text),
            split_upstream_ids,
        }
    }
}

/// A stored object kept as its JSON text: a fraction of the memory of the
/// parsed tree (which the typed maps hold anyway), parsed again only when the
/// compiler rebuilds after a panic.
#[derive(Clone)]
struct Stored(Box<[u8]>);

impl Stored {
    fn of(entry: &Entry) -> Self {
        // Serialising a parsed JSON tree with string keys cannot fail.
        Stored(
            serde_json::to_vec(entry)
                .unwrap_or_default()
                .into_boxed_slice(),
        )
    }

    fn entry(&self) -> Option<Entry> {
        serde_json::from_slice(&self.0).ok()
    }
}

/// Keeps stored objects and their compiled forms; builds snapshots.
pub struct Compiler {
    /// Every stored object as stored, the source the typed maps below are
    /// derived from (and rebuilt from after a panic).
    raw: BTreeMap<String, Stored>,
    routes: BTreeMap<String, RouteRecord>,
    /// Configs of routes just recorded, handed to their compilation
    /// (emptied after each change); other routes parse theirs again.
    fresh_routes: BTreeMap<String, RouteConf>,
    /// Routes in `routes` with a compiled form (kept as they change, so a
    /// snapshot does not walk every route to count them).
    compiled_routes: usize,
    services: BTreeMap<String, ServiceConf>,
    upstreams: BTreeMap<String, UpstreamConf>,
    upstream_cache: BTreeMap<String, Arc<CompiledUpstream>>,
    global_rules: BTreeMap<String, GlobalRuleConf>,
    plugin_configs: BTreeMap<String, BTreeMap<String, Value>>,
    consumer_groups: BTreeMap<String, BTreeMap<String, Value>>,
    consumers: BTreeMap<String, Value>,
    credentials: BTreeMap<String, Value>,
    plugin_metadata: BTreeMap<String, Value>,
    /// `server` ssl objects, compiled (those that compiled).
    served_ssls: BTreeMap<String, Arc<ServedSsl>>,
    /// `client` ssl objects: certificates presented to upstreams.
    client_ssls: BTreeMap<String, ClientCert>,
    certs: Arc<SniTable<ServedSsl>>,
    /// `None`: no HTTPS listener, server certificates are not compiled.
    tls_edge: Option<Arc<TlsEdge>>,
    /// Compiled plugins of each global rule.
    global_sets: BTreeMap<String, Arc<PluginSet>>,
    /// Runs before every global rule for every request (the access log).
    head: Option<Arc<PluginSet>>,
    globals: Arc<GlobalRules>,
    consumer_index: Arc<ConsumerIndex>,
    table: RouteTable<Arc<CompiledRoute>>,
    balancers: BalancerCache,
    clients: Clients,
    options: ProxyOptions,
    plugin_attr: Map<String, Value>,
    state: StateCache,
    version: AtomicU64,
}

/// What a change touched beyond single routes.
#[derive(Default)]
struct Touched {
    routes: BTreeSet<String>,
    globals: bool,
    consumers: bool,
    /// plugin_metadata changed: everything that compiles plugins.
    all: bool,
    /// A server certificate changed: the SNI table.
    certs: bool,
}

impl Compiler {
    pub fn new(options: ProxyOptions) -> Self {
        Compiler {
            raw: BTreeMap::new(),
            routes: BTreeMap::new(),
            fresh_routes: BTreeMap::new(),
            services: BTreeMap::new(),
            upstreams: BTreeMap::new(),
            upstream_cache: BTreeMap::new(),
            global_rules: BTreeMap::new(),
            plugin_configs: BTreeMap::new(),
            consumer_groups: BTreeMap::new(),
            consumers: BTreeMap::new(),
            credentials: BTreeMap::new(),
            plugin_metadata: BTreeMap::new(),
            served_ssls: BTreeMap::new(),
            client_ssls: BTreeMap::new(),
            certs: Arc::new(SniTable::default()),
            tls_edge: None,
            global_sets: BTreeMap::new(),
            head: None,
            globals: Arc::new(GlobalRules::default()),
            consumer_index: Arc::new(ConsumerIndex::default()),
            table: RouteTable::default(),
            balancers: BalancerCache::new(tokio::runtime::Handle::try_current().ok()),
            clients: Clients::default(),
            options,
            plugin_attr: Map::new(),
            state: StateCache::default(),
            version: AtomicU64::new(0),
            compiled_routes: 0,
        }
    }

    /// A plugin set that runs before the global rules for every request
    /// (the access log).
    pub fn set_head(&mut self, head: Option<Arc<PluginSet>>) {
        self.head = head;
        self.rebuild_globals();
    }

    fn rebuild_globals(&mut self) {
        self.globals = Arc::new(GlobalRules::new(
            self.head
                .iter()
                .chain(self.global_sets.values())
                .cloned()
                .collect(),
        ));
    }

    /// `plugin_attr` from config.yaml, handed to plugins when they compile.
    pub fn set_plugin_attr(&mut self, attr: Map<String, Value>) {
        self.plugin_attr = attr;
    }

    /// The HTTPS listener's settings, which server ssl objects compile with.
    pub fn set_tls_edge(&mut self, edge: Option<Arc<TlsEdge>>) {
        self.tls_edge = edge;
    }

    /// Loads every object of `store`, compiles, and returns the first snapshot.
    pub fn load(&mut self, store: &dyn Store) -> Result<Snapshot, StoreError> {
        let entries = store.list(&format!("{KEY_PREFIX}/"))?;
        Ok(self.replace(&entries))
    }

    /// Makes `entries` the whole configuration (a store's
    /// [`Change::Reset`]) and returns its snapshot. Balancers, connection
    /// pools and plugin state of objects that stay are kept.
    pub fn replace(&mut self, entries: &[Entry]) -> Snapshot {
        self.raw = entries
            .iter()
            .map(|e| (e.key.clone(), Stored::of(e)))
            .collect();
        self.rebuild();
        self.snapshot()
    }

    /// Like [`Compiler::replace`], but a panic while compiling puts the
    /// compiler back to the objects it had before and returns `None`.
    pub fn replace_or_revert(&mut self, entries: &[Entry]) -> Option<Snapshot> {
        let old = self.raw.clone();
        let replaced =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.replace(entries)));
        match replaced {
            Ok(snapshot) => Some(snapshot),
            Err(_) => {
                self.raw = old;
                let rebuilt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.rebuild();
                }));
                if rebuilt.is_err() {
                    tracing::error!("rebuilding the previous configuration failed too");
                }
                None
            }
        }
    }

    /// Forgets every typed and compiled object and derives them again from
    /// `raw`. Balancers, connection pools and plugin state are kept.
    fn rebuild(&mut self) {
        self.routes.clear();
        self.compiled_routes = 0;
        self.services.clear();
        self.upstreams.clear();
        self.upstream_cache.clear();
        self.global_rules.clear();
        self.plugin_configs.clear();
        self.consumer_groups.clear();
        self.consumers.clear();
        self.credentials.clear();
        self.plugin_metadata.clear();
        self.served_ssls.clear();
        self.client_ssls.clear();
        self.global_sets.clear();
        self.table = RouteTable::default();
        let mut entries: Vec<Entry> = self.raw.values().filter_map(Stored::entry).collect();
        // Referenced kinds first.
        entries.sort_by_key(|e| Kind::parse_key(&e.key).map(|(k, _)| k));
        for entry in entries {
            self.record(&Event::Put(entry));
        }
        let ids: Vec<String> = self.routes.keys().cloned().collect();
        for id in ids {
            self.compile_route(&id);
        }
        self.fresh_routes.clear();
        self.compile_global_rules(true);
        self.compile_consumers();
        self.compile_cert_table();
    }

    /// Applies one change; returns the snapshot to publish.
    pub fn apply(&mut self, event: &Event) -> Snapshot {
        self.apply_all(std::slice::from_ref(event))
    }

    /// Applies a batch of changes; returns the one snapshot to publish.
    pub fn apply_all(&mut self, events: &[Event]) -> Snapshot {
        for event in events {
            match event {
                Event::Put(e) => {
                    self.raw.insert(e.key.clone(), Stored::of(e));
                }
                Event::Delete { key } => {
                    self.raw.remove(key);
                }
            }
        }
        let mut touched = Touched::default();
        for event in events {
            let t = self.record(event);
            touched.routes.extend(t.routes);
            touched.globals |= t.globals;
            touched.consumers |= t.consumers;
            touched.certs |= t.certs;
            touched.all |= t.all;
        }
        if touched.all {
            touched.routes.extend(self.routes.keys().cloned());
        }
        for id in &touched.routes {
            self.compile_route(id);
        }
        self.fresh_routes.clear();
        if touched.globals || touched.all {
            self.compile_global_rules(touched.all);
        }
        if touched.consumers || touched.all {
            self.compile_consumers();
        }
        if touched.certs {
            self.compile_cert_table();
        }
        self.snapshot()
    }

    /// Like [`Compiler::apply_all`], but a panic while compiling puts the
    /// compiler back to the objects it had before and returns `None`.
    pub fn apply_or_revert(&mut self, events: &[Event]) -> Option<Snapshot> {
        let undo: Vec<(String, Option<Stored>)> = events
            .iter()
            .map(|e| {
                let key = match e {
                    Event::Put(entry) => &entry.key,
                    Event::Delete { key } => key,
                };
                (key.clone(), self.raw.get(key).cloned())
            })
            .collect();
        let applied =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.apply_all(events)));
        match applied {
            Ok(snapshot) => Some(snapshot),
            Err(_) => {
                for (key, old) in undo.into_iter().rev() {
                    match old {
                        Some(entry) => self.raw.insert(key, entry),
                        None => self.raw.remove(&key),
                    };
                }
                let rebuilt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.rebuild();
                }));
                if rebuilt.is_err() {
                    tracing::error!("rebuilding the previous configuration failed too");
                }
                None
            }
        }
    }

    /// Stores the parsed object; says what must be recompiled.
    fn record(&mut self, event: &Event) -> Touched {
        let mut touched = Touched::default();
        let (key, entry) = match event {
            Event::Put(e) => (e.key.as_str(), Some(e)),
            Event::Delete { key } => (key.as_str(), None),
        };
        let Some((kind, id)) = Kind::parse_key(key) else {
            return touched;
        };
        let id = id.to_string();
        match kind {
            Kind::Routes => {
                match entry.and_then(|e| parse::<RouteConf>(e).map(|c| (c, e.created_index))) {
                    Some((conf, order)) => {
                        // The old compiled form stays until the new one
                        // replaces it in the route table.
                        let compiled = self.routes.get_mut(&id).and_then(|r| r.compiled.take());
                        let refs = RouteRefs::of(&conf);
                        self.fresh_routes.insert(id.clone(), conf);
                        self.routes.insert(
                            id.clone(),
                            RouteRecord {
                                refs,
                                order,
                                compiled,
                            },
                        );
                    }
                    None => {
                        if let Some(old) = self.routes.remove(&id).and_then(|r| r.compiled) {
                            self.compiled_routes -= 1;
                            self.unroute(&old);
                        }
                        self.balancers.forget(&format!("routes/{id}"));
                    }
                }
                touched.routes.insert(id);
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
                touched.routes =
                    self.routes_where(|r| r.service_id.as_deref() == Some(id.as_str()));
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
                touched.routes = self.routes_where(|r| {
                    r.upstream_id.as_deref() == Some(id.as_str())
                        || r.split_upstream_ids.contains(&id)
                        || r.service_id.as_ref().is_some_and(|s| services.contains(s))
                });
            }
            Kind::GlobalRules => {
                match entry.and_then(parse::<GlobalRuleConf>) {
                    Some(conf) => {
                        self.global_rules.insert(id.clone(), conf);
                    }
                    None => {
                        self.global_rules.remove(&id);
                    }
                }
                self.global_sets.remove(&id);
                touched.globals = true;
            }
            Kind::PluginConfigs => {
                match entry.map(|e| plugins_of(&e.value)) {
                    Some(p) => self.plugin_configs.insert(id.clone(), p),
                    None => self.plugin_configs.remove(&id),
                };
                touched.routes =
                    self.routes_where(|r| r.plugin_config_id.as_deref() == Some(id.as_str()));
            }
            Kind::ConsumerGroups => {
                match entry.map(|e| plugins_of(&e.value)) {
                    Some(p) => self.consumer_groups.insert(id, p),
                    None => self.consumer_groups.remove(&id),
                };
                touched.consumers = true;
            }
            Kind::Consumers => {
                match entry {
                    Some(e) => self.consumers.insert(id, e.value.clone()),
                    None => self.consumers.remove(&id),
                };
                touched.consumers = true;
            }
            Kind::Credentials => {
                match entry {
                    Some(e) => self.credentials.insert(id, e.value.clone()),
                    None => self.credentials.remove(&id),
                };
                touched.consumers = true;
            }
            Kind::Ssls => {
                self.served_ssls.remove(&id);
                let was_client = self.client_ssls.remove(&id).is_some();
                let conf = entry.and_then(parse::<SslConf>);
                match conf {
                    Some(conf) if conf.kind == SslType::Client => {
                        match ClientCert::from_pem(&conf.cert, &conf.key) {
                            Ok(cert) => {
                                self.client_ssls.insert(id.clone(), cert);
                            }
                            Err(e) => {
                                tracing::error!(ssl = %id, error = %e, "client ssl object does not compile")
                            }
                        }
                    }
                    Some(conf) if conf.status != 0 => self.compile_ssl(&id, &conf),
                    _ => {}
                }
                touched.certs = true;
                let is_client = self.client_ssls.contains_key(&id);
                if was_client || is_client {
                    // Upstream objects embed the certificate: compile them
                    // again (client certificates change seldom).
                    self.upstream_cache.clear();
                    touched.routes = self.routes_using_client_cert(&id);
                }
            }
            Kind::PluginMetadata => {
                match entry {
                    Some(e) => self.plugin_metadata.insert(id, e.value.clone()),
                    None => self.plugin_metadata.remove(&id),
                };
                touched.all = true;
            }
        }
        touched
    }

    fn compile_ssl(&mut self, id: &str, conf: &SslConf) {
        let Some(edge) = &self.tls_edge else { return };
        match edge.compile(id, conf) {
            Ok(served) => {
                self.served_ssls.insert(id.to_string(), Arc::new(served));
            }
            Err(e) => {
                tracing::error!(ssl = id, error = %e, "ssl object does not compile; not served")
            }
        }
    }

    /// Every served name to its ssl object; objects in id order, so the
    /// lower id keeps a name two objects claim.
    fn compile_cert_table(&mut self) {
        let mut table = SniTable::default();
        for served in self.served_ssls.values() {
            for name in &served.names {
                table.insert(name, served.clone());
            }
        }
        self.certs = Arc::new(table);
    }

    /// Routes whose upstream (own, by id, or through their service) names
    /// client ssl object `id`.
    fn routes_using_client_cert(&self, id: &str) -> BTreeSet<String> {
        let names = |up: &UpstreamConf| {
            up.tls
                .as_ref()
                .and_then(|t| t.client_cert_id.as_ref())
                .and_then(id_text)
                .as_deref()
                == Some(id)
        };
        let upstreams: Vec<&String> = self
            .upstreams
            .iter()
            .filter(|(_, u)| names(u))
            .map(|(k, _)| k)
            .collect();
        let services: Vec<&String> = self
            .services
            .iter()
            .filter(|(_, s)| {
                s.upstream.as_ref().is_some_and(names)
                    || s.upstream_id
                        .as_ref()
                        .and_then(id_text)
                        .is_some_and(|u| upstreams.contains(&&u))
            })
            .map(|(k, _)| k)
            .collect();
        // Inline upstreams of routes are not kept parsed: every route that
        // has one is compiled again, which is rare (client ssl objects
        // change seldom).
        self.routes
            .iter()
            .filter(|(_, r)| {
                r.refs
                    .upstream_id
                    .as_ref()
                    .is_none_or(|u| upstreams.contains(&u))
                    || r.refs
                        .service_id
                        .as_ref()
                        .is_some_and(|s| services.contains(&s))
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn routes_where(&self, pred: impl Fn(&RouteRefs) -> bool) -> BTreeSet<String> {
        self.routes
            .iter()
            .filter(|(_, r)| pred(&r.refs))
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn upstream_object(&mut self, id: &str) -> Option<Arc<CompiledUpstream>> {
        if let Some(up) = self.upstream_cache.get(id) {
            return Some(up.clone());
        }
        let conf = self.upstreams.get(id)?;
        let cert = match client_cert_for(conf, &self.client_ssls) {
            Ok(cert) => cert,
            Err(e) => {
                tracing::error!(upstream = id, error = %e, "skipping upstream whose client certificate does not compile");
                return None;
            }
        };
        match CompiledUpstream::compile(conf, &format!("upstreams/{id}"), &mut self.balancers, cert)
        {
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
        let order = record.order;
        let conf = match self.fresh_routes.remove(id) {
            Some(conf) => conf,
            None => {
                let stored = self.raw.get(&Kind::Routes.key(id)).and_then(Stored::entry);
                match stored.as_ref().and_then(parse::<RouteConf>) {
                    Some(conf) => conf,
                    // Recorded from this very text, so not expected.
                    None => return,
                }
            }
        };
        let compiled = if conf.status == 0 {
            None
        } else {
            match self.build_route(id, &conf, order) {
                Ok(r) => Some(Arc::new(r)),
                Err(e) => {
                    // Keep serving what was there before.
                    tracing::error!(route = id, error = %e, "route does not compile; its previous version stays");
                    return;
                }
            }
        };
        let previous = self
            .routes
            .get_mut(id)
            .and_then(|record| std::mem::replace(&mut record.compiled, compiled.clone()));
        self.compiled_routes += usize::from(compiled.is_some());
        if let Some(old) = previous {
            self.compiled_routes -= 1;
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

    fn compile_plugins<'a>(
        &self,
        confs: impl IntoIterator<Item = (&'a String, &'a Value)>,
        owner: &str,
        skip_auth: bool,
    ) -> Result<PluginSet, String> {
        let metadata = &self.plugin_metadata;
        let lookup = |name: &str| metadata.get(name);
        let upstreams = &self.upstreams;
        let exists = |id: &str| upstreams.contains_key(id);
        let env = CompileEnv {
            metadata: &lookup,
            attrs: Some(&self.plugin_attr),
            state: &self.state,
            upstream_exists: Some(&exists),
        };
        registry::compile_set(confs, owner, &env, skip_auth).map_err(|e| e.to_string())
    }

    /// The deny prefixes of the global rules in force (those that
    /// compiled), for the in-kernel list.
    fn global_deny_list(
        &self,
        trusted: &[ipnet::IpNet],
    ) -> std::collections::BTreeSet<ipnet::IpNet> {
        let plugins = self
            .global_sets
            .keys()
            .filter_map(|id| self.global_rules.get(id))
            .map(|rule| &rule.plugins);
        crate::xdp::global_deny_list(plugins, trusted)
    }

    /// Recompiles the global rules that changed (all of them with `all`).
    fn compile_global_rules(&mut self, all: bool) {
        let ids: Vec<String> = self.global_rules.keys().cloned().collect();
        self.global_sets
            .retain(|id, _| self.global_rules.contains_key(id));
        for id in ids {
            if !all && self.global_sets.contains_key(&id) {
                continue;
            }
            let Some(rule) = self.global_rules.get(&id) else {
                continue;
            };
            match self.compile_plugins(&rule.plugins, &format!("global_rules/{id}"), false) {
                Ok(set) => {
                    self.global_sets.insert(id, Arc::new(set));
                }
                Err(e) => {
                    tracing::error!(global_rule = %id, error = %e, "global rule does not compile; its previous version stays")
                }
            }
        }
        self.rebuild_globals();
    }

    /// Rebuilds the consumer index: each consumer with its group's and own
    /// non-auth plugins, and every auth key of consumers and credentials.
    fn compile_consumers(&mut self) {
        let mut index = ConsumerIndex::default();
        let mut by_name: BTreeMap<String, Arc<Consumer>> = BTreeMap::new();
        for (username, value) in &self.consumers {
            let group_id = value.get("group_id").and_then(id_text);
            let mut merged: BTreeMap<String, Value> = group_id
                .as_ref()
                .and_then(|g| self.consumer_groups.get(g))
                .cloned()
                .unwrap_or_default();
            merged.extend(plugins_of(value));
            let plugins = match self.compile_plugins(
                &merged,
                &format!("consumers/{username}"),
                true,
            ) {
                Ok(set) => set,
                Err(e) => {
                    tracing::error!(consumer = %username, error = %e, "consumer plugins do not compile; consumer left out");
                    continue;
                }
            };
            let consumer = Arc::new(Consumer {
                username: username.as_str().into(),
                custom_id: value
                    .pointer("/labels/custom_id")
                    .and_then(Value::as_str)
                    .map(Into::into),
                group_id: group_id.map(Into::into),
                plugins: Arc::new(plugins),
            });
            index.add_consumer(consumer.clone());
            by_name.insert(username.clone(), consumer.clone());
            add_credentials(&mut index, &consumer, None, value);
        }
        for (id, value) in &self.credentials {
            let Some((username, cred)) = credential_parts(id) else {
                continue;
            };
            let Some(consumer) = by_name.get(username) else {
                continue;
            };
            add_credentials(&mut index, consumer, Some(cred), value);
        }
        self.consumer_index = Arc::new(index);
    }

    /// What a route forwards to through `upstream`.
    fn proxy_target(
        &self,
        upstream: Option<Arc<CompiledUpstream>>,
        conf: &RouteConf,
        websocket: bool,
    ) -> ProxyTarget {
        let timeouts = Timeouts::from_conf(conf.timeout.as_ref())
            .or_else(|| upstream.as_ref().map(|u| u.timeouts))
            .unwrap_or(Timeouts::DEFAULT);
        let verify = upstream.as_ref().is_none_or(|u| u.verify);
        let http2 = upstream
            .as_ref()
            .filter(|u| u.http2)
            .map(|u| u.scheme == http::uri::Scheme::HTTPS);
        let pool = upstream
            .as_ref()
            .map(|u| u.keepalive_pool)
            .unwrap_or_default();
        let client = self.clients.get(
            timeouts.connect,
            verify,
            pool,
            http2,
            upstream.as_ref().and_then(|u| u.client_cert.as_ref()),
        );
        ProxyTarget {
            upstream,
            timeouts,
            client,
            options: self.options,
            websocket,
            split: Vec::new(),
        }
    }

    /// The upstreams a route's traffic-split names, compiled in the order of
    /// [`plugins::traffic_split::upstream_refs`]. An `upstream_id` that does
    /// not exist gets a target without upstream (the plugin answers 500
    /// before it is used).
    fn split_targets(
        &mut self,
        id: &str,
        split_conf: &Value,
        conf: &RouteConf,
        websocket: bool,
    ) -> Result<Vec<Arc<ProxyTarget>>, String> {
        use plugins::traffic_split::{upstream_refs, UpstreamRef};
        let mut targets = Vec::new();
        for (i, r) in upstream_refs(split_conf).into_iter().enumerate() {
            let upstream = match r {
                UpstreamRef::Id(uid) => self.upstream_object(&uid),
                UpstreamRef::Inline(value) => {
                    let up: UpstreamConf = serde_json::from_value(value)
                        .map_err(|e| format!("traffic-split upstream {}: {e}", i + 1))?;
                    let cert = client_cert_for(&up, &self.client_ssls)?;
                    let compiled = CompiledUpstream::compile(
                        &up,
                        &format!("routes/{id}/traffic-split/{i}"),
                        &mut self.balancers,
                        cert,
                    )
                    .map_err(|e| e.to_string())?;
                    Some(Arc::new(compiled))
                }
            };
            // Timeouts as for the route's own upstream: the route's, else
            // this upstream's.
            targets.push(Arc::new(self.proxy_target(upstream, conf, websocket)));
        }
        Ok(targets)
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
            let cert = client_cert_for(up, &self.client_ssls)?;
            let compiled =
                CompiledUpstream::compile(up, &format!("routes/{id}"), &mut self.balancers, cert)
                    .map_err(|e| e.to_string())?;
            Some(Arc::new(compiled))
        } else if let Some(uid) = conf.upstream_id.as_ref().and_then(id_text) {
            self.upstream_object(&uid)
        } else if let Some((sid, svc)) = &service {
            if let Some(up) = &svc.upstream {
                let cert = client_cert_for(up, &self.client_ssls)?;
                let compiled = CompiledUpstream::compile(
                    up,
                    &format!("services/{sid}"),
                    &mut self.balancers,
                    cert,
                )
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
        // APISIX merges the plugin config into the route (route wins), then
        // the route over its service (route wins).
        let mut plugin_confs: BTreeMap<String, Value> = service
            .as_ref()
            .and_then(|(_, s)| s.plugins.clone())
            .unwrap_or_default();
        if let Some(pc) = conf.plugin_config_id.as_ref().and_then(id_text) {
            match self.plugin_configs.get(&pc) {
                Some(p) => plugin_confs.extend(p.clone()),
                None => return Err(format!("plugin config {pc} does not exist")),
            }
        }
        plugin_confs.extend(conf.plugins.clone().unwrap_or_default());
        let plugins = self.compile_plugins(&plugin_confs, &format!("routes/{id}"), false)?;

        let websocket = conf
            .enable_websocket
            .or_else(|| service.as_ref().and_then(|(_, s)| s.enable_websocket))
            .unwrap_or(false);
        let split = match plugin_confs.get(plugins::traffic_split::NAME) {
            Some(split_conf) => self.split_targets(id, split_conf, conf, websocket)?,
            None => Vec::new(),
        };
        let mut target = self.proxy_target(upstream, conf, websocket);
        target.split = split;
        let proxy = ProxyService::new(target);

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
                .map(|l| plugins::cidr::IpSet::from_entries(&l).map(Box::new))
                .transpose()
                .map_err(|e| e.to_string())?,
            vars: conf.vars.as_ref().map(expr::compile).transpose()?,
        };
        let uris = match (&conf.uri, &conf.uris) {
            (Some(u), _) => vec![u.clone()],
            (None, Some(us)) => us.clone(),
            (None, None) => return Err("route has no uri".into()),
        };
        let info = plugins::ctx::RouteInfo {
            name: conf.name.as_deref().map(Box::from),
            service_name: service
                .as_ref()
                .and_then(|(_, s)| s.name.as_deref())
                .map(Box::from),
            uris: uris.iter().map(|u| Box::from(u.as_str())).collect(),
            hosts: hosts.iter().map(|h| Box::from(h.as_str())).collect(),
        };
        Ok(CompiledRoute {
            id: id.into(),
            service_id: service.as_ref().map(|(sid, _)| sid.as_str().into()),
            info: Arc::new(info),
            uris,
            priority: conf.priority,
            order,
            matcher: Arc::new(matcher),
            plugins: Arc::new(plugins),
            proxy,
        })
    }

    fn snapshot(&self) -> Snapshot {
        let router = self.table.router();
        let routes = self.compiled_routes;
        debug_assert_eq!(
            routes,
            self.routes
                .values()
                .filter(|r| r.compiled.is_some())
                .count()
        );
        let dispatch = Dispatch(Arc::new(DispatchState {
            router,
            globals: self.globals.clone(),
            consumers: self.consumer_index.clone(),
        }));
        Snapshot {
            version: self.version.fetch_add(1, Ordering::Relaxed) + 1,
            service: dispatch,
            routes,
            certs: self.certs.clone(),
        }
    }

    /// Plugin state entries alive (for tests).
    pub fn live_plugin_state(&self) -> usize {
        self.state.live()
    }
}

/// A consumer's or credential's auth plugins into the index.
fn add_credentials(
    index: &mut ConsumerIndex,
    consumer: &Arc<Consumer>,
    credential_id: Option<&str>,
    value: &Value,
) {
    for (name, conf) in plugins_of(value) {
        let Some(spec) = plugins::find(&name).filter(|s| s.kind() == PluginKind::Auth) else {
            continue;
        };
        match spec.compile_credential(&conf) {
            Ok(Some(key)) => {
                let added = index.add(
                    spec.name(),
                    key.key,
                    Credential {
                        consumer: consumer.clone(),
                        id: credential_id.map(Into::into),
                        data: key.data,
                    },
                );
                if !added {
                    tracing::error!(consumer = %consumer.username, plugin = spec.name(), "duplicate auth key ignored");
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(consumer = %consumer.username, plugin = spec.name(), error = %e, "credential does not compile; ignored")
            }
        }
    }
}

fn plugins_of(value: &Value) -> BTreeMap<String, Value> {
    value
        .get("plugins")
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

fn parse<T: serde::de::DeserializeOwned>(entry: &Entry) -> Option<T> {
    match T::deserialize(&entry.value) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!(key = %entry.key, error = %e, "stored object does not parse; ignored");
            None
        }
    }
}

struct DispatchState {
    router: Router<Arc<CompiledRoute>>,
    globals: Arc<GlobalRules>,
    consumers: Arc<ConsumerIndex>,
}

/// Finds the route and runs the request through the global rules and the
/// route's plugins into its proxy; unmatched requests still pass the global
/// rules before their 404.
///
/// Called through `&self` from the snapshot, not as a tower service: that
/// would clone (box) the service for each request.
#[derive(Clone)]
pub struct Dispatch(Arc<DispatchState>);

/// The inner service of an unmatched request.
#[derive(Clone, Copy)]
struct NotFound;

impl Service<Request<ClientBody>> for NotFound {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<ClientBody>) -> Self::Future {
        std::future::ready(Ok(route_not_found()))
    }
}

impl Dispatch {
    /// Routes `req`; the future runs its plugins and its proxy (or the
    /// global rules and the 404 when no route matched). A path that cannot
    /// be normalised is a 400.
    pub fn serve(&self, req: Request<ClientBody>) -> Dispatched {
        let state = &self.0;
        let Some(path) = normalize_path(req.uri().path()) else {
            return Box::pin(std::future::ready(crate::error_page::error_page(
                StatusCode::BAD_REQUEST,
                None,
            )));
        };
        let host = request_host(&req).map(normalize_host);
        let conn = req
            .extensions()
            .get::<ConnInfo>()
            .cloned()
            .unwrap_or_else(ConnInfo::unknown);
        let client_ip = req
            .extensions()
            .get::<ClientIp>()
            .map(|c| c.0)
            .unwrap_or_else(|| conn.peer.ip());
        let route = {
            let vars = RequestVars {
                req: &req,
                host: host.as_deref(),
                path: &path,
            };
            let view = RequestView {
                method: req.method(),
                path: &path,
                host: host.as_deref(),
                client_ip: Some(client_ip),
                vars: &vars,
            };
            state.router.find_matched(&view).map(|(route, matched)| {
                let index = match route.uris.len() {
                    1 => 0,
                    _ => route.uris.iter().position(|u| matched.is(u)).unwrap_or(0),
                };
                // Borrowed from the snapshot, not cloned: a reference count
                // every worker's requests write to costs a cache line moving
                // between cores on each request.
                (route, index)
            })
        };
        let mut ctx = Box::new(Ctx::new(client_ip, conn, state.consumers.clone()));
        if let std::borrow::Cow::Owned(p) = path {
            ctx.path = Some(p.into_boxed_str());
        }
        ctx.host = host.map(|h| h.into_owned().into_boxed_str());
        match route {
            Some((route, matched_uri)) => {
                ctx.route_id = Some(route.id.clone());
                ctx.service_id = route.service_id.clone();
                ctx.route = Some(route.info.clone());
                ctx.matched_uri = u16::try_from(matched_uri).unwrap_or(0);
                let chain = Chain {
                    globals: state.globals.clone(),
                    route: route.plugins.clone(),
                    consumers: state.consumers.clone(),
                    inner: route.proxy.clone(),
                };
                Box::pin(chain.run(ctx, req))
            }
            None => {
                let chain = Chain {
                    globals: state.globals.clone(),
                    route: PluginSet::empty(),
                    consumers: state.consumers.clone(),
                    inner: NotFound,
                };
                Box::pin(chain.run(ctx, req))
            }
        }
    }
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

/// Publishes one new snapshot for every store change or batch of changes.
pub struct Publisher {
    state: Mutex<Published>,
    live: SharedSnapshot,
}

struct Published {
    compiler: Compiler,
    /// The in-kernel deny list following the global rules, with the
    /// trusted proxies' prefixes it leaves out.
    deny: Option<(Arc<crate::xdp::DenyList>, Vec<ipnet::IpNet>)>,
    /// The store revision the live snapshot reflects; older events are
    /// dropped (a remote store may replay what it already sent).
    revision: u64,
    loaded: bool,
}

impl Publisher {
    /// Subscribes to `store`, whose current contents become the first
    /// snapshot before this returns, and follows every later change.
    pub fn start(
        store: &dyn Store,
        options: ProxyOptions,
        roots: Arc<rustls::RootCertStore>,
        plugin_attr: Map<String, Value>,
        tls_edge: Option<Arc<TlsEdge>>,
        head: Option<Arc<PluginSet>>,
    ) -> Result<Arc<Self>, StoreError> {
        let mut compiler = Compiler::new(options);
        compiler.set_tls_edge(tls_edge);
        compiler.set_head(head);
        compiler.balancers.roots = roots.clone();
        compiler.clients = Clients::new(roots);
        compiler.set_plugin_attr(plugin_attr);
        let empty = compiler.snapshot();
        let publisher = Arc::new(Publisher {
            state: Mutex::new(Published {
                compiler,
                deny: None,
                revision: 0,
                loaded: false,
            }),
            live: Arc::new(ArcSwap::from_pointee(empty)),
        });
        store.subscribe(publisher.clone())?;
        Ok(publisher)
    }

    pub fn live(&self) -> SharedSnapshot {
        self.live.clone()
    }

    /// From now on `deny` holds the global rules' deny list (see
    /// [`crate::xdp`]), starting with the current one.
    pub fn follow_with(&self, deny: Arc<crate::xdp::DenyList>, trusted: Vec<ipnet::IpNet>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        deny.sync(&state.compiler.global_deny_list(&trusted));
        state.deny = Some((deny, trusted));
    }
}

impl Watcher for Publisher {
    fn on_change(&self, change: &Change<'_>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let revision = change.revision();
        // A bug in compiling one object must not take the gateway down or
        // leave it half-updated: keep serving the previous snapshot.
        let next = match change {
            Change::Events { events, .. } => {
                if state.loaded && revision <= state.revision {
                    tracing::debug!(revision, "configuration change seen already");
                    return;
                }
                state.compiler.apply_or_revert(events)
            }
            Change::Reset { entries, .. } => state.compiler.replace_or_revert(entries),
        };
        let Some(next) = next else {
            tracing::error!(
                revision,
                "compiling a configuration change failed; previous configuration kept"
            );
            return;
        };
        if matches!(change, Change::Reset { .. }) {
            tracing::info!(
                routes = next.routes,
                version = next.version,
                revision,
                "configuration loaded"
            );
        } else {
            tracing::debug!(
                version = next.version,
                routes = next.routes,
                revision,
                "configuration swapped"
            );
        }
        state.revision = revision;
        state.loaded = true;
        self.live.store(Arc::new(next));
        if let Some((deny, trusted)) = &state.deny {
            deny.sync(&state.compiler.global_deny_list(trusted));
        }
    }
}

#[cfg(test)]
mod tests;
