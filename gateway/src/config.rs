//! `conf/config.yaml`, read with APISIX's key paths.
//!
//! A real APISIX config.yaml starts ferrogate: keys it does not use yet are
//! accepted and listed once in the log. A wrong type or value in a key it does
//! use is an error at start that names the key. `${{VAR}}` and
//! `${{VAR:=default}}` in string values are replaced from the environment,
//! as APISIX does; a variable that is not set and has no default is an error.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use plugins::cidr::IpSet;

/// Data plane port when `apisix.node_listen` is absent.
pub const DEFAULT_NODE_PORT: u16 = 9080;
/// Admin API port when `deployment.admin.admin_listen.port` is absent.
pub const DEFAULT_ADMIN_PORT: u16 = 9180;
/// Admin API address when `deployment.admin.admin_listen.ip` is absent.
/// APISIX listens on 0.0.0.0; ferrogate keeps the Admin API local unless told.
pub const DEFAULT_ADMIN_IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// `deployment.admin.allow_admin` default.
pub const DEFAULT_ALLOW_ADMIN: &str = "127.0.0.0/24";
/// APISIX's old well-known default admin key; ferrogate refuses to run with it.
pub const PUBLIC_DEFAULT_KEY: &str = "edd1c9f034335f136f87ad84b625c8f1";
/// APISIX's well-known example viewer key; refused as well.
pub const PUBLIC_VIEWER_KEY: &str = "4054f7cf07e344346cd3f287985e76a2";
/// `nginx_config.worker_shutdown_timeout` default.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(240);
/// `nginx_config.http.client_header_timeout` default.
pub const DEFAULT_CLIENT_HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// HTTPS port when `apisix.ssl.listen` is absent.
pub const DEFAULT_SSL_PORT: u16 = 9443;
/// `apisix.ssl.ssl_protocols` default.
pub const DEFAULT_SSL_PROTOCOLS: &str = "TLSv1.2 TLSv1.3";
/// `nginx_config.http.keepalive_timeout` default.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Key paths this version reads. Everything else is listed as unused.
const USED_KEYS: &[&str] = &[
    "apisix.node_listen",
    "plugin_attr",
    "plugins",
    "apisix.enable_admin",
    "apisix.enable_server_tokens",
    "apisix.show_upstream_status_in_response_header",
    "deployment.role",
    "deployment.role_traditional.config_provider",
    "deployment.role_data_plane.config_provider",
    "deployment.role_control_plane.config_provider",
    "deployment.admin.admin_key",
    "deployment.admin.admin_key_required",
    "deployment.admin.allow_admin",
    "deployment.admin.admin_listen",
    "nginx_config.http.real_ip_from",
    "nginx_config.http.real_ip_header",
    "nginx_config.http.real_ip_recursive",
    "nginx_config.http.client_header_timeout",
    "nginx_config.http.keepalive_timeout",
    "nginx_config.worker_shutdown_timeout",
    "nginx_config.worker_processes",
    "nginx_config.http.client_max_body_size",
    "nginx_config.http.client_body_timeout",
    "nginx_config.http.enable_access_log",
    "nginx_config.http.access_log",
    "nginx_config.http.access_log_format",
    "nginx_config.http.access_log_format_escape",
    "nginx_config.http.access_log_buffer",
    "nginx_config.event.worker_connections",
    "apisix.ssl.ssl_trusted_certificate",
    "apisix.ssl.enable",
    "apisix.ssl.listen",
    "apisix.ssl.ssl_protocols",
    "apisix.ssl.ssl_ciphers",
    "apisix.ssl.ssl_session_tickets",
    "apisix.ssl.fallback_sni",
    "nginx_config.http.send_timeout",
    "apisix.trusted_addresses",
];

/// A config error, naming the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid YAML: {message}")]
    Yaml { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
}

fn key_err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.to_string(),
        message: message.into(),
    }
}

