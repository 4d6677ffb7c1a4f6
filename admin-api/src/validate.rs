//! Validation of Admin API objects, with APISIX's schemas and messages.
//!
//! Each check returns the message APISIX gives for the same input. Schema
//! failures carry the `invalid configuration: ` prefix; the checks APISIX runs
//! after the schema (`only one of host or hosts is allowed`, plugin checks,
//! references) do not.

use std::sync::OnceLock;

use serde_json::Value;

use plugins::schema::Schema;

use crate::expr;
use crate::resource::Kind;

pub mod ssl;
mod upstream;

use upstream::build_upstream_schema;
pub use upstream::check_upstream;

/// Longest `name`/`desc` APISIX accepts.
pub const MAX_NAME_LEN: usize = 256;
/// HTTP methods a route may list.
pub const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "PURGE",
];
const ID_PATTERN: &str = "^[a-zA-Z0-9-_.]+$";
const HOST_PATTERN: &str = "^\\*?[0-9a-zA-Z-._\\[\\]:]+$";

fn is_id_text(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn is_host(s: &str) -> bool {
    let body = s.strip_prefix('*').unwrap_or(s);
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b))
}

fn id_schema() -> Schema {
    Schema::AnyOf(vec![
        Schema::string()
            .min(1)
            .max(64)
            .pattern(ID_PATTERN, is_id_text)
            .done(),
        Schema::integer().min(1.0).int(),
    ])
}

fn host_schema() -> Schema {
    Schema::string().pattern(HOST_PATTERN, is_host).done()
}

fn ip_schema() -> Schema {
    Schema::Custom(
        |v| match v.as_str().map(plugins::cidr::parse_entry) {
            Some(Ok(_)) => Ok(()),
            _ => Err("object matches none of the required".to_string()),
        },
        || serde_json::json!({"type": "string", "anyOf": [{"title": "IPv4"}, {"title": "IPv4/CIDR"}, {"title": "IPv6"}, {"title": "IPv6/CIDR"}]}),
    )
}

fn timeout_schema() -> Schema {
    let secs = || Schema::integer().greater_than(0.0).number();
    Schema::object()
        .prop("connect", secs())
        .prop("send", secs())
        .prop("read", secs())
        .required(&["connect", "send", "read"])
        .done()
}

fn labels_schema() -> Schema {
    Schema::object()
        .additional(Schema::string().min(1).max(256).done())
        .done()
}

fn common(o: plugins::schema::ObjectRule) -> plugins::schema::ObjectRule {
    o.prop("id", id_schema())
        .prop("name", Schema::string().min(1).max(MAX_NAME_LEN).done())
        .prop("desc", Schema::string().max(MAX_NAME_LEN).done())
        .prop("labels", labels_schema())
        .prop("create_time", Schema::integer().int())
        .prop("update_time", Schema::integer().int())
}

fn nodes_schema() -> Schema {
    let weight = || Schema::integer().min(0.0).int();
    let hash = Schema::object().additional(weight()).done();
    let node = Schema::object()
        .prop("host", host_schema())
        .prop("port", Schema::integer().min(1.0).max(65535.0).int())
        .prop("weight", weight())
        .prop("priority", Schema::integer().int())
        .prop("metadata", Schema::object().done())
        .required(&["host", "weight"])
        .done();
    Schema::AnyOf(vec![hash, Schema::array(node).done()])
}

fn plugins_schema() -> Schema {
    Schema::object().done()
}

fn build_route_schema() -> Schema {
    let path = || Schema::string().min(1).max(4096).done();
    common(Schema::object())
        .prop("uri", path())
        .prop("uris", Schema::array(path()).min(1).unique().done())
        .prop("priority", Schema::integer().int())
        .prop(
            "methods",
            Schema::array(Schema::string().enumerated(METHODS).done())
                .unique()
                .done(),
        )
        .prop("host", host_schema())
        .prop("hosts", Schema::array(host_schema()).min(1).unique().done())
        .prop("remote_addr", ip_schema())
        .prop(
            "remote_addrs",
            Schema::array(ip_schema()).min(1).unique().done(),
        )
        .prop("vars", Schema::array(Schema::Any).done())
        .prop("filter_func", Schema::string().min(10).done())
        .prop("script", Schema::string().min(10).max(102400).done())
        .prop("plugins", plugins_schema())
        .prop("plugin_config_id", id_schema())
        .prop("upstream", upstream_schema().clone())
        .prop("upstream_id", id_schema())
        .prop("service_id", id_schema())
        .prop(
            "service_protocol",
            Schema::string().enumerated(&["grpc", "http"]).done(),
        )
        .prop("enable_websocket", Schema::Boolean)
        .prop("timeout", timeout_schema())
        .prop("status", Schema::integer().enumerated(&[1, 0]).int())
        .no_additional()
        .one_of_required(&[&["uri"], &["uris"]])
        .any_of_required(&[
            &["plugins"],
            &["upstream"],
            &["upstream_id"],
            &["service_id"],
            &["script"],
            &["plugin_config_id"],
        ])
        .done()
}

