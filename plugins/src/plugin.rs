//! The plugin contract: a [`PluginSpec`] (what the Admin API and the
//! compiler know about a plugin) builds [`Plugin`]s (the compiled form the
//! data plane runs, once per configuration object).
//!
//! A plugin implements only the phases it needs and says which in
//! [`Plugin::phases`]; the chain never calls a hook a plugin does not have,
//! so a plugin costs nothing in the phases it skips. Phases and their order
//! are APISIX's: `rewrite`, `access`, `before_proxy` (request side, may end
//! the request with a response), then `header_filter`, `body_filter` (per
//! body chunk) and `log` (after the response has been sent). The response
//! phases also run for answers a plugin gave early (a 401 still gets CORS
//! headers and is still counted).

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use http::{request, response, Response, StatusCode};
use serde_json::Value;

use crate::ctx::Ctx;
use crate::schema::Schema;
use crate::{json_response, ResponseBody};

/// The phases a plugin has hooks in, as a bit set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Phases(u8);

impl Phases {
    pub const NONE: Phases = Phases(0);
    pub const REWRITE: Phases = Phases(1);
    pub const ACCESS: Phases = Phases(1 << 1);
    pub const BEFORE_PROXY: Phases = Phases(1 << 2);
    pub const HEADER_FILTER: Phases = Phases(1 << 3);
    pub const BODY_FILTER: Phases = Phases(1 << 4);
    pub const LOG: Phases = Phases(1 << 5);
    pub const ALL: Phases = Phases(0b11_1111);
    /// Phases that run once the response exists.
    pub const RESPONSE: Phases = Phases((1 << 3) | (1 << 4) | (1 << 5));

    /// Whether any phase of `other` is in `self`.
    pub const fn has(self, other: Phases) -> bool {
        self.0 & other.0 != 0
    }
}

impl std::ops::BitOr for Phases {
    type Output = Phases;
    fn bitor(self, rhs: Phases) -> Phases {
        Phases(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for Phases {
    fn bitor_assign(&mut self, rhs: Phases) {
        self.0 |= rhs.0;
    }
}

/// A future a request-side phase waits on (a delay, a call to a service).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a request-side phase decided.
pub enum Flow {
    /// Go on with the next plugin.
    Continue,
    /// End the request with this response (APISIX's `return code, body`).
    /// The response phases still run.
    Respond(Response<ResponseBody>),
    /// Wait, then decide. The future owns what it needs.
    Wait(BoxFuture<Flow>),
}

impl Flow {
    /// `return status, {"message": text}` as APISIX auth plugins answer.
    pub fn message(status: StatusCode, text: &str) -> Flow {
        Flow::Respond(json_response(
            status,
            &serde_json::json!({ "message": text }),
        ))
    }

    /// `return status, {"error_msg": text}` as APISIX limit plugins answer.
    pub fn error_msg(status: StatusCode, text: &str) -> Flow {
        Flow::Respond(json_response(
            status,
            &serde_json::json!({ "error_msg": text }),
        ))
    }

    /// `return status` with no body.
    pub fn status(status: StatusCode) -> Flow {
        let mut resp = Response::new(crate::full_body(Bytes::new()));
        *resp.status_mut() = status;
        Flow::Respond(resp)
    }
}

/// A plugin configuration compiled for the data plane. One value serves
/// every request of the object it was configured on, concurrently.
#[allow(unused_variables)]
pub trait Plugin: Send + Sync + 'static {
    /// The phases this plugin has hooks in; others are never called.
    fn phases(&self) -> Phases;

    fn rewrite(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        Flow::Continue
    }

    fn access(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        Flow::Continue
    }

    /// Right before the request goes to the upstream.
    fn before_proxy(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        Flow::Continue
    }

    /// The response head, before it is sent. `ctx.status` is set.
    fn header_filter(&self, ctx: &mut Ctx, resp: &mut response::Parts) {}

    /// One chunk of the response body; `end` is true once, after the last
    /// chunk (with an empty `chunk` unless a plugin before added to it).
    /// Replace `chunk` to change it; make it empty to drop it.
    fn body_filter(&self, ctx: &mut Ctx, chunk: &mut Bytes, end: bool) {}

    /// After the response was sent (or the client went away).
    fn log(&self, ctx: &Ctx) {}

    /// Whether `log` reads the response headers (`sent_http_*`): only then
    /// are they kept for it. Default: no.
    fn reads_response_headers(&self) -> bool {
        false
    }

    /// Whether `log` reads the request as it arrived ([`Ctx::request`]:
    /// method, URI, headers): only then is it kept. Default: no.
    fn reads_request(&self) -> bool {
        false
    }

    /// How many bytes of the request body `log` reads (loggers'
    /// `include_req_body`): that much is copied as the body streams to the
    /// upstream, into a [`crate::ctx::RequestBodyCapture`] in
    /// [`Ctx::data`]. Default: none.
    fn request_body_bytes(&self) -> usize {
        0
    }

    /// Whether `log` reads the sizes of the exchange
    /// ([`Ctx::request_length`], [`Ctx::header_bytes_sent`]): only then are
    /// they measured. Default: no.
    fn reads_sizes(&self) -> bool {
        false
    }
}

/// What kind of plugin this is, as APISIX's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    Other,
    /// Identifies a consumer; allowed in consumers and credentials.
    Auth,
}

/// Which schema a configuration is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaType {
    /// On a route, service, plugin config or global rule.
    Route,
    /// On a consumer or credential.
    Consumer,
    /// `plugin_metadata/{name}`.
    Metadata,
}