/// Where the stored configuration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provider {
    /// The embedded database in the data directory, edited by the Admin API.
    Embedded,
    /// etcd, shared with other gateways (APISIX's `config_provider: etcd`).
    Etcd(Box<EtcdConf>),
    /// `conf/apisix.yaml`, re-read when it changes; no Admin API.
    Yaml(PathBuf),
}

/// One admin key from `deployment.admin.admin_key`.
#[derive(Clone)]
pub struct KeyConf {
    pub name: String,
    pub key: String,
    pub role: admin_api::Role,
}

impl std::fmt::Debug for KeyConf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyConf")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Trusted-proxy settings (nginx's realip module).
#[derive(Debug, Clone)]
pub struct RealIp {
    /// `real_ip_from`: peers whose header is believed.
    pub trusted: IpSet,
    /// The same, as prefixes (the in-kernel deny list leaves these out).
    pub trusted_nets: Vec<ipnet::IpNet>,
    /// `real_ip_header`, lower-cased. Default `x-real-ip`.
    pub header: String,
    /// `real_ip_recursive`. Default off.
    pub recursive: bool,
}

/// The HTTPS listener (`apisix.ssl`).
#[derive(Debug, Clone, PartialEq)]
pub struct SslListen {
    /// `apisix.ssl.listen`; default `0.0.0.0:9443`.
    pub listen: Vec<SocketAddr>,
    /// Whether `listen` was written in the file. The default port is taken
    /// when free; a port the file names must be bound or start fails.
    pub listen_given: bool,
    /// `ssl_protocols`, e.g. `["TLSv1.2", "TLSv1.3"]` (default).
    pub protocols: Vec<String>,
    /// `ssl_ciphers`: OpenSSL cipher names, `:`-separated; `None`: the
    /// provider's defaults.
    pub ciphers: Option<String>,
    /// `ssl_session_tickets` (default false): resumption then uses the
    /// server's session cache only.
    pub session_tickets: bool,
    /// `fallback_sni`: the name assumed when a client sends no SNI.
    pub fallback_sni: Option<String>,
}

/// Everything ferrogate takes from config.yaml.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Directory relative paths are resolved against (`PATH` of `PATH/conf/config.yaml`).
    pub prefix: PathBuf,
    pub data_dir: PathBuf,
    pub node_listen: Vec<SocketAddr>,
    /// The `node_listen` entries with `transparent: true`: their sockets
    /// get `IP_TRANSPARENT` (TProxy; see [`crate::tproxy`]).
    pub transparent_listen: Vec<SocketAddr>,
    pub enable_admin: bool,
    pub admin_listen: SocketAddr,
    pub admin_keys: Vec<KeyConf>,
    pub admin_key_required: bool,
    /// `None`: allow every address.
    pub allow_admin: Option<IpSet>,
    pub provider: Provider,
    pub server_tokens: bool,
    pub show_upstream_status: bool,
    pub real_ip: Option<RealIp>,
    pub client_header_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub shutdown_grace: Duration,
    /// `nginx_config.worker_processes`: threads serving requests; `None`
    /// for `auto` (one per CPU).
    pub worker_threads: Option<usize>,
    /// `nginx_config.http.client_max_body_size`; `None`: unlimited (0).
    pub client_max_body_size: Option<u64>,
    /// `nginx_config.http.client_body_timeout`.
    pub client_body_timeout: Duration,
    /// `nginx_config.http.send_timeout`: a client that reads nothing for
    /// this long while the gateway writes to it is disconnected.
    pub send_timeout: Duration,
    /// `nginx_config.event.worker_connections`: client connections at once.
    pub max_connections: usize,
    /// `apisix.trusted_addresses`: peers whose X-Forwarded-Proto/Host/Port
    /// are passed on; `None`: always set by the gateway.
    pub trusted_addresses: Option<IpSet>,
    /// `apisix.ssl.ssl_trusted_certificate`: extra CA certificates (PEM) for
    /// `https` upstreams, besides the system store (`system`, the default).
    pub ssl_trusted_certificate: Option<PathBuf>,
    /// `apisix.ssl`: the HTTPS listener; `None` when `enable` is false.
    pub ssl: Option<SslListen>,
    /// `plugin_attr`: per-plugin settings from config.yaml, given to each
    /// plugin when it is compiled.
    pub plugin_attr: serde_json::Map<String, Value>,
    /// `plugin_attr.ip-restriction.xdp` when enabled: the in-kernel deny
    /// list (see [`crate::xdp`]).
    pub xdp: Option<crate::xdp::XdpConf>,
    /// `plugins`: the plugins this node runs; `None` when the file has no
    /// list (all of them). Decides whether the Prometheus export server runs.
    pub enabled_plugins: Option<Vec<String>>,
    /// `nginx_config.http.enable_access_log`, `access_log`,
    /// `access_log_format`, `access_log_format_escape`, `access_log_buffer`.
    pub access_log: crate::access_log::AccessLogConf,
    /// Keys present in the file that this version does not use.
    pub unused_keys: Vec<String>,
}