fn build_service_schema() -> Schema {
    common(Schema::object())
        .prop("plugins", plugins_schema())
        .prop("upstream", upstream_schema().clone())
        .prop("upstream_id", id_schema())
        .prop("script", Schema::string().min(10).max(102400).done())
        .prop("enable_websocket", Schema::Boolean)
        .prop("hosts", Schema::array(host_schema()).min(1).unique().done())
        .no_additional()
        .done()
}

fn build_consumer_schema() -> Schema {
    Schema::object()
        .prop("id", id_schema())
        .prop(
            "username",
            Schema::string()
                .min(1)
                .max(100)
                .pattern("^[a-zA-Z0-9_\\-]+$", is_username)
                .done(),
        )
        .prop("desc", Schema::string().max(MAX_NAME_LEN).done())
        .prop("labels", labels_schema())
        .prop("create_time", Schema::integer().int())
        .prop("update_time", Schema::integer().int())
        .prop("group_id", id_schema())
        .prop("plugins", plugins_schema())
        .required(&["username"])
        .no_additional()
        .done()
}

fn is_username(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn build_credential_schema() -> Schema {
    common(Schema::object())
        .prop("plugins", Schema::object().max_properties(1).done())
        .no_additional()
        .done()
}

/// plugin_configs and consumer_groups: `id` and `plugins` required.
fn build_plugin_holder_schema() -> Schema {
    common(Schema::object())
        .prop("plugins", plugins_schema())
        .required(&["id", "plugins"])
        .no_additional()
        .done()
}

fn build_global_rule_schema() -> Schema {
    Schema::object()
        .prop("id", id_schema())
        .prop("plugins", plugins_schema())
        .prop("create_time", Schema::integer().int())
        .prop("update_time", Schema::integer().int())
        .required(&["id", "plugins"])
        .no_additional()
        .done()
}

macro_rules! cached_schema {
    ($name:ident, $build:ident) => {
        pub fn $name() -> &'static Schema {
            static CELL: OnceLock<Schema> = OnceLock::new();
            CELL.get_or_init($build)
        }
    };
}

cached_schema!(upstream_schema, build_upstream_schema);
cached_schema!(route_schema, build_route_schema);
cached_schema!(service_schema, build_service_schema);
cached_schema!(global_rule_schema, build_global_rule_schema);
cached_schema!(consumer_schema, build_consumer_schema);
cached_schema!(credential_schema, build_credential_schema);
cached_schema!(plugin_holder_schema, build_plugin_holder_schema);

fn any_object() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    CELL.get_or_init(|| Schema::object().done())
}

/// The schema of one kind of object (plugin_metadata: each plugin has its
/// own, see [`check`]).
pub fn schema_of(kind: Kind) -> &'static Schema {
    match kind {
        Kind::Routes => route_schema(),
        Kind::Services => service_schema(),
        Kind::Upstreams => upstream_schema(),
        Kind::GlobalRules => global_rule_schema(),
        Kind::Consumers => consumer_schema(),
        Kind::Credentials => credential_schema(),
        Kind::ConsumerGroups | Kind::PluginConfigs => plugin_holder_schema(),
        Kind::PluginMetadata => any_object(),
        Kind::Ssls => ssl::schema(),
    }
}

/// Looks up other objects while checking references.
pub trait Lookup {
    /// Whether `/apisix/{kind}/{id}` exists.
    fn exists(&self, kind: Kind, id: &str) -> bool;

    /// The object `/apisix/{kind}/{id}` as stored, for checks that look
    /// inside it: an upstream's `tls.client_cert_id` must name an ssl
    /// object of `type: client`. The default knows no contents, and then
    /// such checks only see that the object [exists](Self::exists);
    /// implementations that hold the objects should return them.
    fn get(&self, _kind: Kind, _id: &str) -> Option<Value> {
        None
    }
}

/// Checks an object whose `id` has already been set; `Err` is the
/// `error_msg` of a 400.
pub fn check(kind: Kind, conf: &Value, lookup: &dyn Lookup) -> Result<(), String> {
    if kind == Kind::PluginMetadata {
        return check_plugin_metadata(conf);
    }
    schema_of(kind)
        .validate(conf)
        .map_err(|e| format!("invalid configuration: {e}"))?;
    match kind {
        Kind::Routes => check_route(conf, lookup),
        Kind::Services => check_service(conf, lookup),
        Kind::Upstreams => check_upstream(conf, lookup),
        Kind::GlobalRules | Kind::PluginConfigs | Kind::ConsumerGroups => {
            check_plugins(conf.get("plugins"))
        }
        Kind::Consumers => {
            check_consumer_plugins(conf.get("plugins"))?;
            check_reference(conf, "group_id", Kind::ConsumerGroups, lookup)
        }
        Kind::Credentials => {
            check_consumer_plugins(conf.get("plugins"))?;
            let names = conf.get("plugins").and_then(Value::as_object);
            for name in names.into_iter().flat_map(|m| m.keys()) {
                if plugins::find(name).map(|p| p.kind()) != Some(plugins::PluginKind::Auth) {
                    return Err("only supports auth type plugins in consumer credential".into());
                }
            }
            Ok(())
        }
        Kind::PluginMetadata => Ok(()),
        Kind::Ssls => ssl::check(conf),
    }
}

