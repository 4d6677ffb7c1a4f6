//! The plugins ferrogate knows, by APISIX name, and compiling a `plugins`
//! object into a [`PluginSet`].
//!
//! Adding a plugin: its module, and one line in [`PLUGINS`].

use std::sync::{Arc, OnceLock};

use serde_json::{Map, Value};

use crate::chain::{Entry, ErrorResponse, PluginSet};
use crate::plugin::{CompileCx, PluginKind, PluginSpec, SchemaType, StateCache};
use crate::schema::Schema;
use crate::{expr, ip_restriction};

/// Every plugin, in no particular order (see [`by_priority`]).
pub static PLUGINS: &[&dyn PluginSpec] = &[
    &ip_restriction::IpRestrictionSpec,
    &crate::key_auth::KeyAuthSpec,
    &crate::basic_auth::BasicAuthSpec,
    &crate::consumer_restriction::ConsumerRestrictionSpec,
    &crate::jwt_auth::JwtAuthSpec,
    &crate::proxy_rewrite::ProxyRewriteSpec,
    &crate::response_rewrite::ResponseRewriteSpec,
    &crate::limit_count::LimitCountSpec,
    &crate::limit_req::LimitReqSpec,
    &crate::limit_conn::LimitConnSpec,
    &crate::request_id::RequestIdSpec,
    &crate::real_ip::RealIpSpec,
    &crate::cors::CorsSpec,
    &crate::redirect::RedirectSpec,
    &crate::uri_blocker::UriBlockerSpec,
    &crate::ua_restriction::UaRestrictionSpec,
    &crate::traffic_split::TrafficSplitSpec,
    &crate::referer_restriction::RefererRestrictionSpec,
    &crate::fault_injection::FaultInjectionSpec,
    &crate::api_breaker::ApiBreakerSpec,
    &crate::gzip::GzipSpec,
    &crate::prometheus::PrometheusSpec,
    &crate::public_api::PublicApiSpec,
    &crate::http_logger::HttpLoggerSpec,
    &crate::tcp_logger::TCP_LOGGER,
    &crate::tcp_logger::UDP_LOGGER,
    &crate::file_logger::FileLoggerSpec,
    &crate::opentelemetry::OpenTelemetrySpec,
];

/// Looks a plugin up by its APISIX name.
pub fn find(name: &str) -> Option<&'static dyn PluginSpec> {
    PLUGINS.iter().copied().find(|p| p.name() == name)
}

/// Every plugin, highest priority first (`GET /apisix/admin/plugins/list`).
pub fn by_priority() -> Vec<&'static dyn PluginSpec> {
    let mut all: Vec<&'static dyn PluginSpec> = PLUGINS.to_vec();
    all.sort_by(|a, b| b.priority().cmp(&a.priority()).then(a.name().cmp(b.name())));
    all
}

/// Why a plugin configuration was refused, worded as APISIX words it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    #[error("unknown plugin [{0}]")]
    Unknown(String),
    #[error("failed to check the configuration of plugin {name} err: {reason}")]
    Invalid { name: String, reason: String },
}

fn build_meta_schema() -> Schema {
    Schema::object()
        .prop("disable", Schema::Boolean)
        .prop(
            "error_response",
            Schema::Custom(
                |v| match v {
                    Value::String(_) | Value::Object(_) => Ok(()),
                    _ => Err("value should match only one schema, but matches none".into()),
                },
                || serde_json::json!({"oneOf": [{"type": "string"}, {"type": "object"}]}),
            ),
        )
        .prop("priority", Schema::integer().int())
        .prop("filter", Schema::array(Schema::Any).done())
        .prop("pre_function", Schema::string().done())
        .done()
}

/// The `_meta` schema APISIX injects into every plugin.
pub fn meta_schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    CELL.get_or_init(build_meta_schema)
}

/// The configuration without `_meta`, borrowed when there is none.
fn without_meta(conf: &Value) -> std::borrow::Cow<'_, Value> {
    match conf {
        Value::Object(map) if map.contains_key("_meta") => {
            let mut map = map.clone();
            map.remove("_meta");
            std::borrow::Cow::Owned(Value::Object(map))
        }
        other => std::borrow::Cow::Borrowed(other),
    }
}