impl GatewayConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let prefix = prefix_of(path);
        Self::from_yaml(&text, path, prefix)
    }

    /// Parses config text; `path` only names the file in errors.
    pub fn from_yaml(text: &str, path: &Path, prefix: PathBuf) -> Result<Self, ConfigError> {
        Self::from_yaml_with_env(text, path, prefix, &|name| std::env::var(name).ok())
    }

    /// Like [`Self::from_yaml`], reading `${{VAR}}` values through `env`.
    pub fn from_yaml_with_env(
        text: &str,
        path: &Path,
        prefix: PathBuf,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut doc: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            crate::yaml::parse(text).map_err(|e| ConfigError::Yaml {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?
        };
        substitute_env(&mut doc, "", env)?;
        if !(doc.is_object() || doc.is_null()) {
            return Err(key_err("(root)", "expected a mapping"));
        }
        Self::from_value(&doc, prefix)
    }

    fn from_value(doc: &Value, prefix: PathBuf) -> Result<Self, ConfigError> {
        let get = |path: &str| lookup(doc, path);
        let mut transparent_listen = Vec::new();
        let node_listen = match get("apisix.node_listen") {
            None => vec![SocketAddr::from(([0, 0, 0, 0], DEFAULT_NODE_PORT))],
            Some(v) => {
                let flagged = parse_listen_flagged("apisix.node_listen", v)?;
                transparent_listen = flagged
                    .iter()
                    .filter(|(_, t)| *t)
                    .map(|(a, _)| *a)
                    .collect();
                flagged.into_iter().map(|(a, _)| a).collect()
            }
        };
        let admin_listen = {
            let ip = match get("deployment.admin.admin_listen.ip") {
                None => DEFAULT_ADMIN_IP,
                Some(v) => v.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
                    key_err("deployment.admin.admin_listen.ip", "expected an IP address")
                })?,
            };
            let port = match get("deployment.admin.admin_listen.port") {
                None => DEFAULT_ADMIN_PORT,
                Some(v) => port_of("deployment.admin.admin_listen.port", v)?,
            };
            SocketAddr::new(ip, port)
        };
        let admin_keys = match get("deployment.admin.admin_key") {
            None | Some(Value::Null) => vec![KeyConf {
                name: "admin".into(),
                key: String::new(),
                role: admin_api::Role::Admin,
            }],
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| parse_key(i, item))
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(key_err(
                    "deployment.admin.admin_key",
                    "expected a list of {name, key, role}",
                ))
            }
        };
        if admin_keys
            .iter()
            .any(|k| k.key == PUBLIC_DEFAULT_KEY || k.key == PUBLIC_VIEWER_KEY)
        {
            return Err(key_err(
                "deployment.admin.admin_key",
                "this is one of APISIX's published example keys (public default key); anyone can guess it. Set your own key, or leave it empty to have one generated",
            ));
        }
        let allow_admin = match get("deployment.admin.allow_admin") {
            None => Some(
                IpSet::from_entries(&[DEFAULT_ALLOW_ADMIN])
                    .map_err(|e| key_err("deployment.admin.allow_admin", e.to_string()))?,
            ),
            Some(Value::Null) => None,
            Some(v) => Some(ip_list("deployment.admin.allow_admin", v)?),
        };
        let role = opt_str(doc, "deployment.role")?.unwrap_or_else(|| "traditional".into());
        let provider = match role.as_str() {
            "traditional" | "control_plane" => {
                let key = format!("deployment.role_{role}.config_provider");
                match opt_str(doc, &key)?.as_deref() {
                    // Without a provider (or `embedded`) one node keeps its
                    // configuration in its own database.
                    None | Some("embedded") => Provider::Embedded,
                    Some("etcd") => Provider::Etcd(Box::new(EtcdConf::parse(doc, &prefix)?)),
                    Some(other) => {
                        return Err(key_err(
                            &key,
                            format!("`{other}` is not supported; use `etcd` or `embedded`"),
                        ))
                    }
                }
            }
            "data_plane" => {
                match opt_str(doc, "deployment.role_data_plane.config_provider")?.as_deref() {
                    Some("yaml") | None => Provider::Yaml(prefix.join("conf").join("apisix.yaml")),
                    Some("etcd") => Provider::Etcd(Box::new(EtcdConf::parse(doc, &prefix)?)),
                    Some(other) => {
                        return Err(key_err(
                            "deployment.role_data_plane.config_provider",
                            format!("`{other}` is not supported; use `yaml` or `etcd`"),
                        ))
                    }
                }
            }
            other => {
                return Err(key_err(
                    "deployment.role",
                    format!("unknown role `{other}`"),
                ))
            }
        };
        let real_ip = match get("nginx_config.http.real_ip_from") {
            None => None,
            Some(v) => {
                let entries: Vec<String> = match v {
                    Value::Array(a) => a
                        .iter()
                        .map(|x| x.as_str().map(str::to_string))
                        .collect::<Option<_>>(),
                    Value::String(s) => Some(vec![s.clone()]),
                    _ => None,
                }
                .ok_or_else(|| {
                    key_err(
                        "nginx_config.http.real_ip_from",
                        "expected a list of addresses or CIDRs",
                    )
                })?;
                // "unix:" trusts unix-socket peers; the gateway has none.
                let ips: Vec<&String> =
                    entries.iter().filter(|e| !e.starts_with("unix:")).collect();
                let trusted = IpSet::from_entries(&ips)
                    .map_err(|e| key_err("nginx_config.http.real_ip_from", e.to_string()))?;
                let header = opt_str(doc, "nginx_config.http.real_ip_header")?
                    .unwrap_or_else(|| "X-Real-IP".into())
                    .to_ascii_lowercase();
                let recursive = match get("nginx_config.http.real_ip_recursive") {
                    None => false,
                    Some(Value::String(s)) if s == "on" => true,
                    Some(Value::String(s)) if s == "off" => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => {
                        return Err(key_err(
                            "nginx_config.http.real_ip_recursive",
                            "expected on or off",
                        ))
                    }
                };
                let trusted_nets = ips
                    .iter()
                    .filter_map(|e| crate::xdp::parse_entry(e))
                    .collect();
                Some(RealIp {
                    trusted,
                    trusted_nets,
                    header,
                    recursive,
                })
            }
        };
        let unused_keys = unused_keys(doc);
        let ssl_trusted_certificate =
            match opt_str(doc, "apisix.ssl.ssl_trusted_certificate")?.as_deref() {
                None | Some("system") => None,
                Some(path) => {
                    let p = PathBuf::from(path);
                    Some(if p.is_absolute() { p } else { prefix.join(p) })
                }
            };

        let plugin_attr = match get("plugin_attr") {
            None | Some(Value::Null) => serde_json::Map::new(),
            Some(Value::Object(map)) => map.clone(),
            Some(_) => return Err(key_err("plugin_attr", "expected a mapping")),
        };
        let xdp = crate::xdp::XdpConf::from_plugin_attr(&plugin_attr)
            .map_err(|e| key_err("plugin_attr.ip-restriction.xdp", e))?;
        let enabled_plugins = match get("plugins") {
            None | Some(Value::Null) => None,
            Some(Value::Array(list)) => Some(
                list.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect(),
            ),
            Some(_) => return Err(key_err("plugins", "expected a list of plugin names")),
        };
        let access_log = access_log_conf(doc, &prefix)?;
        Ok(GatewayConfig {
            plugin_attr,
            xdp,
            enabled_plugins,
            access_log,
            data_dir: prefix.join("data"),
            prefix,
            node_listen,
            transparent_listen,
            // A data plane (APISIX's `role: data_plane`) serves no Admin API.
            enable_admin: opt_bool(doc, "apisix.enable_admin")?.unwrap_or(true)
                && role != "data_plane",
            admin_listen,
            admin_keys,
            admin_key_required: opt_bool(doc, "deployment.admin.admin_key_required")?
                .unwrap_or(true),
            allow_admin,
            provider,
            server_tokens: opt_bool(doc, "apisix.enable_server_tokens")?.unwrap_or(true),
            show_upstream_status: opt_bool(doc, "apisix.show_upstream_status_in_response_header")?
                .unwrap_or(false),
            real_ip,
            client_header_timeout: opt_duration(doc, "nginx_config.http.client_header_timeout")?
                .unwrap_or(DEFAULT_CLIENT_HEADER_TIMEOUT),
            keepalive_timeout: opt_duration(doc, "nginx_config.http.keepalive_timeout")?
                .unwrap_or(DEFAULT_KEEPALIVE_TIMEOUT),
            shutdown_grace: opt_duration(doc, "nginx_config.worker_shutdown_timeout")?
                .unwrap_or(DEFAULT_SHUTDOWN_GRACE),
            worker_threads: match get("nginx_config.worker_processes") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if s == "auto" => None,
                Some(v) => Some(
                    v.as_u64()
                        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                        .filter(|n| (1..=1024).contains(n))
                        .map(|n| n as usize)
                        .ok_or_else(|| {
                            key_err(
                                "nginx_config.worker_processes",
                                "expected auto or a number 1..1024",
                            )
                        })?,
                ),
            },
            client_max_body_size: match get("nginx_config.http.client_max_body_size") {
                None | Some(Value::Null) => None,
                Some(v) => {
                    let n = match v {
                        Value::Number(n) => n.as_u64(),
                        Value::String(s) => crate::limits::parse_size(s),
                        _ => None,
                    }
                    .ok_or_else(|| {
                        key_err(
                            "nginx_config.http.client_max_body_size",
                            "expected a size such as 0, 8k, 10m",
                        )
                    })?;
                    (n > 0).then_some(n)
                }
            },
            send_timeout: opt_duration(doc, "nginx_config.http.send_timeout")?
                .unwrap_or(crate::limits::DEFAULT_SEND_TIMEOUT),
            client_body_timeout: opt_duration(doc, "nginx_config.http.client_body_timeout")?
                .unwrap_or(crate::limits::DEFAULT_CLIENT_BODY_TIMEOUT),
            max_connections: match get("nginx_config.event.worker_connections") {
                None | Some(Value::Null) => crate::limits::DEFAULT_MAX_CONNECTIONS,
                Some(v) => v
                    .as_u64()
                    .filter(|n| *n >= 1)
                    .map(|n| n as usize)
                    .ok_or_else(|| {
                        key_err(
                            "nginx_config.event.worker_connections",
                            "expected a positive number",
                        )
                    })?,
            },
            ssl_trusted_certificate,
            ssl: ssl_listen(doc)?,
            trusted_addresses: match get("apisix.trusted_addresses") {
                None | Some(Value::Null) => None,
                Some(v) => Some(ip_list("apisix.trusted_addresses", v)?),
            },
            unused_keys,
        })
    }
}