/// A consumer-side auth configuration, compiled: the key it is found by and
/// whatever the plugin needs to check a request against it.
pub struct CredentialKey {
    /// The value consumers are looked up by (key-auth `key`, basic-auth
    /// `username`, jwt-auth `key`). Unique per plugin across consumers.
    pub key: String,
    pub data: Arc<dyn Any + Send + Sync>,
}

/// What the Admin API and the compiler know about one plugin.
pub trait PluginSpec: Send + Sync + 'static {
    /// APISIX's name, byte for byte (`ip-restriction`).
    fn name(&self) -> &'static str;
    /// Higher runs first within a phase.
    fn priority(&self) -> i32;
    fn kind(&self) -> PluginKind {
        PluginKind::Other
    }
    /// The route-side schema, served by the Admin API.
    fn schema(&self) -> &'static Schema;
    /// The consumer-side schema, where APISIX has one.
    fn consumer_schema(&self) -> Option<&'static Schema> {
        None
    }
    /// The `plugin_metadata` schema, where APISIX has one.
    fn metadata_schema(&self) -> Option<&'static Schema> {
        None
    }
    /// Schema plus semantic checks; no side effects (no tasks, no metrics,
    /// no files). The error is the text after APISIX's `failed to check the
    /// configuration of plugin NAME err: ` prefix.
    fn check(&self, conf: &Value, target: SchemaType) -> Result<(), String> {
        match target {
            SchemaType::Route => self.schema().validate(conf),
            SchemaType::Consumer => match self.consumer_schema() {
                Some(s) => s.validate(conf),
                None => self.schema().validate(conf),
            },
            SchemaType::Metadata => match self.metadata_schema() {
                Some(s) => s.validate(conf),
                None => Ok(()),
            },
        }
    }
    /// Builds the data-plane form of a checked configuration. Fails cleanly
    /// (never panics) on anything `check` let through by mistake.
    fn compile(&self, conf: &Value, cx: &CompileCx<'_>) -> Result<Arc<dyn Plugin>, String>;
    /// Fields (dotted paths) APISIX keeps encrypted at rest in etcd when
    /// `apisix.data_encryption.enable_encrypt_fields` is on: `key` of
    /// key-auth, `password` of basic-auth. Default: none.
    fn encrypt_fields(&self) -> &'static [&'static str] {
        &[]
    }
    /// For auth plugins: the consumer-side field that must be unique across
    /// consumers and credentials (`duplicate key of plugin key-auth ...`).
    fn key_attr(&self) -> &'static str {
        "key"
    }
    /// For auth plugins: the consumer-side configuration compiled into the
    /// lookup key and the data the route side checks against.
    fn compile_credential(&self, conf: &Value) -> Result<Option<CredentialKey>, String> {
        let _ = conf;
        Ok(None)
    }
}

/// What a plugin sees when it is compiled.
pub struct CompileCx<'a> {
    /// The object the plugin is configured on (`routes/1`,
    /// `global_rules/g`, `consumers/jack`): state is kept per owner.
    pub owner: &'a str,
    /// `plugin_metadata/{name}`, when set.
    pub metadata: Option<&'a Value>,
    /// `plugin_attr.{name}` from config.yaml, when set.
    pub attr: Option<&'a Value>,
    pub state: &'a StateCache,
    /// The plugin's own configuration, for keying its state.
    pub conf: &'a Value,
    pub name: &'static str,
    /// Whether `upstreams/{id}` exists (traffic-split); `None`: unknown.
    pub upstream_exists: Option<&'a dyn Fn(&str) -> bool>,
}

