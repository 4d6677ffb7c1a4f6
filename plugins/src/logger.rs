//! What the logger plugins share: the entry of a request (see
//! [`crate::log_entry`]), the response body for `include_resp_body`, the
//! common schema keys and checks, and the plugin that hands entries to a
//! [`crate::batch::Processor`]. Each logger adds its own schema keys and a
//! [`crate::batch::Sender`].

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};

use crate::batch::{BatchConf, Processor, Sender};
use crate::ctx::{Ctx, RequestBodyCapture};
use crate::expr::Expr;
use crate::log_entry::{self, LogFormat, ResponseBody};
use crate::plugin::{CompileCx, Phases, Plugin};
use crate::schema::{ObjectRule, Schema};

/// The keys every logger has: `log_format`, `log_format_extra`,
/// `include_req_body(_expr)`, `include_resp_body(_expr)`,
/// `max_req_body_bytes`, `max_resp_body_bytes`.
pub fn common_schema(schema: ObjectRule) -> ObjectRule {
    let expr_list = || {
        Schema::array(Schema::array(Schema::Any).done())
            .min(1)
            .done()
    };
    let bytes = || Schema::integer().min(1.0).int();
    schema
        .prop("log_format", Schema::object().done())
        .prop("log_format_extra", Schema::object().done())
        .prop("include_req_body", Schema::Boolean)
        .prop("include_req_body_expr", expr_list())
        .prop("include_resp_body", Schema::Boolean)
        .prop("include_resp_body_expr", expr_list())
        .prop("max_req_body_bytes", bytes())
        .prop("max_resp_body_bytes", bytes())
}

/// The `plugin_metadata` schema of the batched loggers.
pub fn metadata_schema() -> Schema {
    Schema::object()
        .prop("log_format", Schema::object().done())
        .prop("log_format_extra", Schema::object().done())
        .prop("max_pending_entries", Schema::integer().min(1.0).int())
        .done()
}

/// Checks beyond the schema: the expressions compile, and nothing is
/// asked that this gateway would silently skip.
pub fn check(conf: &Value) -> Result<(), String> {
    for key in ["include_req_body_expr", "include_resp_body_expr"] {
        if let Some(e) = conf.get(key) {
            crate::expr::compile(e)
                .map_err(|err| format!("failed to validate the '{key}' expression: {err}"))?;
        }
    }
    Ok(())
}

/// What goes into an entry, compiled.
pub struct EntryBuilder {
    format: Option<LogFormat>,
    /// `log_format_extra`: keys added to the full entry (ignored with a
    /// `log_format`, as APISIX does).
    extra: Option<LogFormat>,
    include_resp_body: bool,
    resp_body_expr: Option<Expr>,
    max_resp_body: usize,
    include_req_body: bool,
    req_body_expr: Option<Expr>,
    max_req_body: usize,
    /// http-logger names unrouted requests' route `no-matched`.
    no_matched: bool,
}

impl EntryBuilder {
    /// From the plugin's configuration, `log_format` falling back to the
    /// plugin metadata's.
    pub fn new(conf: &Value, metadata: Option<&Value>, no_matched: bool) -> Result<Self, String> {
        // The plugin's value wins when present, even empty.
        let extra = match conf.get("log_format_extra") {
            Some(v) => Some(v),
            None => metadata.and_then(|m| m.get("log_format_extra")),
        };
        Ok(EntryBuilder {
            extra: extra
                .and_then(Value::as_object)
                .filter(|f| !f.is_empty())
                .map(LogFormat::new),
            format: conf
                .get("log_format")
                .or_else(|| metadata.and_then(|m| m.get("log_format")))
                .and_then(Value::as_object)
                .filter(|f| !f.is_empty())
                .map(LogFormat::new),
            include_resp_body: conf.get("include_resp_body").and_then(Value::as_bool) == Some(true),
            resp_body_expr: conf
                .get("include_resp_body_expr")
                .map(crate::expr::compile)
                .transpose()
                .map_err(|e| e.to_string())?,
            max_resp_body: conf
                .get("max_resp_body_bytes")
                .and_then(Value::as_u64)
                .unwrap_or(524_288) as usize,
            include_req_body: conf.get("include_req_body").and_then(Value::as_bool) == Some(true),
            req_body_expr: conf
                .get("include_req_body_expr")
                .map(crate::expr::compile)
                .transpose()
                .map_err(|e| e.to_string())?,
            max_req_body: conf
                .get("max_req_body_bytes")
                .and_then(Value::as_u64)
                .unwrap_or(524_288) as usize,
            no_matched,
        })
    }

    fn wants_body(&self, ctx: &Ctx) -> bool {
        self.include_resp_body
            && self
                .resp_body_expr
                .as_ref()
                .is_none_or(|e| e.eval(&ctx.vars(None)))
    }

    /// Keeps up to `max_resp_body_bytes` of the response body.
    pub fn collect(&self, ctx: &mut Ctx, chunk: &Bytes) {
        if chunk.is_empty() || !self.wants_body(ctx) {
            return;
        }
        let body = ctx.data.get_or_insert_default::<ResponseBody>();
        let room = self.max_resp_body.saturating_sub(body.0.len());
        body.0.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }

    /// Bytes of the request body the entry may hold (`include_req_body`
    /// of the full entry, up to `max_req_body_bytes`; default 512 KiB).
    pub fn request_body_bytes(&self) -> usize {
        if self.include_req_body && self.full() {
            self.max_req_body
        } else {
            0
        }
    }

    /// The request body for the entry: when asked, when
    /// `include_req_body_expr` holds at the end of the request, and when
    /// there was one.
    fn request_body(&self, ctx: &Ctx) -> Option<String> {
        if self.request_body_bytes() == 0
            || !self
                .req_body_expr
                .as_ref()
                .is_none_or(|e| e.eval(&ctx.vars(None)))
        {
            return None;
        }
        let capture = ctx.data.get::<Arc<RequestBodyCapture>>()?;
        let body = capture.bytes(self.max_req_body);
        (!body.is_empty()).then(|| String::from_utf8_lossy(&body).into_owned())
    }

    /// The entry of a finished request.
    pub fn entry(&self, ctx: &Ctx) -> Value {
        let mut entry = match &self.format {
            Some(format) => log_entry::custom(ctx, format),
            None => {
                let mut full = log_entry::full(ctx, self.include_resp_body);
                if let Some(body) = self.request_body(ctx) {
                    if let Some(req) = full.get_mut("request").and_then(Value::as_object_mut) {
                        req.insert("body".into(), Value::String(body));
                    }
                }
                if let (Some(extra), Some(map)) = (&self.extra, full.as_object_mut()) {
                    map.extend(log_entry::fields(ctx, extra));
                }
                full
            }
        };
        if self.no_matched {
            if let Some(map) = entry.as_object_mut() {
                if map.get("route_id").is_none_or(Value::is_null) {
                    map.insert("route_id".into(), json!("no-matched"));
                }
            }
        }
        entry
    }

    fn full(&self) -> bool {
        self.format.is_none()
    }
}

/// A logger plugin: entries to a batch processor.
pub struct Logger {
    pub builder: EntryBuilder,
    pub processor: Arc<Processor>,
}

impl Logger {
    /// The plugin for `conf`, sending through `sender`; the processor is
    /// kept per owner and configuration, so entries of an object keep their
    /// batch across unrelated configuration changes.
    pub fn compile(
        conf: &Value,
        cx: &CompileCx<'_>,
        batch: BatchConf,
        sender: Arc<dyn Sender>,
        no_matched: bool,
    ) -> Result<Arc<dyn Plugin>, String> {
        let builder = EntryBuilder::new(conf, cx.metadata, no_matched)?;
        let processor = cx.state(|| Processor::new(batch, sender));
        Ok(Arc::new(Logger { builder, processor }))
    }

    /// `max_pending_entries` from the plugin metadata.
    pub fn max_pending(cx: &CompileCx<'_>) -> Option<usize> {
        cx.metadata
            .and_then(|m| m.get("max_pending_entries"))
            .and_then(Value::as_u64)
            .map(|n| n as usize)
    }
}

impl Plugin for Logger {
    fn phases(&self) -> Phases {
        if self.builder.include_resp_body {
            Phases::BODY_FILTER | Phases::LOG
        } else {
            Phases::LOG
        }
    }

    fn body_filter(&self, ctx: &mut Ctx, chunk: &mut Bytes, _end: bool) {
        self.builder.collect(ctx, chunk);
    }

    fn log(&self, ctx: &Ctx) {
        self.processor.push_with(|| self.builder.entry(ctx));
    }

    fn reads_request(&self) -> bool {
        self.builder.full()
    }

    fn reads_response_headers(&self) -> bool {
        self.builder.full()
    }

    fn reads_sizes(&self) -> bool {
        self.builder.full()
    }

    fn request_body_bytes(&self) -> usize {
        self.builder.request_body_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn log_format_extra_enriches_the_full_entry() {
        let conf = json!({"log_format_extra": {"client": "$remote_addr", "env": "prod"}});
        let b = EntryBuilder::new(&conf, None, true).expect("builder");
        let mut ctx = testing::ctx("10.1.2.3");
        ctx.route_id = Some("r".into());
        let e = b.entry(&ctx);
        assert_eq!(e["client"], "10.1.2.3");
        assert_eq!(e["env"], "prod");
        assert_eq!(e["route_id"], "r");
        assert!(e["request"].is_object() && e["latency"].is_number(), "{e}");
        // The metadata's applies when the plugin has none; a log_format wins.
        let meta = json!({"log_format_extra": {"m": "1"}});
        let b = EntryBuilder::new(&json!({}), Some(&meta), false).expect("builder");
        assert_eq!(b.entry(&ctx)["m"], "1");
        let b = EntryBuilder::new(
            &json!({"log_format": {"a": "$remote_addr"}, "log_format_extra": {"x": "y"}}),
            None,
            false,
        )
        .expect("builder");
        assert_eq!(b.entry(&ctx), json!({"a": "10.1.2.3", "route_id": "r"}));
    }
}