/// `apisix.ssl`: enabled unless `enable: false`, as in APISIX.
fn ssl_listen(doc: &Value) -> Result<Option<SslListen>, ConfigError> {
    if opt_bool(doc, "apisix.ssl.enable")? == Some(false) {
        return Ok(None);
    }
    const LISTEN: &str = "apisix.ssl.listen";
    let (listen, listen_given) = match lookup(doc, LISTEN) {
        None | Some(Value::Null) => (
            vec![SocketAddr::from(([0, 0, 0, 0], DEFAULT_SSL_PORT))],
            false,
        ),
        Some(v) => {
            if let Value::Array(items) = v {
                for item in items {
                    if item.get("enable_http3").and_then(Value::as_bool) == Some(true) {
                        tracing::warn!(
                            "apisix.ssl.listen: enable_http3 is not supported; HTTP/3 stays off"
                        );
                    }
                }
            }
            let with_default = match v {
                Value::Array(items) => Value::Array(
                    items
                        .iter()
                        .map(|item| match item {
                            Value::Object(map) if !map.contains_key("port") => {
                                let mut map = map.clone();
                                map.insert("port".into(), DEFAULT_SSL_PORT.into());
                                Value::Object(map)
                            }
                            other => other.clone(),
                        })
                        .collect(),
                ),
                other => other.clone(),
            };
            (parse_listen(LISTEN, &with_default)?, true)
        }
    };
    const PROTOCOLS: &str = "apisix.ssl.ssl_protocols";
    let protocols_text =
        opt_str(doc, PROTOCOLS)?.unwrap_or_else(|| DEFAULT_SSL_PROTOCOLS.to_string());
    let protocols: Vec<String> = protocols_text
        .split_whitespace()
        .map(str::to_string)
        .collect();
    for p in &protocols {
        if !["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3", "SSLv2", "SSLv3"].contains(&p.as_str()) {
            return Err(key_err(PROTOCOLS, format!("unknown protocol `{p}`")));
        }
    }
    if !protocols.iter().any(|p| p == "TLSv1.2" || p == "TLSv1.3") {
        return Err(key_err(
            PROTOCOLS,
            "needs TLSv1.2 or TLSv1.3 (older protocols are not supported)",
        ));
    }
    let fallback_sni = opt_str(doc, "apisix.ssl.fallback_sni")?
        .map(|s| s.strip_suffix('.').unwrap_or(&s).to_ascii_lowercase())
        .filter(|s| !s.is_empty());
    Ok(Some(SslListen {
        listen,
        listen_given,
        protocols,
        ciphers: opt_str(doc, "apisix.ssl.ssl_ciphers")?,
        session_tickets: opt_bool(doc, "apisix.ssl.ssl_session_tickets")?.unwrap_or(false),
        fallback_sni,
    }))
}