impl CompileCx<'_> {
    /// State that outlives the snapshot: the same value comes back while this
    /// owner keeps this plugin with this configuration (and some compiled
    /// plugin still holds it), and a fresh one once the configuration
    /// changes, as APISIX keys counters by `conf_version`.
    pub fn state<T: Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Arc<T> {
        self.state
            .get_or_init(self.owner, self.name, conf_hash(self.conf), init)
    }

    /// State shared by every object that configures this plugin with the
    /// same `key` (limit-count's `group`), whatever their owners and
    /// configurations: the same value comes back while some compiled
    /// plugin holds it.
    pub fn shared_state<T: Any + Send + Sync>(
        &self,
        key: &str,
        init: impl FnOnce() -> T,
    ) -> Arc<T> {
        // Owners are `kind/id`; the prefix keeps shared keys apart from them.
        self.state
            .get_or_init(&format!("shared:{key}"), self.name, 0, init)
    }
}

/// Hash of a configuration value, independent of object key order.
pub fn conf_hash(conf: &Value) -> u64 {
    fn feed(v: &Value, h: &mut std::collections::hash_map::DefaultHasher) {
        match v {
            Value::Null => 0u8.hash(h),
            Value::Bool(b) => (1u8, b).hash(h),
            Value::Number(n) => (2u8, n.to_string()).hash(h),
            Value::String(s) => (3u8, s).hash(h),
            Value::Array(items) => {
                (4u8, items.len()).hash(h);
                items.iter().for_each(|i| feed(i, h));
            }
            Value::Object(map) => {
                (5u8, map.len()).hash(h);
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                for k in keys {
                    k.hash(h);
                    feed(&map[k], h);
                }
            }
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    feed(conf, &mut h);
    h.finish()
}

type StateKey = (String, &'static str, u64);

/// Plugin state shared across snapshots, held weakly: an entry lives as long
/// as a compiled plugin holds it, so state of removed or reconfigured
/// plugins goes away with the last snapshot that used it.
#[derive(Default)]
pub struct StateCache {
    entries: Mutex<HashMap<StateKey, Weak<dyn Any + Send + Sync>>>,
}

impl StateCache {
    fn get_or_init<T: Any + Send + Sync>(
        &self,
        owner: &str,
        plugin: &'static str,
        conf: u64,
        init: impl FnOnce() -> T,
    ) -> Arc<T> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let key = (owner.to_string(), plugin, conf);
        if let Some(live) = entries.get(&key).and_then(Weak::upgrade) {
            if let Ok(state) = live.downcast::<T>() {
                return state;
            }
        }
        let fresh = Arc::new(init());
        let erased: Arc<dyn Any + Send + Sync> = fresh.clone();
        entries.insert(key, Arc::downgrade(&erased));
        // Dead entries are dropped now and then, not on every call.
        if entries.len() > 64 && entries.len().is_power_of_two() {
            entries.retain(|_, w| w.strong_count() > 0);
        }
        fresh
    }

    /// Live entries, for tests and diagnostics.
    pub fn live(&self) -> usize {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.values().filter(|w| w.strong_count() > 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn conf_hash_ignores_key_order() {
        assert_eq!(
            conf_hash(&json!({"a": 1, "b": [1, 2]})),
            conf_hash(&json!({"b": [1, 2], "a": 1}))
        );
        assert_ne!(conf_hash(&json!({"a": 1})), conf_hash(&json!({"a": 2})));
    }

    #[test]
    fn state_lives_while_held_and_follows_the_conf() {
        let cache = StateCache::default();
        let conf = json!({"count": 1});
        let cx = |conf| CompileCx {
            owner: "routes/1",
            metadata: None,
            attr: None,
            state: &cache,
            conf,
            name: "limit-count",
            upstream_exists: None,
        };
        let a = cx(&conf).state(|| std::sync::atomic::AtomicU64::new(7));
        a.store(9, std::sync::atomic::Ordering::Relaxed);
        let b = cx(&conf).state(|| std::sync::atomic::AtomicU64::new(0));
        assert!(Arc::ptr_eq(&a, &b));
        let other = json!({"count": 2});
        let c = cx(&other).state(|| std::sync::atomic::AtomicU64::new(0));
        assert!(!Arc::ptr_eq(&a, &c));
        drop((a, b));
        let d = cx(&conf).state(|| std::sync::atomic::AtomicU64::new(1));
        assert_eq!(d.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[test]
    fn shared_state_is_keyed_by_key_only() {
        let cache = StateCache::default();
        let (c1, c2) = (json!({"count": 1}), json!({"count": 2}));
        let cx = |owner, conf| CompileCx {
            owner,
            metadata: None,
            attr: None,
            state: &cache,
            conf,
            name: "limit-count",
            upstream_exists: None,
        };
        let a = cx("routes/1", &c1).shared_state("g", || 1u8);
        let b = cx("routes/2", &c2).shared_state("g", || 2u8);
        assert!(Arc::ptr_eq(&a, &b));
        let other = cx("routes/1", &c1).shared_state("h", || 3u8);
        assert_eq!(*other, 3);
        // Never the same as an owner's own state.
        let own = cx("shared:g", &c1).state(|| 4u8);
        assert_eq!(*own, 4);
    }
}
