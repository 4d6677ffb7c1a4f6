//! Helpers for plugin tests: compile a configuration the way the gateway
//! does and run requests through a [`Chain`] into a stub upstream that
//! echoes what it received.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use crate::chain::{Chain, GlobalRules, PluginSet};
use crate::consumer::ConsumerIndex;
use crate::plugin::{SchemaType, StateCache};
use crate::registry::{self, CompileEnv, PluginError};
use crate::{full_body, ClientIp, ResponseBody};

/// Checks and compiles a `plugins` object with no metadata and a fresh state
/// cache.
pub fn compile(plugins: &Value) -> Result<PluginSet, PluginError> {
    compile_with(plugins, &StateCache::default(), &BTreeMap::new())
}

/// Checks and compiles with the given state cache and plugin metadata.
pub fn compile_with(
    plugins: &Value,
    state: &StateCache,
    metadata: &BTreeMap<String, Value>,
) -> Result<PluginSet, PluginError> {
    let empty = serde_json::Map::new();
    let map = plugins.as_object().unwrap_or(&empty);
    for (name, conf) in map {
        registry::check(name, conf, SchemaType::Route)?;
    }
    let lookup = |name: &str| metadata.get(name);
    let env = CompileEnv {
        metadata: &lookup,
        attrs: None,
        state,
        upstream_exists: None,
    };
    registry::compile_set(map, "routes/test", &env, false)
}

/// Why the route-side configuration `conf` of plugin `name` is refused (the
/// text after APISIX's `failed to check ... err: ` prefix); panics when it
/// is accepted.
pub fn refusal(name: &str, conf: &Value) -> String {
    match registry::check(name, conf, SchemaType::Route) {
        Err(PluginError::Invalid { reason, .. }) => reason,
        other => panic!("expected {name} to refuse {conf}, got {other:?}"),
    }
}

/// The stub upstream: 200 with a JSON body of the method, URI and headers
/// it received, and the client address the proxy would judge by.
pub fn echo() -> impl tower::Service<
    Request<()>,
    Response = Response<ResponseBody>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(|req: Request<()>| async move {
        let headers: serde_json::Map<String, Value> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    Value::String(v.to_str().unwrap_or_default().to_string()),
                )
            })
            .collect();
        let body = serde_json::json!({
            "client_ip": req.extensions().get::<ClientIp>().map(|c| c.0.to_string()),
            "method": req.method().as_str(),
            "uri": req.uri().to_string(),
            "headers": headers,
        });
        Ok::<_, Infallible>(Response::new(full_body(body.to_string())))
    })
}

/// A chain of `route` (and `globals`) around [`echo`].
pub fn chain(
    globals: Vec<PluginSet>,
    route: PluginSet,
    consumers: ConsumerIndex,
) -> Chain<
    impl tower::Service<
            Request<()>,
            Response = Response<ResponseBody>,
            Error = Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
> {
    Chain {
        globals: Arc::new(GlobalRules::new(
            globals.into_iter().map(Arc::new).collect(),
        )),
        route: Arc::new(route),
        consumers: Arc::new(consumers),
        inner: echo(),
    }
}

/// A request from `client` to `uri` with `headers`.
pub fn request(client: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut req = Request::builder().uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut req = req.body(()).unwrap_or_default();
    if let Ok(ip) = client.parse() {
        req.extensions_mut().insert(ClientIp(ip));
    }
    req
}

/// The answer: status, headers and body text.
pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Answer {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// A header the echo upstream received.
    pub fn upstream_header(&self, name: &str) -> Option<String> {
        self.json()["headers"][name].as_str().map(str::to_string)
    }
}

/// Sends `req` through `svc` and reads the whole answer.
pub async fn send<S>(svc: S, req: Request<()>) -> Answer
where
    S: tower::Service<Request<()>, Response = Response<ResponseBody>, Error = Infallible>,
{
    let Ok(resp) = svc.oneshot(req).await;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// A request context for a client at `client`, with no consumers.
pub fn ctx(client: &str) -> crate::Ctx {
    crate::Ctx::new(
        client
            .parse()
            .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1])),
        crate::ConnInfo::unknown(),
        std::sync::Arc::new(crate::consumer::ConsumerIndex::default()),
    )
}
