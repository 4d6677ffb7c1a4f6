//! The Admin API's HTTP face: APISIX's paths under `/apisix/admin`.
//!
//! | path | methods |
//! |---|---|
//! | `/apisix/admin` | HEAD (liveness, no key needed) |
//! | `/apisix/admin/{routes,services,upstreams,global_rules,plugin_configs,consumer_groups}[/{id}[/{sub_path}]]` | GET PUT POST PATCH DELETE (as APISIX allows per kind) |
//! | `/apisix/admin/consumers[/{username}]`, `/apisix/admin/consumers/{username}/credentials[/{id}]` | GET PUT DELETE |
//! | `/apisix/admin/plugin_metadata/{plugin}` | GET PUT DELETE |
//! | `/apisix/admin/plugins/list`, `/apisix/admin/plugins/{name}[?schema_type=consumer]`, `/apisix/admin/plugins?all=true` | GET |
//! | `/apisix/admin/schema/{route,service,upstream,global_rule,ssl}`, `/apisix/admin/schema/plugins/{name}` | GET |
//!
//! Every request is checked against `allow_admin` and the admin key first.
//! Bodies are limited to [`MAX_BODY_BYTES`]; larger, malformed or
//! non-JSON bodies get APISIX's 400 `invalid request body: ...`. Writes are
//! serialised, so reference checks (an `upstream_id` exists, an upstream is
//! not in use) cannot race with each other.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, head};
use axum::Router;
use http::{HeaderValue, Method, StatusCode};
use serde_json::{json, Value};

use arc_swap::ArcSwap;

use crate::auth::{percent_decode, AuthPolicy};
use crate::error::{json_body, AdminError};
use crate::ops::{self, ListQuery, Reply};
use crate::resource::{Kind, KNOWN_UNSERVED};
use crate::store::Store;
use crate::validate::schema_of;
use writer::Writer;

mod writer;

/// APISIX's Admin API request body limit: 1.5 MiB.
pub const MAX_BODY_BYTES: usize = 1024 * 1024 * 3 / 2;
/// Admin API version header value.
pub const API_VERSION: &str = "v3";

/// Shared state of the Admin API.
pub struct AdminState {
    pub store: Arc<dyn Store>,
    /// Replaced whole on a config reload (SIGHUP).
    pub auth: ArcSwap<AuthPolicy>,
    /// Value of the `Server` header on every answer.
    pub server_header: HeaderValue,
    /// Runs the writes, one at a time (see [`writer`]).
    writer: Writer,
}

impl AdminState {
    pub fn new(store: Arc<dyn Store>, auth: AuthPolicy, server_header: HeaderValue) -> Self {
        AdminState {
            store,
            auth: ArcSwap::from_pointee(auth),
            server_header,
            writer: Writer::default(),
        }
    }
}

/// The Admin API router. Serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()` so that
/// `allow_admin` can see the peer address.
pub fn router(state: Arc<AdminState>) -> Router {
    let headers_state = state.clone();
    let peer_state = state.clone();
    Router::new()
        .route("/apisix/admin", head(|| async { StatusCode::OK }))
        .route("/apisix/admin/{*rest}", any(handle))
        .fallback(|| async {
            AdminError::new(StatusCode::NOT_FOUND, "404 Route Not Found").into_response()
        })
        .with_state(state)
        // allow_admin guards everything on this listener, as nginx's
        // allow/deny does for APISIX's admin server.
        .layer(axum::middleware::from_fn(
            move |req: Request, next: axum::middleware::Next| {
                let state = peer_state.clone();
                async move {
                    let peer = req
                        .extensions()
                        .get::<ConnectInfo<SocketAddr>>()
                        .map(|c| c.0.ip());
                    match state.auth.load().check_peer(peer) {
                        Ok(()) => next.run(req).await,
                        Err(e) => e.into_response(),
                    }
                }
            },
        ))
        .layer(axum::middleware::map_response(move |mut resp: Response| {
            let server = headers_state.server_header.clone();
            async move {
                let h = resp.headers_mut();
                h.insert(http::header::SERVER, server);
                h.insert("x-api-version", HeaderValue::from_static(API_VERSION));
                resp
            }
        }))
}

async fn handle(State(state): State<Arc<AdminState>>, req: Request) -> Response {
    match dispatch(state, req).await {
        Ok((status, value)) => json_body(status, &value),
        Err(e) => e.into_response(),
    }
}

