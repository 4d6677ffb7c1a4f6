//! The Admin API's operations on a [`Store`], independent of HTTP.
//!
//! Every operation answers with the status and JSON envelope APISIX gives
//! (`{"key":...,"value":...}`, `{"list":[...],"total":N}`,
//! `{"deleted":"1","key":...}`), or an [`AdminError`]. Nothing is written
//! unless the whole new object is valid, so a rejected request leaves the
//! stored and the running configuration as they were.

use std::time::{SystemTime, UNIX_EPOCH};

use http::StatusCode;
use serde_json::{json, Map, Value};

use crate::error::AdminError;
use crate::model::id_text;
use crate::resource::Kind;
use crate::store::{Entry, Store};
use crate::validate::{self, Lookup};

/// Fields a client may not set: the gateway keeps them.
const FORBIDDEN: &[&str] = &["create_time", "update_time"];
/// Compiled-size cap for `name`/`uri` list filters (they come from clients).
const LIST_FILTER_REGEX_LIMIT: usize = 1 << 20;
/// `page_size` bounds for paged lists.
const PAGE_SIZE_RANGE: std::ops::RangeInclusive<usize> = 10..=500;

/// A successful answer.
pub type Reply = (StatusCode, Value);

struct StoreLookup<'a>(&'a dyn Store);

impl Lookup for StoreLookup<'_> {
    fn exists(&self, kind: Kind, id: &str) -> bool {
        matches!(self.0.get(&kind.key(id)), Ok(Some(_)))
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn single(entry: &Entry) -> Value {
    json!({ "key": entry.key, "value": entry.value })
}

fn with_indexes(entry: &Entry) -> Value {
    json!({
        "key": entry.key,
        "value": entry.value,
        "createdIndex": entry.created_index,
        "modifiedIndex": entry.modified_index,
    })
}

fn forbid_client_timestamps(conf: &Value) -> Result<(), AdminError> {
    if let Value::Object(map) = conf {
        for name in FORBIDDEN {
            if map.contains_key(*name) {
                // APISIX joins with two spaces here; kept for compatibility.
                return Err(AdminError::bad_request(format!(
                    "the property is forbidden:  {name}"
                )));
            }
        }
    }
    Ok(())
}

/// Sets timestamps (keeping the stored `create_time`), validates and writes.
fn store_checked(
    store: &dyn Store,
    kind: Kind,
    id: &str,
    mut conf: Value,
    previous: Option<&Entry>,
) -> Result<Reply, AdminError> {
    integral_numbers(&mut conf);
    validate::check(kind, &conf, &StoreLookup(store)).map_err(AdminError::bad_request)?;
    let t = now();
    if let Value::Object(map) = &mut conf {
        let created = previous
            .and_then(|p| p.value.get("create_time").cloned())
            .unwrap_or_else(|| json!(t));
        map.insert("create_time".into(), created);
        map.insert("update_time".into(), json!(t));
    }
    let outcome = store.put(&kind.key(id), &conf)?;
    let status = if outcome.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, single(&outcome.entry)))
}