/// `plugin_metadata/{name}`: the body (its `id` is the plugin name) against
/// the plugin's metadata schema.
fn check_plugin_metadata(conf: &Value) -> Result<(), String> {
    let name = conf
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| "missing plugin name".to_string())?;
    let spec = plugins::find(name).ok_or_else(|| "invalid plugin name".to_string())?;
    let Value::Object(map) = conf else {
        return Err("invalid configuration: wrong type: expected object".into());
    };
    let mut body = map.clone();
    for field in ["id", "create_time", "update_time"] {
        body.remove(field);
    }
    // A plugin without a metadata schema takes any object (APISIX injects
    // an empty one).
    if spec.metadata_schema().is_none() {
        return Ok(());
    }
    spec.check(&Value::Object(body), plugins::SchemaType::Metadata)
        .map_err(|e| format!("invalid configuration: {e}"))
}

/// A consumer's or credential's plugins, against the consumer schemas.
fn check_consumer_plugins(plugins_conf: Option<&Value>) -> Result<(), String> {
    let Some(Value::Object(map)) = plugins_conf else {
        return Ok(());
    };
    for (name, conf) in map {
        plugins::registry::check(name, conf, plugins::SchemaType::Consumer)
            .map_err(|e| format!("invalid plugins configuration: {e}"))?;
    }
    Ok(())
}

fn check_route(conf: &Value, lookup: &dyn Lookup) -> Result<(), String> {
    if conf.get("host").is_some() && conf.get("hosts").is_some() {
        return Err("only one of host or hosts is allowed".into());
    }
    if conf.get("remote_addr").is_some() && conf.get("remote_addrs").is_some() {
        return Err("only one of remote_addr or remote_addrs is allowed".into());
    }
    if let Some(up) = conf.get("upstream") {
        check_upstream(up, lookup)?;
    }
    check_reference(conf, "upstream_id", Kind::Upstreams, lookup)?;
    check_reference(conf, "service_id", Kind::Services, lookup)?;
    check_reference(conf, "plugin_config_id", Kind::PluginConfigs, lookup)?;
    check_plugins(conf.get("plugins"))?;
    if let Some(vars) = conf.get("vars") {
        expr::compile(vars)
            .map_err(|e| format!("failed to validate the 'vars' expression: {e}"))?;
    }
    Ok(())
}

fn check_service(conf: &Value, lookup: &dyn Lookup) -> Result<(), String> {
    if let Some(up) = conf.get("upstream") {
        check_upstream(up, lookup)?;
    }
    check_reference(conf, "upstream_id", Kind::Upstreams, lookup)?;
    check_plugins(conf.get("plugins"))
}

fn check_reference(
    conf: &Value,
    field: &str,
    kind: Kind,
    lookup: &dyn Lookup,
) -> Result<(), String> {
    let Some(id) = conf.get(field).and_then(crate::model::id_text) else {
        return Ok(());
    };
    if lookup.exists(kind, &id) {
        Ok(())
    } else {
        Err(format!(
            "failed to fetch {label} info by {label} id [{id}], response code: 404",
            label = kind.label()
        ))
    }
}

/// Checks every plugin of a `plugins` object.
pub fn check_plugins(plugins_conf: Option<&Value>) -> Result<(), String> {
    let Some(Value::Object(map)) = plugins_conf else {
        return Ok(());
    };
    for (name, conf) in map {
        plugins::registry::check(name, conf, plugins::SchemaType::Route)
            .map_err(|e| e.to_string())?;
        if name == plugins::traffic_split::NAME {
            check_split_upstreams(conf)?;
        }
    }
    Ok(())
}

/// traffic-split's inline upstreams against the upstream schema, reported
/// where APISIX's schema (which embeds it) reports them.
fn check_split_upstreams(conf: &Value) -> Result<(), String> {
    let rules = conf.get("rules").and_then(Value::as_array);
    for (r, rule) in rules.into_iter().flatten().enumerate() {
        let entries = rule.get("weighted_upstreams").and_then(Value::as_array);
        for (w, entry) in entries.into_iter().flatten().enumerate() {
            let Some(up) = entry.get("upstream") else {
                continue;
            };
            upstream_schema().validate(up).map_err(|e| {
                plugins::PluginError::Invalid {
                    name: plugins::traffic_split::NAME.into(),
                    reason: format!(
                        "property \"rules\" validation failed: failed to validate item {}: \
                         property \"weighted_upstreams\" validation failed: failed to validate item {}: \
                         property \"upstream\" validation failed: {e}",
                        r + 1,
                        w + 1
                    ),
                }
                .to_string()
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
