//! `file-logger`: each request's log entry as one JSON line in a file.
//!
//! Mirrors APISIX 3.18's plugin (priority 399; log phase, body_filter
//! with `include_resp_body`):
//!
//! ```json
//! {"path": "logs/file.log", "match": [[["status", ">=", 500]]]}
//! ```
//!
//! - `path`, else `plugin_metadata/file-logger`'s `path` (relative paths
//!   from the gateway's working directory, its prefix); `log_format` as
//!   the other loggers (see [`crate::log_entry`]).
//! - `match`: a list of `vars` expressions; an entry is written only when
//!   one of them holds.
//! - Lines are appended by a background task within a second, a whole
//!   batch per write, the file (and its directory) created when missing and
//!   opened for each batch: a file renamed by logrotate is simply created
//!   again. A request never waits on the disk.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use crate::batch::{BatchConf, Processor, SendFuture, Sender, DEFAULT_MAX_PENDING};
use crate::ctx::Ctx;
use crate::expr::Expr;
use crate::logger::{self, EntryBuilder};
use crate::plugin::{CompileCx, Phases, Plugin, PluginSpec, SchemaType};
use crate::registry::cached;
use crate::schema::Schema;

pub const NAME: &str = "file-logger";
pub const PRIORITY: i32 = 399;

fn build_schema() -> Schema {
    let schema = Schema::object().prop("path", Schema::string().done()).prop(
        "match",
        Schema::array(Schema::array(Schema::Any).done())
            .max(20)
            .done(),
    );
    logger::common_schema(schema).done()
}

/// The configuration schema.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_schema)
}

fn build_metadata_schema() -> Schema {
    Schema::object()
        .prop("path", Schema::string().done())
        .prop("log_format", Schema::object().done())
        .prop("log_format_extra", Schema::object().done())
        .done()
}

/// The `plugin_metadata` schema.
pub fn metadata_schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_metadata_schema)
}

/// Compiles `match`: one expression per element.
fn compile_match(conf: &Value) -> Result<Vec<Expr>, String> {
    let Some(list) = conf.get("match").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|m| {
            crate::expr::compile(m)
                .map_err(|e| format!("failed to validate the 'match' expression: {e}"))
        })
        .collect()
}

struct FileSender {
    path: PathBuf,
}

impl Sender for FileSender {
    fn send(&self, entries: Vec<Value>) -> SendFuture {
        let path = self.path.clone();
        Box::pin(async move {
            let mut text = String::new();
            for e in &entries {
                text.push_str(&e.to_string());
                text.push('\n');
            }
            let write = tokio::task::spawn_blocking(move || {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    let _ = std::fs::create_dir_all(dir);
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .and_then(|mut f| f.write_all(text.as_bytes()))
                    .map_err(|e| {
                        format!("failed to write file: {}, error info: {e}", path.display())
                    })
            });
            write.await.map_err(|e| e.to_string())?
        })
    }
}

/// The compiled plugin.
pub struct FileLogger {
    builder: EntryBuilder,
    matches: Vec<Expr>,
    processor: Arc<Processor>,
}

impl Plugin for FileLogger {
    fn phases(&self) -> Phases {
        Phases::BODY_FILTER | Phases::LOG
    }

    fn body_filter(&self, ctx: &mut Ctx, chunk: &mut Bytes, _end: bool) {
        self.builder.collect(ctx, chunk);
    }

    fn log(&self, ctx: &Ctx) {
        if !self.matches.is_empty() && !self.matches.iter().any(|m| m.eval(&ctx.vars(None))) {
            return;
        }
        self.processor.push_with(|| self.builder.entry(ctx));
    }

    fn reads_request(&self) -> bool {
        true
    }

    fn reads_response_headers(&self) -> bool {
        true
    }

    fn reads_sizes(&self) -> bool {
        true
    }

    fn request_body_bytes(&self) -> usize {
        self.builder.request_body_bytes()
    }
}

/// The registry entry.
pub struct FileLoggerSpec;

impl PluginSpec for FileLoggerSpec {
    fn name(&self) -> &'static str {
        NAME
    }

    fn priority(&self) -> i32 {
        PRIORITY
    }

    fn schema(&self) -> &'static Schema {
        schema()
    }

    fn metadata_schema(&self) -> Option<&'static Schema> {
        Some(metadata_schema())
    }

    fn check(&self, conf: &Value, target: SchemaType) -> Result<(), String> {
        if target == SchemaType::Metadata {
            return metadata_schema().validate(conf);
        }
        compile_match(conf)?;
        schema().validate(conf)?;
        logger::check(conf)
    }

    fn compile(&self, conf: &Value, cx: &CompileCx<'_>) -> Result<Arc<dyn Plugin>, String> {
        let path = conf
            .get("path")
            .or_else(|| cx.metadata.and_then(|m| m.get("path")))
            .and_then(Value::as_str)
            .ok_or("property \"path\" is not set in either the plugin conf or the metadata")?;
        let batch = BatchConf {
            name: NAME.into(),
            batch_max_size: 1000,
            inactive_timeout: Duration::from_secs(1),
            buffer_duration: Duration::from_secs(1),
            max_retry_count: 0,
            retry_delay: Duration::from_secs(1),
            max_pending: DEFAULT_MAX_PENDING,
        };
        let sender = Arc::new(FileSender {
            path: PathBuf::from(path),
        });
        Ok(Arc::new(FileLogger {
            builder: EntryBuilder::new(conf, cx.metadata, false)?,
            matches: compile_match(conf)?,
            processor: cx.state(|| Processor::new(batch, sender)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use serde_json::json;

    #[test]
    fn schema_and_match() {
        assert!(FileLoggerSpec
            .check(
                &json!({"path": "x.log", "match": [[["status", ">=", 500]]]}),
                SchemaType::Route
            )
            .is_ok());
        let err = testing::refusal(NAME, &json!({"path": 1}));
        assert!(err.contains("path"), "{err}");
        let err = testing::refusal(
            NAME,
            &json!({"path": "x", "match": [[["status", "bad", 1]]]}),
        );
        assert!(err.contains("'match' expression"), "{err}");
    }

    #[tokio::test]
    async fn writes_json_lines_in_batches() {
        let dir = std::env::temp_dir().join(format!("file-logger-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("f.log");
        let sender = FileSender { path: path.clone() };
        sender
            .send(vec![json!({"a": 1}), json!({"b": 2})])
            .await
            .expect("written");
        sender.send(vec![json!({"c": 3})]).await.expect("written");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, "{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