/// The parts of an admin path: `/apisix/admin/{resource}/{id}/{sub_path}`.
struct Target {
    resource: String,
    id: Option<String>,
    sub_path: Option<String>,
}

fn parse_target(path: &str) -> Target {
    let rest = path.strip_prefix("/apisix/admin/").unwrap_or_default();
    let mut parts = rest.splitn(3, '/');
    let resource = parts.next().unwrap_or_default().to_string();
    let id = parts.next().filter(|s| !s.is_empty()).map(str::to_string);
    let sub_path = parts.next().filter(|s| !s.is_empty()).map(str::to_string);
    Target {
        resource,
        id,
        sub_path,
    }
}

fn query_args(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

async fn read_json(body: Body, declared_len: Option<usize>) -> Result<Option<Value>, AdminError> {
    let too_big = |size: String| {
        AdminError::bad_request(format!(
            "invalid request body: request size {size} is greater than the maximum size {MAX_BODY_BYTES} allowed"
        ))
    };
    if let Some(len) = declared_len.filter(|l| *l > MAX_BODY_BYTES) {
        return Err(too_big(len.to_string()));
    }
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| too_big(format!("> {MAX_BODY_BYTES}")))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| AdminError {
            status: StatusCode::BAD_REQUEST,
            body: json!({
                "error_msg": format!("invalid request body: {e}"),
                "req_body": String::from_utf8_lossy(&bytes),
            }),
        })
}

async fn dispatch(state: Arc<AdminState>, req: Request) -> Result<Reply, AdminError> {
    let (parts, body) = req.into_parts();
    let query = parts.uri.query();
    state
        .auth
        .load()
        .check_key(&parts.method, query, &parts.headers)?;
    let target = parse_target(parts.uri.path());
    let args = query_args(query);
    let arg = |name: &str| args.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());

    match target.resource.as_str() {
        "plugins" => {
            return plugin_info(
                &parts.method,
                target.id.as_deref(),
                arg("schema_type").as_deref(),
                arg("all").as_deref() == Some("true"),
            )
        }
        "schema" => return schema_info(&parts.method, &target),
        _ => {}
    }
    let Some(mut kind) = Kind::from_collection(&target.resource) else {
        if KNOWN_UNSERVED.contains(&target.resource.as_str()) && parts.method == Method::GET {
            return match target.id {
                None => Ok((StatusCode::OK, json!({"list": [], "total": 0}))),
                Some(_) => Err(AdminError::key_not_found()),
            };
        }
        return Err(AdminError::new(
            StatusCode::NOT_FOUND,
            format!("Unsupported resource type: {}", target.resource),
        ));
    };

    let declared_len = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let conf = match parts.method {
        Method::PUT | Method::POST | Method::PATCH => read_json(body, declared_len).await?,
        _ => None,
    };
    // APISIX ignores paging arguments that are not numbers.
    let parse_num = |name: &str| arg(name).and_then(|v| v.parse::<usize>().ok());
    let list_query = ListQuery {
        page: parse_num("page"),
        page_size: parse_num("page_size"),
        name: arg("name"),
        label: arg("label"),
        uri: arg("uri"),
        filter: arg("filter").and_then(|f| {
            let (k, v) = f.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        }),
    };
    let force = arg("force").is_some_and(|v| v == "true");
    let method = parts.method.clone();
    // `/consumers/{username}/credentials[/{id}]`: a credential's id is
    // `{username}/credentials/{id}`; the list is the consumer's.
    let mut target = target;
    let mut parent = None;
    if kind == Kind::Consumers {
        if let (Some(user), Some(sub)) = (target.id.clone(), target.sub_path.clone()) {
            let Some(rest) = sub.strip_prefix("credentials") else {
                return Err(AdminError::new(
                    StatusCode::NOT_FOUND,
                    format!("Unsupported resource type: {sub}"),
                ));
            };
            kind = Kind::Credentials;
            target.id = rest
                .strip_prefix('/')
                .filter(|c| !c.is_empty())
                .map(|c| format!("{user}/credentials/{c}"));
            target.sub_path = None;
            parent = Some(user);
        }
    }

    if method == Method::GET {
        return tokio::task::spawn_blocking(move || {
            let store = state.store.as_ref();
            match target.id.as_deref() {
                Some(id) => ops::get(store, kind, id),
                None => ops::list(store, kind, parent.as_deref(), &list_query),
            }
        })
        .await
        .map_err(task_failed)?;
    }
    // Writes run one at a time, on a thread where the embedded store may
    // block on its commit; a remote store's I/O is awaited there through
    // the runtime.
    let runtime = tokio::runtime::Handle::current();
    let store = state.store.clone();
    let write = move || {
        let store = store.as_ref();
        let id = target.id.as_deref();
        runtime.block_on(async {
            match method {
                Method::PUT => ops::put(store, kind, id, conf).await,
                Method::POST => ops::post(store, kind, conf).await,
                Method::PATCH => {
                    ops::patch(store, kind, id, target.sub_path.as_deref(), conf).await
                }
                Method::DELETE => ops::delete(store, kind, id, force).await,
                other => Err(ops::not_supported(other.as_str(), kind)),
            }
        })
    };
    state.writer.run(write).await.map_err(task_failed)?
}

