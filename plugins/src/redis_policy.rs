//! The `redis` and `redis-cluster` policies of limit-count, limit-req and
//! limit-conn: APISIX's connection keys and their schemas, and one shared
//! client per distinct Redis.
//!
//! - `policy: redis`: `redis_host` (required), `redis_port` (6379),
//!   `redis_username`, `redis_password`, `redis_database` (0),
//!   `redis_timeout` (ms, 1000), `redis_ssl` (false), `redis_ssl_verify`
//!   (false: the certificate is not checked, as APISIX's default).
//! - `policy: redis-cluster`: `redis_cluster_nodes` (`"host:port"` seeds,
//!   required), `redis_cluster_name` (required, a label), `redis_password`,
//!   `redis_timeout`, `redis_cluster_ssl`, `redis_cluster_ssl_verify`.
//! - `redis_keepalive_timeout` / `redis_keepalive_pool` are accepted and
//!   have nothing to tune: every plugin configuration naming the same Redis
//!   (address, database, credentials, TLS) shares one multiplexed,
//!   pipelined connection that reconnects by itself.
//!
//! Every command is bounded by `redis_timeout` (connecting included), so a
//! Redis that is down or stalled costs a request at most that long; the
//! plugin then decides with `allow_degradation`, as in APISIX.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{ConnectionAddr, ConnectionInfo, FromRedisValue, IntoConnectionInfo, Script};
use serde_json::Value;
use tokio::sync::OnceCell;

use crate::schema::{ObjectRule, Schema};

/// `redis_timeout` unless configured, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 1000;
/// `redis_port` unless configured.
pub const DEFAULT_PORT: u16 = 6379;
/// limit-conn's `key_ttl` unless configured, in seconds.
pub const DEFAULT_KEY_TTL: u64 = 3600;

/// The `policy: redis` schema; limit-conn adds `key_ttl`.
pub fn single_schema(key_ttl: bool) -> Schema {
    let s = Schema::object()
        .required(&["redis_host"])
        .prop("redis_host", Schema::string().min(2).done())
        .prop("redis_port", Schema::integer().min(1.0).int())
        .prop("redis_username", Schema::string().min(1).done())
        .prop("redis_password", Schema::string().min(0).done())
        .prop("redis_database", Schema::integer().min(0.0).int())
        .prop("redis_timeout", Schema::integer().min(1.0).int())
        .prop("redis_ssl", Schema::Boolean)
        .prop("redis_ssl_verify", Schema::Boolean)
        .prop(
            "redis_keepalive_timeout",
            Schema::integer().min(1000.0).int(),
        )
        .prop("redis_keepalive_pool", Schema::integer().min(1.0).int());
    if key_ttl {
        s.prop("key_ttl", Schema::integer().int()).done()
    } else {
        s.done()
    }
}

/// The `policy: redis-cluster` schema; limit-conn adds `key_ttl`.
pub fn cluster_schema(key_ttl: bool) -> Schema {
    let s = Schema::object()
        .required(&["redis_cluster_nodes", "redis_cluster_name"])
        .prop(
            "redis_cluster_nodes",
            Schema::array(Schema::string().min(2).max(100).done())
                .min(1)
                .done(),
        )
        .prop("redis_password", Schema::string().min(0).done())
        .prop("redis_timeout", Schema::integer().min(1.0).int())
        .prop("redis_cluster_name", Schema::string().done())
        .prop("redis_cluster_ssl", Schema::Boolean)
        .prop("redis_cluster_ssl_verify", Schema::Boolean)
        .prop(
            "redis_keepalive_timeout",
            Schema::integer().min(1000.0).int(),
        )
        .prop("redis_keepalive_pool", Schema::integer().min(1.0).int());
    if key_ttl {
        s.prop("key_ttl", Schema::integer().int()).done()
    } else {
        s.done()
    }
}

/// `rule` (a limit plugin's own properties) with APISIX's `if policy ==
/// redis then ... else if policy == redis-cluster then ...`; a failure
/// reads `then clause did not match` / `else clause did not match`, as
/// jsonschema words it. The conditions ask for `policy` to be present:
/// APISIX fills in its default (`local`) before the check.
pub fn with_policies(rule: ObjectRule, key_ttl: bool) -> Schema {
    let when = |policy: &'static [&'static str]| {
        Schema::object()
            .required(&["policy"])
            .prop("policy", Schema::string().enumerated(policy).done())
            .done()
    };
    let otherwise = Schema::object()
        .if_then_else(
            when(&["redis-cluster"]),
            Some(cluster_schema(key_ttl)),
            None,
        )
        .done();
    rule.if_then_else(
        when(&["redis"]),
        Some(single_schema(key_ttl)),
        Some(otherwise),
    )
    .done()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Tls {
    Off,
    /// Encrypted, the certificate not checked.
    NoVerify,
    Verify,
}