/// `PATH` for `PATH/conf/config.yaml`; otherwise the current directory.
pub(crate) fn prefix_of(path: &Path) -> PathBuf {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    match dir {
        Some(d) if d.file_name().is_some_and(|n| n == "conf") => d
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
        _ => PathBuf::from("."),
    }
}

fn access_log_conf(
    doc: &Value,
    prefix: &Path,
) -> Result<crate::access_log::AccessLogConf, ConfigError> {
    use crate::access_log::{AccessLogConf, Escape, Format};
    let mut conf = AccessLogConf::defaults(prefix);
    if let Some(on) = opt_bool(doc, "nginx_config.http.enable_access_log")? {
        conf.enabled = on;
    }
    if let Some(path) = opt_str(doc, "nginx_config.http.access_log")? {
        let p = PathBuf::from(path);
        conf.path = if p.is_absolute() { p } else { prefix.join(p) };
    }
    if let Some(format) = opt_str(doc, "nginx_config.http.access_log_format")? {
        let key = "nginx_config.http.access_log_format";
        Format::parse(&crate::access_log::unquote(&format)).map_err(|e| key_err(key, e))?;
        conf.format = format;
    }
    if let Some(escape) = opt_str(doc, "nginx_config.http.access_log_format_escape")? {
        conf.escape = Escape::parse(&escape).ok_or_else(|| {
            key_err(
                "nginx_config.http.access_log_format_escape",
                "expected default, json or none",
            )
        })?;
    }
    match lookup(doc, "nginx_config.http.access_log_buffer") {
        None | Some(Value::Null) => {}
        Some(v) => {
            conf.buffer = v
                .as_u64()
                .filter(|n| *n <= 16 * 1024 * 1024)
                .ok_or_else(|| {
                    key_err(
                        "nginx_config.http.access_log_buffer",
                        "expected a number of bytes up to 16 MiB",
                    )
                })? as usize
        }
    }
    Ok(conf)
}