/// 500 for a read or write whose task did not run to its end.
fn task_failed(e: impl std::fmt::Display) -> AdminError {
    AdminError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("admin task failed: {e}"),
    )
}

fn plugin_info(
    method: &Method,
    name: Option<&str>,
    schema_type: Option<&str>,
    all: bool,
) -> Result<Reply, AdminError> {
    if method != Method::GET {
        return Err(AdminError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "not supported method for plugins",
        ));
    }
    if all {
        let mut out = serde_json::Map::new();
        for spec in plugins::registry::by_priority() {
            let mut attrs = serde_json::Map::new();
            attrs.insert("priority".into(), json!(spec.priority()));
            attrs.insert("version".into(), json!(0.1));
            attrs.insert("schema".into(), spec.schema().to_json());
            if let Some(s) = spec.consumer_schema() {
                attrs.insert("consumer_schema".into(), s.to_json());
            }
            if let Some(s) = spec.metadata_schema() {
                attrs.insert("metadata_schema".into(), s.to_json());
            }
            if spec.kind() == plugins::PluginKind::Auth {
                attrs.insert("type".into(), json!("auth"));
            }
            out.insert(spec.name().to_string(), Value::Object(attrs));
        }
        return Ok((StatusCode::OK, Value::Object(out)));
    }
    match name {
        Some("list") | None => Ok((
            StatusCode::OK,
            json!(plugins::registry::by_priority()
                .iter()
                .map(|p| p.name())
                .collect::<Vec<_>>()),
        )),
        Some(name) => plugin_schema(name, schema_type == Some("consumer")),
    }
}

fn plugin_schema(name: &str, consumer: bool) -> Result<Reply, AdminError> {
    let Some(spec) = plugins::find(name) else {
        return Err(AdminError::new(
            StatusCode::NOT_FOUND,
            "plugin not found in subsystem http",
        ));
    };
    let schema = if consumer {
        spec.consumer_schema()
            .ok_or_else(|| AdminError::bad_request("not found schema"))?
            .to_json()
    } else {
        let mut schema = spec.schema().to_json();
        if let Value::Object(map) = &mut schema {
            map.insert("priority".into(), json!(spec.priority()));
        }
        schema
    };
    Ok((StatusCode::OK, schema))
}

fn schema_info(method: &Method, target: &Target) -> Result<Reply, AdminError> {
    if method != Method::GET {
        return Err(AdminError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "not supported method for schema",
        ));
    }
    let kind = match target.id.as_deref() {
        Some("plugins") => {
            return plugin_schema(target.sub_path.as_deref().unwrap_or_default(), false)
        }
        Some("route") => Kind::Routes,
        Some("service") => Kind::Services,
        Some("upstream") => Kind::Upstreams,
        Some("global_rule") => Kind::GlobalRules,
        Some("consumer") => Kind::Consumers,
        Some("credential") => Kind::Credentials,
        Some("consumer_group") => Kind::ConsumerGroups,
        Some("plugin_config") => Kind::PluginConfigs,
        Some("ssl") => Kind::Ssls,
        other => {
            return Err(AdminError::bad_request(format!(
                "not found schema: {}",
                other.unwrap_or_default()
            )))
        }
    };
    Ok((StatusCode::OK, schema_of(kind).to_json()))
}

#[cfg(test)]
mod tests;
