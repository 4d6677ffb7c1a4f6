//! The key limit-req and limit-conn count by: `key_type` `var` (`key` is a
//! variable name, such as `remote_addr` or `http_x_api_user`) or
//! `var_combination` (`key` is a `$var` template). A variable the request
//! does not have, or a combination that resolves none, falls back to the
//! client address, as in APISIX.

use std::borrow::{Borrow, Cow};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

use http::request;
use serde_json::Value;

use crate::ctx::Ctx;
use crate::template::{Escape, Template};

/// A compiled `key`/`key_type`.
pub enum LimitKey {
    Var(String),
    Combination(Template),
}

impl LimitKey {
    /// From a checked configuration's `key` and `key_type`.
    pub fn compile(conf: &Value) -> LimitKey {
        let key = conf
            .get("key")
            .and_then(Value::as_str)
            .unwrap_or("remote_addr");
        match conf.get("key_type").and_then(Value::as_str) {
            Some("var_combination") => LimitKey::Combination(Template::new(key)),
            _ => LimitKey::Var(key.to_string()),
        }
    }

    /// This request's key.
    pub fn resolve<'a>(&'a self, ctx: &'a Ctx, req: &'a request::Parts) -> Cow<'a, str> {
        let found = match self {
            LimitKey::Var(name) => ctx.var(Some(req), name),
            LimitKey::Combination(t) => {
                let r = t.render(&ctx.vars(Some(req)), &[], Escape::None);
                (r.resolved > 0).then_some(Cow::Owned(r.text))
            }
        };
        found.unwrap_or_else(|| Cow::Owned(ctx.client_ip.to_string()))
    }
}

/// CRC-32 (IEEE) of `data`, as `ngx.crc32_long`.
fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for b in data {
        crc = TABLE[((crc ^ u32::from(*b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// `value` as JSON with object keys in order, so equal configurations
/// encode alike whatever order they were written in.
fn stable_json(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                if let Some(v) = map.get(k) {
                    stable_json(v, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                stable_json(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// APISIX's plugin-level `conf_version`: the CRC-32 of the configuration
/// encoded with sorted keys. Every node computes the same one for the same
/// configuration, so nodes sharing a Redis share counters.
pub fn conf_version(conf: &Value) -> u32 {
    let mut text = String::new();
    stable_json(conf, &mut text);
    crc32(text.as_bytes())
}

/// The start of a counter key in a shared store, as APISIX's
/// `gen_limit_key`: `{resource key}:{conf_version}:` (the resource key being
/// the object's key under `/apisix`, such as `/apisix/routes/1`).
pub fn remote_key_prefix(owner: &str, conf: &Value) -> String {
    format!("/apisix/{owner}:{}:", conf_version(conf))
}

/// What the local state of one limit plugin instance (limit-count's
/// windows, limit-req's buckets) may hold, keys included: APISIX's
/// `lua_shared_dict plugin-limit-count` and `plugin-limit-req` are 10 MiB
/// each. Keys come from requests (`remote_addr`, a header, a combination),
/// so a client rotating them must not grow the map without end: past this,
/// live entries are evicted (any of them, as the shared dictionary evicts
/// its least recently used), which starts their keys' counts over.
pub const LOCAL_STATE_BYTES: usize = 10 << 20;

/// An entry's share of [`LOCAL_STATE_BYTES`]: its key, its state and the
/// map's bookkeeping.
pub fn entry_bytes(key: &str) -> usize {
    key.len() + 64
}

/// Evicts entries of `map`, which holds `bytes` by [`entry_bytes`], until
/// `need` more fit under `max`. Never a pass over the whole map: it takes
/// the first entries the map finds.
pub fn make_room<K, V, S>(map: &mut HashMap<K, V, S>, bytes: &mut usize, need: usize, max: usize)
where
    K: Borrow<str> + Hash + Eq + Clone,
    S: BuildHasher,
{
    while *bytes + need > max {
        let Some(victim) = map.keys().next().cloned() else {
            break;
        };
        map.remove(victim.borrow());
        *bytes = bytes.saturating_sub(entry_bytes(victim.borrow()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn conf_version_ignores_key_order() {
        let a: Value = serde_json::from_str(r#"{"count":2,"time_window":60}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"time_window":60,"count":2}"#).unwrap();
        assert_eq!(conf_version(&a), conf_version(&b));
        assert_ne!(
            conf_version(&a),
            conf_version(&json!({"count": 3, "time_window": 60}))
        );
        assert_eq!(
            remote_key_prefix("routes/1", &a),
            format!("/apisix/routes/1:{}:", conf_version(&a))
        );
    }
}
