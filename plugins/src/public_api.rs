//! `public-api`: serves a plugin's own API on a route of the data plane.
//!
//! Mirrors APISIX 3.18's plugin (priority 501, access phase):
//!
//! ```json
//! {"uri": "/apisix/prometheus/metrics"}
//! ```
//!
//! The request's path, or `uri` when set, names the API. The one plugin
//! API the gateway has is the Prometheus exposition
//! (`plugin_attr.prometheus.export_uri`, `GET`), offered here only when
//! `enable_export_server` is false, as APISIX does. Anything else is a 404.

use std::sync::{Arc, OnceLock};

use http::{header, request, HeaderValue, Method, Response, StatusCode};
use serde_json::Value;

use crate::ctx::Ctx;
use crate::plugin::{CompileCx, Flow, Phases, Plugin, PluginSpec, SchemaType};
use crate::prometheus::Metrics;
use crate::registry::cached;
use crate::schema::Schema;

pub const NAME: &str = "public-api";
pub const PRIORITY: i32 = 501;

fn build_schema() -> Schema {
    Schema::object().prop("uri", Schema::string().done()).done()
}

/// The configuration schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

/// The compiled plugin.
pub struct PublicApi {
    uri: Option<String>,
}

/// The Prometheus exposition as the API answers it.
fn metrics_answer(metrics: &Metrics) -> Response<crate::ResponseBody> {
    match metrics.cached() {
        Some(text) => {
            let mut resp = Response::new(crate::full_body(text));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            resp
        }
        None => crate::json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({"message": "Failed to retrieve metrics: no data available"}),
        ),
    }
}

impl Plugin for PublicApi {
    fn phases(&self) -> Phases {
        Phases::ACCESS
    }

    fn access(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        let path = match &self.uri {
            Some(u) => u.as_str(),
            None => ctx.path.as_deref().unwrap_or_else(|| req.uri.path()),
        };
        if let Some(metrics) = Metrics::installed() {
            let s = &metrics.settings;
            if !s.enable_export_server && path == s.export_uri && req.method == Method::GET {
                return Flow::Respond(metrics_answer(&metrics));
            }
        }
        Flow::Respond(crate::html_page(StatusCode::NOT_FOUND))
    }
}

/// The registry entry.
pub struct PublicApiSpec;

impl PluginSpec for PublicApiSpec {
    fn name(&self) -> &'static str {
        NAME
    }

    fn priority(&self) -> i32 {
        PRIORITY
    }

    fn schema(&self) -> &'static Schema {
        schema()
    }

    fn check(&self, conf: &Value, _target: SchemaType) -> Result<(), String> {
        schema().validate(conf)
    }

    fn compile(&self, conf: &Value, _cx: &CompileCx<'_>) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(PublicApi {
            uri: conf.get("uri").and_then(Value::as_str).map(str::to_string),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use serde_json::json;

    #[test]
    fn schema_checks_uri() {
        assert!(schema().validate(&json!({})).is_ok());
        assert!(schema().validate(&json!({"uri": "/m"})).is_ok());
        assert!(schema().validate(&json!({"uri": 1})).is_err());
    }

    #[test]
    fn unknown_api_is_not_found() {
        let p = PublicApi {
            uri: Some("/apisix/nothing".into()),
        };
        let mut ctx = testing::ctx("127.0.0.1");
        let (mut parts, _) = testing::request("127.0.0.1", "/x", &[]).into_parts();
        match p.access(&mut ctx, &mut parts) {
            Flow::Respond(r) => assert_eq!(r.status(), StatusCode::NOT_FOUND),
            _ => panic!("expected a 404"),
        }
    }
}
