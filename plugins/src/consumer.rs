//! Consumers as the data plane sees them: who a request is once an auth
//! plugin has identified it, and the per-plugin indexes auth plugins look
//! credentials up in.
//!
//! The index is built once per snapshot from every consumer and credential:
//! a lookup is one hash-map probe, whatever the number of consumers.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use crate::chain::PluginSet;

/// A consumer (`/apisix/consumers/{username}`), compiled.
pub struct Consumer {
    pub username: Arc<str>,
    /// `labels`/custom id sent upstream as `X-Consumer-Custom-ID`, when set.
    pub custom_id: Option<Arc<str>>,
    pub group_id: Option<Arc<str>>,
    /// The consumer group's plugins overlaid by the consumer's own, without
    /// auth plugins: merged into the route after authentication.
    pub plugins: Arc<PluginSet>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("username", &self.username)
            .field("group_id", &self.group_id)
            .finish_non_exhaustive()
    }
}

/// One auth configuration of a consumer, or one of its credentials.
pub struct Credential {
    pub consumer: Arc<Consumer>,
    /// The credential id for `/consumers/{c}/credentials/{id}`; `None` when
    /// the auth plugin sits on the consumer itself.
    pub id: Option<Arc<str>>,
    /// What the plugin compiled from the consumer-side configuration.
    pub data: Arc<dyn Any + Send + Sync>,
}

impl Credential {
    /// The compiled consumer-side configuration, if it is a `T`.
    pub fn data<T: Any>(&self) -> Option<&T> {
        self.data.downcast_ref::<T>()
    }
}

/// Every credential by plugin and key.
#[derive(Default)]
pub struct ConsumerIndex {
    by_plugin: HashMap<&'static str, HashMap<String, Arc<Credential>>>,
    consumers: HashMap<Arc<str>, Arc<Consumer>>,
}

impl ConsumerIndex {
    /// The credential of `plugin` whose key is `key`.
    pub fn find(&self, plugin: &str, key: &str) -> Option<&Arc<Credential>> {
        self.by_plugin.get(plugin)?.get(key)
    }

    /// A consumer by username.
    pub fn consumer(&self, username: &str) -> Option<&Arc<Consumer>> {
        self.consumers.get(username)
    }

    /// Whether no consumer uses `plugin`.
    pub fn is_empty_for(&self, plugin: &str) -> bool {
        self.by_plugin.get(plugin).is_none_or(HashMap::is_empty)
    }

    pub fn add_consumer(&mut self, consumer: Arc<Consumer>) {
        self.consumers.insert(consumer.username.clone(), consumer);
    }

    /// Adds a credential; a key already taken keeps its first owner (the
    /// Admin API refuses duplicates, so this only happens with a store
    /// written by something else).
    pub fn add(&mut self, plugin: &'static str, key: String, credential: Credential) -> bool {
        let keys = self.by_plugin.entry(plugin).or_default();
        if keys.contains_key(&key) {
            return false;
        }
        keys.insert(key, Arc::new(credential));
        true
    }
}

/// Header names set on the upstream request for an identified consumer.
pub mod headers {
    use http::HeaderName;
    pub const CONSUMER_USERNAME: HeaderName = HeaderName::from_static("x-consumer-username");
    pub const CREDENTIAL_IDENTIFIER: HeaderName =
        HeaderName::from_static("x-credential-identifier");
    pub const CONSUMER_CUSTOM_ID: HeaderName = HeaderName::from_static("x-consumer-custom-id");
}

/// Records the identified consumer in the context and tells the upstream
/// who it is, as APISIX's `attach_consumer`: `X-Consumer-Username`,
/// `X-Credential-Identifier` (credentials only) and `X-Consumer-Custom-ID`
/// (consumer `labels.custom_id`). Values a client sent in these headers are
/// always removed first, so they cannot be forged.
pub fn attach(
    ctx: &mut crate::ctx::Ctx,
    req: &mut http::request::Parts,
    credential: &Arc<Credential>,
) {
    use http::HeaderValue;
    let h = &mut req.headers;
    h.remove(headers::CONSUMER_USERNAME);
    h.remove(headers::CREDENTIAL_IDENTIFIER);
    h.remove(headers::CONSUMER_CUSTOM_ID);
    let consumer = &credential.consumer;
    if let Ok(v) = HeaderValue::from_str(&consumer.username) {
        h.insert(headers::CONSUMER_USERNAME, v);
    }
    if let Some(v) = credential
        .id
        .as_deref()
        .and_then(|id| HeaderValue::from_str(id).ok())
    {
        h.insert(headers::CREDENTIAL_IDENTIFIER, v);
    }
    if let Some(v) = consumer
        .custom_id
        .as_deref()
        .and_then(|id| HeaderValue::from_str(id).ok())
    {
        h.insert(headers::CONSUMER_CUSTOM_ID, v);
    }
    ctx.credential = Some(credential.clone());
}

/// Builds an index for tests: `(plugin, consumer username, consumer-side conf)`.
#[doc(hidden)]
pub fn index_for_tests(
    entries: &[(&'static str, &str, serde_json::Value)],
) -> Result<ConsumerIndex, String> {
    let mut index = ConsumerIndex::default();
    for (plugin, username, conf) in entries {
        let spec = crate::registry::find(plugin).ok_or("unknown plugin")?;
        spec.check(conf, crate::plugin::SchemaType::Consumer)?;
        let Some(key) = spec.compile_credential(conf)? else {
            return Err(format!("{plugin} has no credentials"));
        };
        let consumer = index.consumer(username).cloned().unwrap_or_else(|| {
            Arc::new(Consumer {
                username: (*username).into(),
                custom_id: None,
                group_id: None,
                plugins: Arc::new(PluginSet::default()),
            })
        });
        index.add_consumer(consumer.clone());
        index.add(
            spec.name(),
            key.key,
            Credential {
                consumer,
                id: None,
                data: key.data,
            },
        );
    }
    Ok(index)
}