/// Turns whole-number floats (`1.0`) into integers, as Lua does not tell
/// them apart: APISIX accepts `"priority": 1.0` or `"weight": 2.0`.
fn integral_numbers(v: &mut Value) {
    match v {
        Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64() {
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    *v = json!(f as i64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_numbers),
        Value::Object(map) => map.values_mut().for_each(integral_numbers),
        _ => {}
    }
}

fn missing_id(kind: Kind) -> AdminError {
    AdminError::bad_request(format!("missing {} id", kind.label()))
}

/// `PUT /apisix/admin/{kind}[/{id}]`.
pub fn put(
    store: &dyn Store,
    kind: Kind,
    url_id: Option<&str>,
    conf: Option<Value>,
) -> Result<Reply, AdminError> {
    let mut conf = conf.ok_or_else(|| AdminError::bad_request("missing configurations"))?;
    let body_id = conf.get("id").and_then(id_text);
    let id = match (url_id, &body_id) {
        (Some(u), Some(b)) if u != b => {
            return Err(AdminError::bad_request(format!(
                "wrong {} id",
                kind.label()
            )))
        }
        (Some(u), _) => u.to_string(),
        (None, Some(b)) => b.clone(),
        (None, None) => return Err(missing_id(kind)),
    };
    forbid_client_timestamps(&conf)?;
    if let Value::Object(map) = &mut conf {
        // A body id is kept as sent (APISIX keeps `"id": 1`).
        map.entry("id").or_insert_with(|| Value::String(id.clone()));
    }
    let previous = if validate_id_text(&id) {
        store.get(&kind.key(&id))?
    } else {
        None
    };
    store_checked(store, kind, &id, conf, previous.as_ref())
}

fn validate_id_text(id: &str) -> bool {
    !id.is_empty() && !id.contains('/')
}

/// `POST /apisix/admin/{kind}`: creates with a generated id.
pub fn post(store: &dyn Store, kind: Kind, conf: Option<Value>) -> Result<Reply, AdminError> {
    if !kind.allows_post() {
        return Err(AdminError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("not supported `POST` method for {}", kind.label()),
        ));
    }
    let mut conf = conf.ok_or_else(|| AdminError::bad_request("missing configurations"))?;
    if conf.get("id").is_some() {
        return Err(AdminError::bad_request(format!(
            "wrong {} id, do not need it",
            kind.label()
        )));
    }
    forbid_client_timestamps(&conf)?;
    // Like etcd's push: the zero-padded revision the object is created at.
    let mut next = store.revision()? + 1;
    let id = loop {
        let candidate = format!("{next:020}");
        if store.get(&kind.key(&candidate))?.is_none() {
            break candidate;
        }
        next += 1;
    };
    if let Value::Object(map) = &mut conf {
        map.insert("id".into(), Value::String(id.clone()));
    }
    store_checked(store, kind, &id, conf, None)
}

/// `GET /apisix/admin/{kind}/{id}`.
pub fn get(store: &dyn Store, kind: Kind, id: &str) -> Result<Reply, AdminError> {
    match store.get(&kind.key(id))? {
        Some(entry) => Ok((StatusCode::OK, with_indexes(&entry))),
        None => Err(AdminError::key_not_found()),
    }
}

/// Query arguments of a list request.
#[derive(Debug, Default, Clone)]
pub struct ListQuery {
    pub page: Option<usize>,
    pub page_size: Option<usize>,
    pub name: Option<String>,
    pub label: Option<String>,
    pub uri: Option<String>,
    /// `filter=service_id%3D1` style filter (`field=value`).
    pub filter: Option<(String, String)>,
}

/// `GET /apisix/admin/{kind}`.
pub fn list(store: &dyn Store, kind: Kind, q: &ListQuery) -> Result<Reply, AdminError> {
    if let Some(size) = q.page_size {
        if !PAGE_SIZE_RANGE.contains(&size) {
            return Err(AdminError::bad_request(
                "page_size must be between 10 and 500",
            ));
        }
    }
    // APISIX matches `name` and `uri` as regular expressions.
    let pattern = |p: &Option<String>| -> Result<Option<regex::Regex>, AdminError> {
        p.as_deref()
            .map(|p| {
                regex::RegexBuilder::new(p)
                    .size_limit(LIST_FILTER_REGEX_LIMIT)
                    .build()
                    .map_err(|e| AdminError::bad_request(format!("invalid filter: {e}")))
            })
            .transpose()
    };
    let (name_re, uri_re) = (pattern(&q.name)?, pattern(&q.uri)?);
    let entries = store.list(&kind.prefix())?;
    let matches = |e: &Entry| {
        let v = &e.value;
        let text = |f: &str| v.get(f).and_then(Value::as_str).unwrap_or_default();
        name_re.as_ref().is_none_or(|re| re.is_match(text("name")))
            && uri_re.as_ref().is_none_or(|re| {
                re.is_match(text("uri"))
                    || v.get("uris").and_then(Value::as_array).is_some_and(|l| {
                        l.iter().any(|x| x.as_str().is_some_and(|s| re.is_match(s)))
                    })
            })
            && q.label.as_ref().is_none_or(|l| {
                let (k, val) = l.split_once(':').unwrap_or((l.as_str(), ""));
                v.get("labels")
                    .and_then(|m| m.get(k))
                    .and_then(Value::as_str)
                    .is_some_and(|x| val.is_empty() || x == val)
            })
            && q.filter
                .as_ref()
                .is_none_or(|(f, want)| v.get(f).and_then(id_text).is_some_and(|x| &x == want))
    };
    let mut filtered: Vec<&Entry> = entries.iter().filter(|e| matches(e)).collect();
    // APISIX lists in creation order.
    filtered.sort_by_key(|e| e.created_index);
    let total = filtered.len();
    let list: Vec<Value> = match (q.page, q.page_size) {
        (Some(page), Some(size)) => filtered
            .into_iter()
            .skip(page.max(1).saturating_sub(1).saturating_mul(size))
            .take(size)
            .map(with_indexes)
            .collect(),
        _ => filtered.into_iter().map(with_indexes).collect(),
    };
    Ok((StatusCode::OK, json!({ "list": list, "total": total })))
}

