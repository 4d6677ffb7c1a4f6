//! `ssls` objects: APISIX's schema and the certificate checks it runs after.

use std::sync::OnceLock;

use plugins::schema::Schema;
use serde_json::Value;

/// The schema of an ssl object.
pub fn schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    CELL.get_or_init(|| Schema::object().done())
}

/// The checks after the schema; `Err` is the `error_msg` of a 400.
pub fn check(_conf: &Value) -> Result<(), String> {
    Ok(())
}