impl Tls {
    fn from_flags(on: bool, verify: bool) -> Tls {
        match (on, verify) {
            (false, _) => Tls::Off,
            (true, false) => Tls::NoVerify,
            (true, true) => Tls::Verify,
        }
    }

    fn addr(self, host: &str, port: u16) -> ConnectionAddr {
        match self {
            Tls::Off => ConnectionAddr::Tcp(host.to_string(), port),
            Tls::NoVerify | Tls::Verify => ConnectionAddr::TcpTls {
                host: host.to_string(),
                port,
                insecure: self == Tls::NoVerify,
                tls_params: None,
            },
        }
    }
}

/// Which Redis, as a plugin configuration names it. Equal targets share
/// one client.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Target {
    Single {
        host: String,
        port: u16,
        username: Option<String>,
        password: Option<String>,
        database: i64,
        tls: Tls,
    },
    Cluster {
        nodes: Vec<(String, u16)>,
        password: Option<String>,
        tls: Tls,
    },
}

/// A checked configuration's Redis settings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RedisConf {
    target: Target,
    timeout: Duration,
}

/// `host:port` (or `[v6]:port`) of a cluster seed.
fn split_node(node: &str) -> Result<(String, u16), String> {
    let bad = || format!("invalid redis_cluster_nodes entry {node:?}: expected host:port");
    let (host, port) = node.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port.parse::<u16>().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

impl RedisConf {
    /// The settings of `policy` `redis` or `redis-cluster`; `None` for
    /// `local` (or no policy).
    pub fn from_conf(conf: &Value) -> Result<Option<RedisConf>, String> {
        let text = |k: &str| conf.get(k).and_then(Value::as_str);
        let flag = |k: &str| conf.get(k).and_then(Value::as_bool).unwrap_or(false);
        let password = text("redis_password")
            .filter(|p| !p.is_empty())
            .map(str::to_string);
        let timeout = Duration::from_millis(
            conf.get("redis_timeout")
                .and_then(Value::as_u64)
                .filter(|t| *t > 0)
                .unwrap_or(DEFAULT_TIMEOUT_MS),
        );
        let target = match text("policy") {
            Some("redis") => Target::Single {
                host: text("redis_host")
                    .ok_or("redis_host is required for policy redis")?
                    .to_string(),
                port: match conf.get("redis_port").and_then(Value::as_u64) {
                    None => DEFAULT_PORT,
                    Some(p) => u16::try_from(p)
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| format!("invalid redis_port {p}"))?,
                },
                username: text("redis_username").map(str::to_string),
                password,
                database: conf
                    .get("redis_database")
                    .and_then(Value::as_i64)
                    .unwrap_or(0),
                tls: Tls::from_flags(flag("redis_ssl"), flag("redis_ssl_verify")),
            },
            Some("redis-cluster") => Target::Cluster {
                nodes: conf
                    .get("redis_cluster_nodes")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|n| split_node(n.as_str().unwrap_or_default()))
                    .collect::<Result<_, _>>()?,
                password,
                tls: Tls::from_flags(flag("redis_cluster_ssl"), flag("redis_cluster_ssl_verify")),
            },
            _ => return Ok(None),
        };
        Ok(Some(RedisConf { target, timeout }))
    }

    /// The `redis_timeout` every command is bounded by.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn connection_info(&self) -> Result<ConnectionInfo, String> {
        let Target::Single {
            host,
            port,
            username,
            password,
            database,
            tls,
        } = &self.target
        else {
            return Err("not a single redis".into());
        };
        let mut settings = redis::RedisConnectionInfo::default().set_db(*database);
        if let Some(u) = username {
            settings = settings.set_username(u);
        }
        if let Some(p) = password {
            settings = settings.set_password(p);
        }
        Ok(tls
            .addr(host, *port)
            .into_connection_info()
            .map_err(|e| e.to_string())?
            .set_redis_settings(settings))
    }
}

enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A client of one Redis (or cluster), shared by every plugin configuration
/// that names it. Connects on first use.
pub struct Redis {
    conf: RedisConf,
    conn: OnceCell<Conn>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").field("conf", &self.conf).finish()
    }
}

/// Clients by target, while some plugin holds them.
fn clients() -> &'static Mutex<HashMap<RedisConf, Weak<Redis>>> {
    static CELL: std::sync::OnceLock<Mutex<HashMap<RedisConf, Weak<Redis>>>> =
        std::sync::OnceLock::new();
    CELL.get_or_init(Default::default)
}

