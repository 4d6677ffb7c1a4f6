//! `api-breaker`: stops sending requests to an upstream that keeps
//! failing, for a while that doubles each time it trips.
//!
//! Mirrors APISIX 3.18's plugin of the same name (priority 1005, access and
//! log phases):
//!
//! ```json
//! {"break_response_code": 502, "break_response_body": "{\"message\":\"breaker opened\"}",
//!  "break_response_headers": [{"key": "Content-Type", "value": "application/json"}],
//!  "max_breaker_sec": 300,
//!  "unhealthy": {"http_statuses": [500], "failures": 3},
//!  "healthy": {"http_statuses": [200], "successes": 3}}
//! ```
//!
//! - State is kept per `$host$uri`, shared by every route (as APISIX's
//!   shared dict): a count of unhealthy answers, a count of healthy ones in
//!   a row, and when the breaker last opened.
//! - log: an upstream status in `unhealthy.http_statuses` counts one
//!   failure and clears the healthy run; every `failures`th failure opens
//!   the breaker. A status in `healthy.http_statuses` (once there were
//!   failures) extends the run; `successes` in a row forget everything.
//!   Other statuses, and requests that never reached an upstream, change
//!   nothing.
//! - access: while open, requests get `break_response_code` (with
//!   `break_response_body` and then `break_response_headers`, whose values
//!   are `$var` templates; with no body, nginx's page and no headers). The
//!   breaker stays open `2^n` seconds after it opened, `n` being failures /
//!   `failures` (at least 1), at most `max_breaker_sec`; after that requests
//!   go through again, and the next `failures` failures open it longer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use http::header::{self, HeaderName};
use http::{request, HeaderValue, Response, StatusCode};
use serde_json::{json, Value};

use crate::ctx::Ctx;
use crate::plugin::{CompileCx, Flow, Phases, Plugin, PluginSpec, SchemaType};
use crate::registry::cached;
use crate::schema::Schema;
use crate::template::{Escape, Template};

pub const NAME: &str = "api-breaker";
pub const PRIORITY: i32 = 1005;
pub const DEFAULT_MAX_BREAKER_SEC: u64 = 300;
/// Paths tracked at most; past it, paths whose breaker has closed are
/// forgotten first.
const MAX_TRACKED: usize = 65_536;

/// `unhealthy.http_statuses` (500..599, default `[500]`).
fn unhealthy_statuses() -> Schema {
    Schema::Custom(
        |v| {
            Schema::array(Schema::integer().min(500.0).max(599.0).int())
                .min(1)
                .unique()
                .done()
                .validate(v)
        },
        || {
            json!({"type": "array", "minItems": 1, "uniqueItems": true, "default": [500],
                   "items": {"type": "integer", "minimum": 500, "maximum": 599}})
        },
    )
}

/// `healthy.http_statuses` (200..499, default `[200]`).
fn healthy_statuses() -> Schema {
    Schema::Custom(
        |v| {
            Schema::array(Schema::integer().min(200.0).max(499.0).int())
                .min(1)
                .unique()
                .done()
                .validate(v)
        },
        || {
            json!({"type": "array", "minItems": 1, "uniqueItems": true, "default": [200],
                   "items": {"type": "integer", "minimum": 200, "maximum": 499}})
        },
    )
}

fn build_schema() -> Schema {
    let header = Schema::object()
        .required(&["key", "value"])
        .prop("key", Schema::string().min(1).done())
        .prop("value", Schema::string().min(1).done())
        .done();
    Schema::object()
        .required(&["break_response_code"])
        .prop(
            "break_response_code",
            Schema::integer().min(200.0).max(599.0).int(),
        )
        .prop("break_response_body", Schema::string().done())
        .prop("break_response_headers", Schema::array(header).done())
        .prop("max_breaker_sec", Schema::integer().min(3.0).int())
        .prop(
            "unhealthy",
            Schema::object()
                .prop("http_statuses", unhealthy_statuses())
                .prop("failures", Schema::integer().min(1.0).int())
                .done(),
        )
        .prop(
            "healthy",
            Schema::object()
                .prop("http_statuses", healthy_statuses())
                .prop("successes", Schema::integer().min(1.0).int())
                .done(),
        )
        .done()
}

/// The configuration schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

/// What is known about one `$host$uri`.
#[derive(Debug, Default, Clone, Copy)]
struct PathState {
    unhealthy: u64,
    healthy: u64,
    /// Seconds (of [`Breakers::now`]) when the breaker last opened.
    opened: Option<u64>,
}

/// Every path's state, shared by all api-breaker configurations.
pub struct Breakers {
    paths: Mutex<HashMap<String, PathState>>,
    epoch: Instant,
}

impl Default for Breakers {
    fn default() -> Self {
        Breakers {
            paths: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
        }
    }
}

impl Breakers {
    /// Whole seconds, as `ngx.time()` counts.
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }
}

