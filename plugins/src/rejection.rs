//! The answer limit and blocking plugins give a refused request:
//! `rejected_code` with `{"error_msg": rejected_msg}` when a message is
//! configured, an empty body otherwise (APISIX's `return code, {error_msg}`).

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde_json::{json, Value};

use crate::{full_body, ResponseBody};

/// `rejected_code` and `rejected_msg`, built once per configuration.
#[derive(Clone)]
pub struct Rejection {
    status: StatusCode,
    body: Option<Bytes>,
}

impl Rejection {
    /// From a checked configuration; `default` when `rejected_code` is
    /// absent. Fails on a code no response can carry.
    pub fn from_conf(conf: &Value, default: u16) -> Result<Self, String> {
        let code = conf
            .get("rejected_code")
            .and_then(Value::as_u64)
            .unwrap_or(u64::from(default));
        let status = u16::try_from(code)
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| format!("invalid rejected_code {code}"))?;
        let body = conf.get("rejected_msg").and_then(Value::as_str).map(|msg| {
            let mut body = json!({ "error_msg": msg }).to_string();
            body.push('\n');
            Bytes::from(body)
        });
        Ok(Rejection { status, body })
    }

    /// The answer for one refused request.
    pub fn response(&self) -> Response<ResponseBody> {
        let mut resp = match &self.body {
            Some(body) => {
                let mut r = Response::new(full_body(body.clone()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
            None => Response::new(full_body(Bytes::new())),
        };
        *resp.status_mut() = self.status;
        resp
    }
}
