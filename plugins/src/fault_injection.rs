//! `fault-injection`: answers or slows requests on purpose, to test how
//! clients cope.
//!
//! Mirrors APISIX 3.18's plugin of the same name (priority 11000, rewrite
//! phase):
//!
//! ```json
//! {"abort": {"http_status": 503, "body": "down for $remote_addr\n",
//!            "headers": {"retry-after": 5}, "percentage": 50,
//!            "vars": [[["arg_name", "==", "jack"]]]},
//!  "delay": {"duration": 0.5, "percentage": 10}}
//! ```
//!
//! - `vars` (each of `abort` and `delay`) is a list of expressions, ORed;
//!   absent means always. Both are evaluated first; then the delay (when
//!   it applies and its percentage draw hits), then the abort (its own
//!   draw). An empty `vars` list never applies, as in APISIX.
//! - A percentage draw hits when a random 1..=100 is at most `percentage`
//!   (absent: always).
//! - The abort answers `http_status` with `body` (`$var` templates) and
//!   sets `headers` (string values are templates, numbers as they are);
//!   the upstream is not contacted. With no body the answer has none, or
//!   nginx's page for an error status.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{request, Response, StatusCode};
use serde_json::Value;

use crate::ctx::Ctx;
use crate::expr::{self, Expr};
use crate::plugin::{CompileCx, Flow, Phases, Plugin, PluginSpec, SchemaType};
use crate::registry::cached;
use crate::schema::Schema;
use crate::template::{Escape, Template};

pub const NAME: &str = "fault-injection";
pub const PRIORITY: i32 = 11000;

fn percentage() -> Schema {
    Schema::integer().min(0.0).max(100.0).int()
}

fn vars() -> Schema {
    Schema::array(Schema::array(Schema::Any).done())
        .max(20)
        .done()
}

fn build_schema() -> Schema {
    let abort = Schema::object()
        .required(&["http_status"])
        .prop("http_status", Schema::integer().min(200.0).int())
        .prop("body", Schema::string().min(0).done())
        .prop(
            "headers",
            Schema::object()
                .min_properties(1)
                .additional(Schema::Custom(
                    |v| match v {
                        Value::String(_) | Value::Number(_) => Ok(()),
                        _ => Err("value should match only one schema, but matches none".into()),
                    },
                    || serde_json::json!({"oneOf": [{"type": "string"}, {"type": "number"}]}),
                ))
                .done(),
        )
        .prop("percentage", percentage())
        .prop("vars", vars())
        .done();
    let delay = Schema::object()
        .required(&["duration"])
        .prop("duration", Schema::integer().min(0.0).number())
        .prop("percentage", percentage())
        .prop("vars", vars())
        .done();
    Schema::object()
        .min_properties(1)
        .prop("abort", abort)
        .prop("delay", delay)
        .done()
}

/// The configuration schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

/// The `vars` lists compiled: `None` when absent (always applies).
fn compile_vars(part: Option<&Value>) -> Result<Option<Vec<Expr>>, String> {
    match part.and_then(|p| p.get("vars")).and_then(Value::as_array) {
        None => Ok(None),
        Some(list) => list
            .iter()
            .map(expr::compile)
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
    }
}

/// Schema check, then every `vars` expression compiled (the error is
/// lua-resty-expr's own, without a prefix, as APISIX reports it).
pub fn check(conf: &Value) -> Result<(), String> {
    schema().validate(conf)?;
    compile_vars(conf.get("abort"))?;
    compile_vars(conf.get("delay"))?;
    Ok(())
}

struct Draw {
    /// `None`: always.
    percentage: Option<u32>,
    vars: Option<Vec<Expr>>,
}

impl Draw {
    fn compile(part: &Value) -> Result<Draw, String> {
        Ok(Draw {
            percentage: part
                .get("percentage")
                .and_then(Value::as_u64)
                .map(|p| p.min(100) as u32),
            vars: compile_vars(Some(part))?,
        })
    }

    fn vars_hold(&self, ctx: &Ctx, req: &request::Parts) -> bool {
        match &self.vars {
            None => true,
            Some(list) => {
                let vars = ctx.vars(Some(req));
                list.iter().any(|e| e.eval(&vars))
            }
        }
    }