impl Redis {
    /// The client of `conf`: the one already in use for the same Redis, or
    /// a new one (not connected yet).
    pub fn shared(conf: RedisConf) -> Arc<Redis> {
        let mut map = clients().lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(live) = map.get(&conf).and_then(Weak::upgrade) {
            return live;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let redis = Arc::new(Redis {
            conf: conf.clone(),
            conn: OnceCell::new(),
        });
        map.insert(conf, Arc::downgrade(&redis));
        redis
    }

    async fn connect(&self) -> Result<Conn, String> {
        let timeout = self.conf.timeout;
        match &self.conf.target {
            Target::Single { .. } => {
                let client =
                    redis::Client::open(self.conf.connection_info()?).map_err(|e| e.to_string())?;
                // One quick retry inside a command; beyond that the command
                // fails and the manager reconnects in the background.
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(timeout);
                ConnectionManager::new_lazy_with_config(client, config)
                    .map(Conn::Single)
                    .map_err(|e| e.to_string())
            }
            Target::Cluster {
                nodes,
                password,
                tls,
            } => {
                let seeds = nodes.iter().map(|(h, p)| tls.addr(h, *p));
                let mut builder = ClusterClientBuilder::new(seeds)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(1);
                if let Some(p) = password {
                    builder = builder.password(p);
                }
                let client = builder.build().map_err(|e| e.to_string())?;
                client
                    .get_async_connection()
                    .await
                    .map(Conn::Cluster)
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Runs `script` (EVALSHA, loading it when Redis does not have it) on
    /// one key, within `redis_timeout`.
    pub async fn eval<T: FromRedisValue>(
        &self,
        script: &Script,
        key: &str,
        args: &[String],
    ) -> Result<T, String> {
        let work = async {
            let conn = self.conn.get_or_try_init(|| self.connect()).await?;
            let mut call = script.key(key);
            for a in args {
                call.arg(a.as_str());
            }
            match conn {
                Conn::Single(m) => call.invoke_async(&mut m.clone()).await,
                Conn::Cluster(c) => call.invoke_async(&mut c.clone()).await,
            }
            .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(self.conf.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err("timeout".into()),
        }
    }
}

/// A limit plugin's answer when Redis failed: the request goes on with
/// `allow_degradation`, else APISIX's bare 500. The failure is logged as
/// `what` (APISIX's words, `failed to limit req`) with the counter key.
pub fn failed(
    plugin: &str,
    what: &str,
    key: &str,
    err: &str,
    allow_degradation: bool,
) -> crate::Flow {
    tracing::error!(plugin, key, "{what}: {err}");
    if allow_degradation {
        crate::Flow::Continue
    } else {
        crate::Flow::status(http::StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// Fire-and-forget: runs `script` on a task of its own (the log phase may
/// not wait), logging a failure.
pub fn spawn_eval(
    redis: Arc<Redis>,
    script: &'static Script,
    key: String,
    args: Vec<String>,
    what: &'static str,
) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        tracing::error!("{what}: no runtime to reach redis on");
        return;
    };
    handle.spawn(async move {
        if let Err(e) = redis.eval::<redis::Value>(script, &key, &args).await {
            tracing::error!("{what}: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_apisix_keys() {
        let conf = RedisConf::from_conf(&json!({"policy": "redis", "redis_host": "10.0.0.1"}))
            .unwrap()
            .unwrap();
        assert_eq!(conf.timeout(), Duration::from_millis(1000));
        assert!(matches!(
            conf.target,
            Target::Single {
                port: 6379,
                database: 0,
                tls: Tls::Off,
                ..
            }
        ));
        let conf = RedisConf::from_conf(&json!({
            "policy": "redis-cluster", "redis_cluster_name": "c",
            "redis_cluster_nodes": ["127.0.0.1:7000", "[::1]:7001"], "redis_timeout": 50,
            "redis_cluster_ssl": true
        }))
        .unwrap()
        .unwrap();
        assert_eq!(conf.timeout(), Duration::from_millis(50));
        match &conf.target {
            Target::Cluster { nodes, tls, .. } => {
                assert_eq!(nodes[1], ("::1".to_string(), 7001));
                assert_eq!(*tls, Tls::NoVerify);
            }
            other => panic!("{other:?}"),
        }
        assert!(RedisConf::from_conf(&json!({"policy": "local"}))
            .unwrap()
            .is_none());
        assert!(RedisConf::from_conf(&json!({
            "policy": "redis-cluster", "redis_cluster_nodes": ["nope"]
        }))
        .is_err());
    }

    #[test]
    fn same_redis_same_client() {
        let conf = |db: i64| {
            RedisConf::from_conf(
                &json!({"policy": "redis", "redis_host": "h1", "redis_database": db}),
            )
            .unwrap()
            .unwrap()
        };
        let a = Redis::shared(conf(0));
        let b = Redis::shared(conf(0));
        let c = Redis::shared(conf(1));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
    }

    #[tokio::test]
    async fn a_closed_port_fails_within_the_timeout() {
        // Nothing listens on port 1 of loopback: refused at once.
        let conf = RedisConf::from_conf(&json!({
            "policy": "redis", "redis_host": "127.0.0.1", "redis_port": 1, "redis_timeout": 200
        }))
        .unwrap()
        .unwrap();
        let redis = Redis::shared(conf);
        let script = Script::new("return 1");
        let start = std::time::Instant::now();
        let r = redis.eval::<i64>(&script, "k", &[]).await;
        assert!(r.is_err());
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