fn lookup<'a>(doc: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(doc, |v, k| v.get(k))
}

fn opt_str(doc: &Value, path: &str) -> Result<Option<String>, ConfigError> {
    match lookup(doc, path) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(key_err(path, "expected a string")),
    }
}

fn opt_bool(doc: &Value, path: &str) -> Result<Option<bool>, ConfigError> {
    match lookup(doc, path) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(key_err(path, "expected true or false")),
    }
}

/// The longest time a configuration key takes; longer ones are read as
/// this. Timers are set at now plus such a time, and a `tokio` or `std`
/// `Instant` that far ahead panics on overflow; ten years is as good as
/// never for every key here.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 86_400);

/// nginx time: `60s`, `500ms`, `2m`, `1h`, or a number of seconds; at most
/// [`MAX_DURATION`].
fn opt_duration(doc: &Value, path: &str) -> Result<Option<Duration>, ConfigError> {
    let bad = || key_err(path, "expected a duration such as 60s, 500ms, 2m");
    match lookup(doc, path) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .and_then(seconds_capped)
            .map(Some)
            .ok_or_else(bad),
        Some(Value::String(s)) => parse_duration(s).map(Some).ok_or_else(bad),
        Some(_) => Err(bad()),
    }
}

/// Parses nginx time syntax; a time above [`MAX_DURATION`] is read as it.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return None,
    };
    seconds_capped(secs)
}