    fn hits(&self) -> bool {
        self.percentage
            .is_none_or(|p| rand::random_range(1..=100u32) <= p)
    }
}

enum HeaderText {
    Template(Template),
    Fixed(HeaderValue),
}

struct Abort {
    draw: Draw,
    status: StatusCode,
    body: Option<Template>,
    headers: Vec<(HeaderName, HeaderText)>,
}

struct Delay {
    draw: Draw,
    duration: Duration,
}

/// The compiled plugin.
pub struct FaultInjection {
    abort: Option<Abort>,
    delay: Option<Delay>,
}

fn number_text(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        _ => n.to_string(),
    }
}

pub fn compile(conf: &Value) -> Result<FaultInjection, String> {
    let abort = match conf.get("abort") {
        None => None,
        Some(a) => {
            let code = a.get("http_status").and_then(Value::as_u64).unwrap_or(200);
            let status = u16::try_from(code)
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .ok_or_else(|| format!("invalid http_status {code}"))?;
            let mut headers = Vec::new();
            for (name, value) in a
                .get("headers")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                let name = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| format!("invalid header name {name:?}"))?;
                let text = match value {
                    Value::String(s) => HeaderText::Template(Template::new(s)),
                    Value::Number(n) => HeaderText::Fixed(
                        HeaderValue::try_from(number_text(n)).map_err(|e| e.to_string())?,
                    ),
                    _ => continue,
                };
                headers.push((name, text));
            }
            Some(Abort {
                draw: Draw::compile(a)?,
                status,
                body: a.get("body").and_then(Value::as_str).map(Template::new),
                headers,
            })
        }
    };
    let delay = match conf.get("delay") {
        None => None,
        Some(d) => Some(Delay {
            draw: Draw::compile(d)?,
            duration: Duration::try_from_secs_f64(
                d.get("duration").and_then(Value::as_f64).unwrap_or(0.0),
            )
            .unwrap_or(Duration::from_secs(3600)),
        }),
    };
    Ok(FaultInjection { abort, delay })
}

impl FaultInjection {
    fn abort_response(&self, abort: &Abort, ctx: &Ctx, req: &request::Parts) -> Flow {
        let vars = ctx.vars(Some(req));
        let mut resp = match &abort.body {
            Some(t) => Response::new(crate::full_body(Bytes::from(
                t.render(&vars, &[], Escape::None).text,
            ))),
            None => crate::status_page(abort.status),
        };
        *resp.status_mut() = abort.status;
        for (name, text) in &abort.headers {
            let value = match text {
                HeaderText::Fixed(v) => Some(v.clone()),
                HeaderText::Template(t) => {
                    HeaderValue::try_from(t.render(&vars, &[], Escape::None).text).ok()
                }
            };
            if let Some(v) = value {
                resp.headers_mut().insert(name.clone(), v);
            }
        }
        Flow::Respond(resp)
    }
}

impl Plugin for FaultInjection {
    fn phases(&self) -> Phases {
        Phases::REWRITE
    }

    fn rewrite(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        let abort_applies = self
            .abort
            .as_ref()
            .is_some_and(|a| a.draw.vars_hold(ctx, req));
        let delay_applies = self
            .delay
            .as_ref()
            .is_some_and(|d| d.draw.vars_hold(ctx, req));
        let wait = self
            .delay
            .as_ref()
            .filter(|d| delay_applies && d.draw.hits())
            .map(|d| d.duration)
            .filter(|d| !d.is_zero());
        let answer = match &self.abort {
            Some(a) if abort_applies && a.draw.hits() => Some(self.abort_response(a, ctx, req)),
            _ => None,
        };
        match (wait, answer) {
            (None, None) => Flow::Continue,
            (None, Some(answer)) => answer,
            (Some(wait), answer) => Flow::Wait(Box::pin(async move {
                tokio::time::sleep(wait).await;
                answer.unwrap_or(Flow::Continue)
            })),
        }
    }
}

/// The registry entry.
pub struct FaultInjectionSpec;

