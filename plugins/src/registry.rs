//! The plugins ferrogate knows, by APISIX name.

use std::sync::{Arc, OnceLock};

use serde_json::Value;

use crate::ip_restriction;
use crate::schema::Schema;
use crate::HttpService;

/// What the Admin API and the data plane need to know about one plugin.
pub struct PluginSpec {
    /// APISIX's name, byte for byte (`ip-restriction`).
    pub name: &'static str,
    /// Higher runs first, as in APISIX.
    pub priority: i32,
    /// The configuration schema, served by the Admin API.
    pub schema: fn() -> &'static Schema,
    /// Schema plus semantic checks; the error is the text after APISIX's
    /// `failed to check the configuration of plugin NAME err: ` prefix.
    pub check: fn(&Value) -> Result<(), String>,
    /// Builds the per-snapshot form. Only called on configurations that
    /// passed `check`, but still fails cleanly rather than panicking.
    pub compile: fn(&Value) -> Result<CompiledPlugin, String>,
}

/// Every plugin, in priority order (highest first).
pub static PLUGINS: &[PluginSpec] = &[PluginSpec {
    name: ip_restriction::NAME,
    priority: ip_restriction::PRIORITY,
    schema: ip_restriction::schema,
    check: ip_restriction::check,
    compile: |conf| {
        ip_restriction::compile(conf).map(|c| CompiledPlugin::IpRestriction(Arc::new(c)))
    },
}];

/// Looks a plugin up by its APISIX name.
pub fn find(name: &str) -> Option<&'static PluginSpec> {
    PLUGINS.iter().find(|p| p.name == name)
}

/// Why a plugin configuration was refused, worded as APISIX words it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    #[error("unknown plugin [{0}]")]
    Unknown(String),
    #[error("failed to check the configuration of plugin {name} err: {reason}")]
    Invalid { name: String, reason: String },
}

/// Checks and compiles one plugin configuration.
pub fn compile(name: &str, conf: &Value) -> Result<(i32, CompiledPlugin), PluginError> {
    let spec = find(name).ok_or_else(|| PluginError::Unknown(name.to_string()))?;
    let invalid = |reason| PluginError::Invalid {
        name: name.to_string(),
        reason,
    };
    (spec.check)(conf).map_err(invalid)?;
    let compiled = (spec.compile)(conf).map_err(invalid)?;
    Ok((spec.priority, compiled))
}

/// A plugin configuration compiled for one snapshot.
#[derive(Clone, Debug)]
pub enum CompiledPlugin {
    IpRestriction(Arc<ip_restriction::Rule>),
}

impl CompiledPlugin {
    /// Wraps `inner` in this plugin's tower layer.
    pub fn wrap<B>(&self, inner: HttpService<B>) -> HttpService<B>
    where
        B: Send + 'static,
    {
        match self {
            CompiledPlugin::IpRestriction(rule) => HttpService::new(tower::Layer::layer(
                &ip_restriction::IpRestrictionLayer::new(rule.clone()),
                inner,
            )),
        }
    }
}

/// Lazily built schema storage shared by plugin modules.
pub(crate) fn cached(cell: &'static OnceLock<Schema>, build: fn() -> Schema) -> &'static Schema {
    cell.get_or_init(build)
}

/// Wraps `inner` with every plugin of `chain`, highest priority outermost.
pub fn build_chain<B>(chain: &[(i32, CompiledPlugin)], inner: HttpService<B>) -> HttpService<B>
where
    B: Send + 'static,
{
    let mut ordered: Vec<&(i32, CompiledPlugin)> = chain.iter().collect();
    // Lowest priority is wrapped first so that it ends up innermost.
    ordered.sort_by_key(|(prio, _)| *prio);
    ordered
        .into_iter()
        .fold(inner, |svc, (_, plugin)| plugin.wrap(svc))
}