/// The compiled plugin.
pub struct ApiBreaker {
    code: StatusCode,
    body: Option<String>,
    headers: Vec<(HeaderName, Template)>,
    max_breaker_sec: u64,
    unhealthy_statuses: Vec<u16>,
    failures: u64,
    healthy_statuses: Vec<u16>,
    successes: u64,
    breakers: Arc<Breakers>,
}

/// The request's `$host$uri`, noted in access for the log phase.
#[derive(Clone)]
struct BreakerKey(Arc<str>);

fn codes(part: Option<&Value>, default: u16) -> Vec<u16> {
    part.and_then(|p| p.get("http_statuses"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_u64)
                .filter_map(|c| u16::try_from(c).ok())
                .collect()
        })
        .unwrap_or_else(|| vec![default])
}

pub fn compile(conf: &Value, cx: &CompileCx<'_>) -> Result<ApiBreaker, String> {
    let code = conf
        .get("break_response_code")
        .and_then(Value::as_u64)
        .and_then(|c| u16::try_from(c).ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or("break_response_code is required")?;
    let mut headers = Vec::new();
    for h in conf
        .get("break_response_headers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = h.get("key").and_then(Value::as_str).unwrap_or_default();
        let name = HeaderName::from_bytes(key.as_bytes())
            .map_err(|_| format!("invalid header name {key:?}"))?;
        let value = h.get("value").and_then(Value::as_str).unwrap_or_default();
        headers.push((name, Template::new(value)));
    }
    let unhealthy = conf.get("unhealthy");
    let healthy = conf.get("healthy");
    let int = |part: Option<&Value>, k: &str, d: u64| {
        part.and_then(|p| p.get(k))
            .and_then(Value::as_u64)
            .filter(|n| *n > 0)
            .unwrap_or(d)
    };
    Ok(ApiBreaker {
        code,
        body: conf
            .get("break_response_body")
            .and_then(Value::as_str)
            .map(str::to_string),
        headers,
        max_breaker_sec: int(Some(conf), "max_breaker_sec", DEFAULT_MAX_BREAKER_SEC),
        unhealthy_statuses: codes(unhealthy, 500),
        failures: int(unhealthy, "failures", 3),
        healthy_statuses: codes(healthy, 200),
        successes: int(healthy, "successes", 3),
        breakers: cx.shared_state("", Breakers::default),
    })
}

impl ApiBreaker {
    fn open_until(&self, state: &PathState) -> Option<u64> {
        let opened = state.opened?;
        if state.unhealthy == 0 {
            return None;
        }
        let times = (state.unhealthy / self.failures).max(1);
        let seconds = 2u64
            .checked_pow(u32::try_from(times).unwrap_or(u32::MAX))
            .unwrap_or(u64::MAX)
            .min(self.max_breaker_sec);
        Some(opened.saturating_add(seconds))
    }

    fn broken(&self, ctx: &Ctx, req: &request::Parts) -> Flow {
        let Some(body) = &self.body else {
            return Flow::Respond(crate::status_page(self.code));
        };
        let mut resp = Response::new(crate::full_body(body.clone()));
        *resp.status_mut() = self.code;
        let vars = ctx.vars(Some(req));
        for (name, value) in &self.headers {
            let Ok(v) = HeaderValue::try_from(value.render(&vars, &[], Escape::None).text) else {
                continue;
            };
            // nginx's add_header appends, but keeps one Content-Type.
            if name == header::CONTENT_TYPE {
                resp.headers_mut().insert(name.clone(), v);
            } else {
                resp.headers_mut().append(name.clone(), v);
            }
        }
        Flow::Respond(resp)
    }
}

impl Plugin for ApiBreaker {
    fn phases(&self) -> Phases {
        Phases::ACCESS | Phases::LOG
    }

    fn access(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        let path = ctx.path.as_deref().unwrap_or(req.uri.path());
        let key: Arc<str> = format!("{}{path}", ctx.host.as_deref().unwrap_or_default()).into();
        let open = {
            let paths = self
                .breakers
                .paths
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            paths
                .get(&*key)
                .and_then(|s| self.open_until(s))
                .is_some_and(|until| until >= self.breakers.now())
        };
        ctx.data.insert(BreakerKey(key));
        if open {
            return self.broken(ctx, req);
        }
        Flow::Continue
    }

    fn log(&self, ctx: &Ctx) {
        let (Some(status), Some(BreakerKey(key))) = (ctx.upstream.status, ctx.data.get()) else {
            return;
        };
        let now = self.breakers.now();
        let mut paths = self
            .breakers
            .paths
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.unhealthy_statuses.contains(&status) {
            if !paths.contains_key(&**key) && paths.len() >= MAX_TRACKED {
                paths.retain(|_, s| self.open_until(s).is_some_and(|u| u >= now));
            }
            let state = paths.entry(key.to_string()).or_default();
            state.unhealthy += 1;
            state.healthy = 0;
            if state.unhealthy.is_multiple_of(self.failures) {
                state.opened = Some(now);
            }
        } else if self.healthy_statuses.contains(&status) {
            if let Some(state) = paths.get_mut(&**key) {
                state.healthy += 1;
                if state.healthy >= self.successes {
                    paths.remove(&**key);
                }
            }
        }
    }
}

/// The registry entry.
pub struct ApiBreakerSpec;

impl PluginSpec for ApiBreakerSpec {
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

    fn compile(&self, conf: &Value, cx: &CompileCx<'_>) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(compile(conf, cx)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn schema_as_apisix() {
        assert_eq!(
            testing::refusal(NAME, &json!({"break_response_code": 199})),
            "property \"break_response_code\" validation failed: expected 199 to be at least 200"
        );
        assert_eq!(
            testing::refusal(
                NAME,
                &json!({"break_response_code": 502, "healthy": {"http_statuses": [200, 200]}})
            ),
            "property \"healthy\" validation failed: property \"http_statuses\" validation failed: expected unique items but items 1 and 2 are equal"
        );
        assert_eq!(
            testing::refusal(
                NAME,
                &json!({"break_response_code": 502, "break_response_headers": [{"value": "x"}]})
            ),
            "property \"break_response_headers\" validation failed: failed to validate item 1: property \"key\" is required"
        );
        assert!(!testing::refusal(
            NAME,
            &json!({"break_response_code": 502, "max_breaker_sec": -1})
        )
        .is_empty());
        assert!(!testing::refusal(
            NAME,
            &json!({"break_response_code": 502, "unhealthy": {"http_statuses": [603]}})
        )
        .is_empty());
    }

    fn breaker(conf: Value) -> ApiBreaker {
        let state = crate::plugin::StateCache::default();
        let cx = CompileCx {
            owner: "routes/1",
            metadata: None,
            attr: None,
            state: &state,
            conf: &conf,
            name: NAME,
            upstream_exists: None,
        };
        let mut b = compile(&conf, &cx).unwrap();
        // Each test its own paths.
        b.breakers = Arc::new(Breakers::default());
        b
    }

    /// One request: the status the client saw (the upstream's when it was
    /// let through).
    fn request(b: &ApiBreaker, upstream_status: u16) -> u16 {
        let mut ctx = testing::ctx("127.0.0.1");
        ctx.host = Some("h".into());
        let (mut parts, _) = testing::request("127.0.0.1", "/p", &[]).into_parts();
        match b.access(&mut ctx, &mut parts) {
            Flow::Respond(r) => r.status().as_u16(),
            _ => {
                ctx.upstream.status = Some(upstream_status);
                b.log(&ctx);
                upstream_status
            }
        }
    }

    #[test]
    fn opens_after_failures_and_closes_after_successes() {
        let b = breaker(json!({"break_response_code": 599,
            "unhealthy": {"http_statuses": [500, 503], "failures": 3},
            "healthy": {"http_statuses": [200, 206], "successes": 3}}));
        let seen: Vec<u16> = [200, 500, 503, 500, 500, 500]
            .iter()
            .map(|s| request(&b, *s))
            .collect();
        assert_eq!(seen, [200, 500, 503, 500, 599, 599]);

        let b = breaker(json!({"break_response_code": 502}));
        let seen: Vec<u16> = [500, 500, 200, 200, 200, 500, 500]
            .iter()
            .map(|s| request(&b, *s))
            .collect();
        // Three successes in a row forget the two failures.
        assert_eq!(seen, [500, 500, 200, 200, 200, 500, 500]);
    }

    #[test]
    fn the_break_doubles_up_to_the_cap() {
        let b = breaker(json!({"break_response_code": 502, "max_breaker_sec": 10,
                               "unhealthy": {"failures": 1}}));
        let state = |unhealthy| PathState {
            unhealthy,
            healthy: 0,
            opened: Some(100),
        };
        assert_eq!(b.open_until(&state(1)), Some(102));
        assert_eq!(b.open_until(&state(2)), Some(104));
        assert_eq!(b.open_until(&state(3)), Some(108));
        assert_eq!(b.open_until(&state(4)), Some(110));
        assert_eq!(b.open_until(&state(60)), Some(110));
    }

    #[test]
    fn the_broken_answer_carries_body_and_headers() {
        let b = breaker(json!({"break_response_code": 502,
            "break_response_body": "{\"message\":\"breaker opened.\"}",
            "break_response_headers": [
                {"key": "Content-Type", "value": "application/json"},
                {"key": "Content-Type", "value": "application/json+v1"},
                {"key": "X-Where", "value": "$uri"}],
            "unhealthy": {"failures": 1}}));
        request(&b, 500);
        let mut ctx = testing::ctx("127.0.0.1");
        ctx.host = Some("h".into());
        let (mut parts, _) = testing::request("127.0.0.1", "/p", &[]).into_parts();
        let Flow::Respond(resp) = b.access(&mut ctx, &mut parts) else {
            panic!("expected the breaker to answer");
        };
        assert_eq!(resp.status(), 502);
        assert_eq!(resp.headers()["content-type"], "application/json+v1");
        assert_eq!(resp.headers()["x-where"], "/p");
    }
}