/// Checks one plugin configuration, `_meta` included. No side effects.
pub fn check(name: &str, conf: &Value, target: SchemaType) -> Result<(), PluginError> {
    let spec = find(name).ok_or_else(|| PluginError::Unknown(name.to_string()))?;
    let invalid = |reason| PluginError::Invalid {
        name: name.to_string(),
        reason,
    };
    if !conf.is_object() {
        return Err(invalid(format!(
            "wrong type: expected object, got {}",
            crate::schema::type_name(conf)
        )));
    }
    if let Some(meta) = conf.get("_meta") {
        meta_schema()
            .validate(meta)
            .map_err(|e| invalid(format!("property \"_meta\" validation failed: {e}")))?;
        if let Some(filter) = meta.get("filter") {
            expr::compile(filter)
                .map_err(|e| invalid(format!("failed to validate the 'vars' expression: {e}")))?;
        }
    }
    spec.check(&without_meta(conf), target).map_err(invalid)
}

/// Everything compiling a `plugins` object needs besides the object.
pub struct CompileEnv<'a> {
    /// `plugin_metadata` by plugin name.
    pub metadata: &'a dyn Fn(&str) -> Option<&'a Value>,
    /// `plugin_attr` from config.yaml.
    pub attrs: Option<&'a Map<String, Value>>,
    pub state: &'a StateCache,
    /// Whether `upstreams/{id}` exists (traffic-split); `None`: unknown.
    pub upstream_exists: Option<&'a dyn Fn(&str) -> bool>,
}

/// Compiles a `plugins` object into a set: checks each plugin, skips those
/// with `_meta.disable`, applies `_meta.priority`, `_meta.filter` and
/// `_meta.error_response`. `skip_auth` leaves auth plugins out (a consumer's
/// own auth configuration is a credential, not a plugin to run).
pub fn compile_set<'a>(
    confs: impl IntoIterator<Item = (&'a String, &'a Value)>,
    owner: &str,
    env: &CompileEnv<'_>,
    skip_auth: bool,
) -> Result<PluginSet, PluginError> {
    let mut entries = Vec::new();
    for (name, conf) in confs {
        let spec = find(name).ok_or_else(|| PluginError::Unknown(name.clone()))?;
        if skip_auth && spec.kind() == PluginKind::Auth {
            continue;
        }
        let meta = conf.get("_meta");
        if meta
            .and_then(|m| m.get("disable"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            continue;
        }
        let invalid = |reason| PluginError::Invalid {
            name: name.clone(),
            reason,
        };
        let plain = without_meta(conf);
        let cx = CompileCx {
            owner,
            metadata: (env.metadata)(spec.name()),
            attr: env.attrs.and_then(|a| a.get(spec.name())),
            state: env.state,
            conf: &plain,
            name: spec.name(),
            upstream_exists: env.upstream_exists,
        };
        let plugin = spec.compile(&plain, &cx).map_err(invalid)?;
        let priority = meta
            .and_then(|m| m.get("priority"))
            .and_then(Value::as_i64)
            .and_then(|p| i32::try_from(p).ok())
            .unwrap_or_else(|| spec.priority());
        let mut entry = Entry::new(spec.name(), priority, plugin);
        if let Some(filter) = meta.and_then(|m| m.get("filter")) {
            let compiled = expr::compile(filter)
                .map_err(|e| invalid(format!("failed to validate the 'vars' expression: {e}")))?;
            entry.filter = Some(Arc::new(compiled));
        }
        entry.error_response = meta
            .and_then(|m| m.get("error_response"))
            .and_then(ErrorResponse::from_value);
        entries.push(entry);
    }
    Ok(PluginSet::new(entries))
}

/// Lazily built schema storage shared by plugin modules.
pub(crate) fn cached(cell: &'static OnceLock<Schema>, build: fn() -> Schema) -> &'static Schema {
    cell.get_or_init(build)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_sorted_by_priority() {
        let all = by_priority();
        for pair in all.windows(2) {
            assert!(pair[0].priority() >= pair[1].priority());
            assert_ne!(pair[0].name(), pair[1].name());
        }
        let mut names: Vec<&str> = PLUGINS.iter().map(|p| p.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), PLUGINS.len());
    }

    #[test]
    fn meta_is_checked() {
        let err = check(
            "ip-restriction",
            &serde_json::json!({"whitelist": ["1.1.1.1"], "_meta": {"disable": "yes"}}),
            SchemaType::Route,
        )
        .unwrap_err();
        assert!(err
            .to_string()
            .contains("property \"_meta\" validation failed"));
        assert!(check(
            "ip-restriction",
            &serde_json::json!({"whitelist": ["1.1.1.1"], "_meta": {"disable": true, "priority": 1}}),
            SchemaType::Route,
        )
        .is_ok());
        assert_eq!(
            check("nope", &serde_json::json!({}), SchemaType::Route).unwrap_err(),
            PluginError::Unknown("nope".into())
        );
    }
}