/// `secs` seconds, at most [`MAX_DURATION`]; `None` when negative or NaN.
pub fn seconds_capped(secs: f64) -> Option<Duration> {
    if secs > MAX_DURATION.as_secs_f64() {
        return Some(MAX_DURATION);
    }
    Duration::try_from_secs_f64(secs).ok()
}

fn port_of(key: &str, v: &Value) -> Result<u16, ConfigError> {
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    };
    // 0 asks the OS for a free port (the log and tests read the bound one).
    n.filter(|p| *p <= 65535)
        .map(|p| p as u16)
        .ok_or_else(|| key_err(key, format!("expected a port number 0..65535, got {v}")))
}

fn parse_listen(key: &str, v: &Value) -> Result<Vec<SocketAddr>, ConfigError> {
    Ok(parse_listen_flagged(key, v)?
        .into_iter()
        .map(|(addr, _)| addr)
        .collect())
}

/// Listen entries with their `transparent` flag (TProxy listeners).
fn parse_listen_flagged(key: &str, v: &Value) -> Result<Vec<(SocketAddr, bool)>, ConfigError> {
    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let one = |item: &Value| -> Result<(SocketAddr, bool), ConfigError> {
        match item {
            Value::Object(map) => {
                let port = map
                    .get("port")
                    .map(|p| port_of(key, p))
                    .transpose()?
                    .unwrap_or(DEFAULT_NODE_PORT);
                let ip = match map.get("ip") {
                    None => any,
                    Some(Value::String(s)) => s
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse()
                        .map_err(|_| key_err(key, format!("invalid ip {s}")))?,
                    Some(other) => return Err(key_err(key, format!("invalid ip {other}"))),
                };
                let transparent = match map.get("transparent") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(other) => {
                        return Err(key_err(
                            key,
                            format!("transparent: expected a boolean, got {other}"),
                        ))
                    }
                };
                Ok((SocketAddr::new(ip, port), transparent))
            }
            other => Ok((SocketAddr::new(any, port_of(key, other)?), false)),
        }
    };
    match v {
        Value::Array(items) if !items.is_empty() => items.iter().map(one).collect(),
        Value::Array(_) => Err(key_err(key, "expected at least one port")),
        other => Ok(vec![one(other)?]),
    }
}