/// RFC 7396 merge: objects merge recursively, `null` removes, everything
/// else (arrays included) replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// Replaces the value at `a/b/c` inside `target`, creating objects on the way.
fn set_at_path(target: &mut Value, path: &str, value: Value) -> Result<(), AdminError> {
    let mut cur = target;
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let Some((last, init)) = parts.split_last() else {
        *cur = value;
        return Ok(());
    };
    for p in init {
        let Value::Object(map) = cur else {
            return Err(AdminError::bad_request("invalid configuration"));
        };
        cur = map
            .entry((*p).to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    match cur {
        Value::Object(map) => {
            if value.is_null() {
                map.remove(*last);
            } else {
                map.insert((*last).to_string(), value);
            }
            Ok(())
        }
        _ => Err(AdminError::bad_request("invalid configuration")),
    }
}

/// `PATCH /apisix/admin/{kind}/{id}[/{sub_path}]`.
pub fn patch(
    store: &dyn Store,
    kind: Kind,
    id: Option<&str>,
    sub_path: Option<&str>,
    conf: Option<Value>,
) -> Result<Reply, AdminError> {
    let id = id.ok_or_else(|| missing_id(kind))?;
    let conf = conf.ok_or_else(|| AdminError::bad_request("missing new configuration"))?;
    let existing = store
        .get(&kind.key(id))?
        .ok_or_else(AdminError::key_not_found)?;
    let mut merged = existing.value.clone();
    match sub_path.filter(|p| !p.is_empty()) {
        Some(path) => set_at_path(&mut merged, path, conf)?,
        None => {
            if !conf.is_object() {
                return Err(AdminError::bad_request(
                    "invalid configuration: wrong type: expected object",
                ));
            }
            merge_patch(&mut merged, &conf)
        }
    }
    if let Some(body_id) = merged.get("id").and_then(id_text) {
        if body_id != id {
            return Err(AdminError::bad_request(format!(
                "wrong {} id",
                kind.label()
            )));
        }
    }
    store_checked(store, kind, id, merged, Some(&existing))
}

/// Routes (and services) still referring to `/apisix/{kind}/{id}`.
fn users_of(
    store: &dyn Store,
    field: &str,
    id: &str,
    user_kinds: &[Kind],
) -> Result<Option<(Kind, String)>, AdminError> {
    for kind in user_kinds {
        for entry in store.list(&kind.prefix())? {
            if entry.value.get(field).and_then(id_text).as_deref() == Some(id) {
                let user_id = Kind::parse_key(&entry.key)
                    .map(|(_, i)| i.to_string())
                    .unwrap_or_default();
                return Ok(Some((*kind, user_id)));
            }
        }
    }
    Ok(None)
}

/// `DELETE /apisix/admin/{kind}/{id}[?force=true]`.
pub fn delete(
    store: &dyn Store,
    kind: Kind,
    id: Option<&str>,
    force: bool,
) -> Result<Reply, AdminError> {
    let id = id.ok_or_else(|| missing_id(kind))?;
    let key = kind.key(id);
    if !force {
        let in_use = match kind {
            Kind::Upstreams => users_of(store, "upstream_id", id, &[Kind::Routes, Kind::Services])?
                .map(|(k, u)| {
                    format!(
                        "can not delete this upstream, {} [{u}] is still using it now",
                        k.label()
                    )
                }),
            Kind::Services => users_of(store, "service_id", id, &[Kind::Routes])?.map(|(k, u)| {
                format!(
                    "can not delete this service directly, {} [{u}] is still using it now",
                    k.label()
                )
            }),
            _ => None,
        };
        if let Some(msg) = in_use {
            if store.get(&key)?.is_some() {
                return Err(AdminError::bad_request(msg));
            }
        }
    }
    match store.delete(&key)? {
        Some(_) => Ok((StatusCode::OK, json!({ "deleted": "1", "key": key }))),
        None => Err(AdminError::key_not_found()),
    }
}

#[cfg(test)]
mod tests;
