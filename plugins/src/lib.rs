//! ferrogate's plugins: the registry, the shared plugin vocabulary and one
//! module per plugin.
//!
//! A plugin mirrors an APISIX plugin: a name, a priority (higher runs first
//! within a phase), a JSON schema with defaults and a side-effect-free
//! `check` ([`PluginSpec`]). Its configuration is compiled once per config
//! object into a [`Plugin`] with hooks in APISIX's phases; [`chain::Chain`]
//! runs the global rules and the route's plugins phase by phase around the
//! proxy, with a per-request [`ctx::Ctx`].
//!
//! Adding a plugin: one module beside `ip_restriction`, one line in
//! [`registry::PLUGINS`]. See `CONTRIBUTING.md`.

pub mod api_breaker;
pub mod basic_auth;
pub mod batch;
pub mod chain;
pub mod cidr;
pub mod clock;
pub mod consumer;
pub mod consumer_restriction;
pub mod cors;
pub mod ctx;
pub mod expr;
pub mod fault_injection;
pub mod file_logger;
pub mod gzip;
pub mod http_logger;
pub mod ip_restriction;
pub mod jwt_auth;
pub mod key_auth;
pub mod limit_conn;
pub mod limit_count;
pub mod limit_key;
pub mod limit_req;
pub mod log_entry;
pub mod logger;
pub mod opentelemetry;
pub mod plugin;
pub mod prometheus;
pub mod proxy_rewrite;
pub mod public_api;
pub mod real_ip;
pub mod redirect;
pub mod redis_policy;
pub mod referer_restriction;
pub mod registry;
pub mod rejection;
pub mod request_id;
pub mod response_rewrite;
pub mod roundrobin;
pub mod schema;
pub mod tcp_logger;
pub mod template;
#[doc(hidden)]
pub mod testing;
pub mod tls_client;
pub mod traffic_split;
pub mod ua_restriction;
pub mod uri_blocker;
pub mod vars;
pub mod wire;

use std::convert::Infallible;
use std::net::IpAddr;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};

pub use chain::{Chain, GlobalRules, PluginSet};
pub use ctx::Ctx;
pub use plugin::{CompileCx, Flow, Phases, Plugin, PluginKind, PluginSpec, SchemaType};
pub use registry::{find, PluginError, PLUGINS};
pub use vars::{ConnInfo, TlsVars};

/// Error type carried by response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response in the plugin chain.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// The address the gateway judges a request by: the TCP peer, or the address
/// a trusted proxy reported. The data plane puts it in the request
/// extensions before the plugin chain runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// A body from a byte buffer.
pub fn full_body(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// The nginx-style HTML page a status without a body of its own gets
/// (`<h1>302 Found</h1>`), `Content-Type: text/html`.
pub fn html_page(status: StatusCode) -> Response<ResponseBody> {
    let line = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    // nginx spells 504's reason "Gateway Time-out"; clients grep for it.
    let line = if status == StatusCode::GATEWAY_TIMEOUT {
        "504 Gateway Time-out".to_string()
    } else {
        line
    };
    let html = format!(
        "<html>\r\n<head><title>{line}</title></head>\r\n<body>\r\n<center><h1>{line}</h1></center>\r\n<hr><center>ferrogate</center>\r\n</body>\r\n</html>\r\n"
    );
    let mut resp = Response::new(full_body(html));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    resp
}

/// What nginx sends for a status a plugin returned without a body: its
/// HTML page for the error and redirect statuses it has one for, else
/// nothing.
pub fn status_page(status: StatusCode) -> Response<ResponseBody> {
    if status.as_u16() >= 300 && status.canonical_reason().is_some() {
        return html_page(status);
    }
    let mut resp = Response::new(full_body(Bytes::new()));
    *resp.status_mut() = status;
    resp
}

/// A JSON response as APISIX's `core.response.exit` writes it: the encoded
/// value followed by a newline, `Content-Type: application/json`.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<ResponseBody> {
    let mut text = value.to_string();
    text.push('\n');
    let mut resp = Response::new(full_body(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
