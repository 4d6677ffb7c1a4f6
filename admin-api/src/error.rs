//! The one error type of the Admin API and its APISIX-shaped bodies.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::{json, Value};

use crate::store::StoreError;

/// An Admin API failure: a status and the JSON body APISIX sends with it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminError {
    pub status: StatusCode,
    pub body: Value,
}

impl AdminError {
    /// `{"error_msg": msg}` with `status`.
    pub fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        AdminError {
            status,
            body: json!({ "error_msg": msg.into() }),
        }
    }

    /// 400 `{"error_msg": msg}`.
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, msg)
    }

    /// 404 `{"message":"Key not found"}`, etcd's answer for a missing key.
    pub fn key_not_found() -> Self {
        AdminError {
            status: StatusCode::NOT_FOUND,
            body: json!({ "message": "Key not found" }),
        }
    }

    /// 401 `{"error_msg":"failed to check token","description": why}`.
    pub fn unauthorized(description: &str) -> Self {
        AdminError {
            status: StatusCode::UNAUTHORIZED,
            body: json!({ "error_msg": "failed to check token", "description": description }),
        }
    }
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        // A remote store that is down or a lost race answers 503, as APISIX
        // does for every etcd failure; the running configuration is kept.
        let status = match e {
            StoreError::Unavailable(_) | StoreError::Conflict => StatusCode::SERVICE_UNAVAILABLE,
            StoreError::Backend(_) | StoreError::Corrupt { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        tracing::error!(error = %e, "admin store failure");
        AdminError::new(status, e.to_string())
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        json_body(self.status, &self.body)
    }
}

/// A JSON response body ending in a newline, as APISIX writes them.
pub fn json_body(status: StatusCode, value: &Value) -> Response {
    // Written straight into bytes: `to_string` goes through `fmt` one piece
    // at a time. A `Value` always serialises (its keys are strings).
    let mut body = Vec::with_capacity(512);
    let _ = serde_json::to_writer(&mut body, value);
    body.push(b'\n');
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}