impl PluginSpec for FaultInjectionSpec {
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
        check(conf)
    }

    fn compile(&self, conf: &Value, _cx: &CompileCx<'_>) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(compile(conf)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::ConsumerIndex;
    use crate::testing;
    use serde_json::json;

    #[test]
    fn schema_as_apisix() {
        assert_eq!(
            testing::refusal(NAME, &json!({})),
            "expect object to have at least 1 properties"
        );
        assert_eq!(
            testing::refusal(NAME, &json!({"abort": {"http_status": 100}})),
            "property \"abort\" validation failed: property \"http_status\" validation failed: expected 100 to be at least 200"
        );
        assert_eq!(
            testing::refusal(NAME, &json!({"abort": {"body": "x"}})),
            "property \"abort\" validation failed: property \"http_status\" is required"
        );
        assert!(
            testing::refusal(NAME, &json!({"delay": {"duration": "test"}}))
                .contains("wrong type: expected number, got string")
        );
        assert_eq!(
            testing::refusal(
                NAME,
                &json!({"abort": {"http_status": 403, "vars": [["arg_name", "!=", "jack"]]}})
            ),
            "rule should be wrapped inside brackets"
        );
    }

    async fn send(conf: Value, uri: &str, headers: &[(&str, &str)]) -> testing::Answer {
        let set = testing::compile(&json!({NAME: conf})).unwrap();
        let chain = testing::chain(Vec::new(), set, ConsumerIndex::default());
        testing::send(chain, testing::request("127.0.0.1", uri, headers)).await
    }

    #[tokio::test]
    async fn aborts_with_templates_and_or_of_vars() {
        let conf = json!({"abort": {
            "http_status": 403, "body": "client addr: $remote_addr, count $arg_count\n",
            "headers": {"h1": "v1", "h2": 2, "h3": "$uri"},
            "vars": [[["arg_name", "==", "jack"], ["arg_age", "!", "<", 18]],
                     [["http_apikey", "==", "api-key"]]]
        }});
        let a = send(conf.clone(), "/hello?name=jack&age=20&count=2", &[]).await;
        assert_eq!(a.status, 403);
        assert_eq!(a.body, "client addr: 127.0.0.1, count 2\n");
        assert_eq!(a.headers["h1"], "v1");
        assert_eq!(a.headers["h2"], "2");
        assert_eq!(a.headers["h3"], "/hello");
        assert_eq!(
            send(conf.clone(), "/", &[("apikey", "api-key")])
                .await
                .status,
            403
        );
        assert_eq!(send(conf.clone(), "/?name=allen", &[]).await.status, 200);
        assert_eq!(send(conf, "/?name=jack&age=16", &[]).await.status, 200);
        // Percentage 0 never fires; an empty vars list never applies.
        let never = json!({"abort": {"http_status": 403, "percentage": 0}});
        assert_eq!(send(never, "/", &[]).await.status, 200);
        let empty = json!({"abort": {"http_status": 403, "vars": []}});
        assert_eq!(send(empty, "/", &[]).await.status, 200);
        let bare = json!({"abort": {"http_status": 204}});
        let a = send(bare, "/", &[]).await;
        assert_eq!(a.status, 204);
        assert_eq!(a.body, "");
    }

    #[tokio::test]
    async fn delays_before_going_on_or_aborting() {
        let start = std::time::Instant::now();
        let a = send(json!({"delay": {"duration": 0.2}}), "/", &[]).await;
        assert_eq!(a.status, 200);
        assert!(start.elapsed() >= Duration::from_millis(190));
        let start = std::time::Instant::now();
        let both = json!({"delay": {"duration": 0.2}, "abort": {"http_status": 418, "body": "no"}});
        let a = send(both, "/", &[]).await;
        assert_eq!(a.status, 418);
        assert!(start.elapsed() >= Duration::from_millis(190));
        let start = std::time::Instant::now();
        let skipped = json!({"delay": {"duration": 5, "vars": [[["arg_slow", "==", "1"]]]}});
        assert_eq!(send(skipped, "/", &[]).await.status, 200);
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