fn parse_key(i: usize, item: &Value) -> Result<KeyConf, ConfigError> {
    let key = format!("deployment.admin.admin_key[{i}]");
    let field = |name: &str| -> Result<String, ConfigError> {
        match item.get(name) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            Some(_) => Err(key_err(&format!("{key}.{name}"), "expected a string")),
        }
    };
    let role = match field("role")?.as_str() {
        "admin" | "" => admin_api::Role::Admin,
        "viewer" => admin_api::Role::Viewer,
        other => {
            return Err(key_err(
                &format!("{key}.role"),
                format!("expected admin or viewer, got {other}"),
            ))
        }
    };
    Ok(KeyConf {
        name: field("name")?,
        key: field("key")?,
        role,
    })
}

fn ip_list(key: &str, v: &Value) -> Result<IpSet, ConfigError> {
    let entries: Vec<String> = match v {
        Value::Array(items) => items
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| key_err(key, "expected a list of addresses or CIDRs"))?,
        Value::String(s) => vec![s.clone()],
        _ => return Err(key_err(key, "expected a list of addresses or CIDRs")),
    };
    IpSet::from_entries(&entries).map_err(|e| key_err(key, e.to_string()))
}

/// Replaces `${{VAR}}` / `${{VAR:=default}}` in every string value.
fn substitute_env(
    v: &mut Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match v {
        Value::String(s) if s.contains("${{") => {
            let mut out = String::new();
            let mut rest = s.as_str();
            while let Some(start) = rest.find("${{") {
                out.push_str(&rest[..start]);
                let after = &rest[start + 3..];
                let end = after
                    .find("}}")
                    .ok_or_else(|| key_err(path, "unterminated ${{ in value"))?;
                let expr = after[..end].trim();
                let (name, default) = match expr.split_once(":=") {
                    Some((n, d)) => (n.trim(), Some(d.trim())),
                    None => (expr, None),
                };
                match (env(name), default) {
                    (Some(val), _) => out.push_str(&val),
                    (None, Some(d)) => out.push_str(d),
                    (None, None) => {
                        return Err(key_err(
                            path,
                            format!("environment variable {name} is not set"),
                        ))
                    }
                }
                rest = &after[end + 2..];
            }
            out.push_str(rest);
            *s = out;
            Ok(())
        }
        Value::Array(items) => items
            .iter_mut()
            .enumerate()
            .try_for_each(|(i, x)| substitute_env(x, &format!("{path}[{i}]"), env)),
        Value::Object(map) => map.iter_mut().try_for_each(|(k, x)| {
            let p = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            substitute_env(x, &p, env)
        }),
        _ => Ok(()),
    }
}

/// Key paths (up to three levels deep) present in `doc` but not read.
fn unused_keys(doc: &Value) -> Vec<String> {
    let mut out = BTreeSet::new();
    fn walk(v: &Value, path: String, depth: usize, out: &mut BTreeSet<String>) {
        let used = USED_KEYS.iter().chain(etcd::KEYS).any(|k| {
            *k == path || k.starts_with(&format!("{path}.")) || path.starts_with(&format!("{k}."))
        });
        if USED_KEYS.contains(&path.as_str()) || etcd::KEYS.contains(&path.as_str()) {
            return;
        }
        match v {
            Value::Object(map) if depth < 3 || used => {
                for (k, x) in map {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(x, p, depth + 1, out);
                }
            }
            _ => {
                if !path.is_empty() && !used {
                    out.insert(path);
                }
            }
        }
    }
    walk(doc, String::new(), 0, &mut out);
    out.into_iter().collect()
}

mod etcd;
pub use etcd::EtcdConf;

#[cfg(test)]
mod tests;
