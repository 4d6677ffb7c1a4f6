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
use crate::resource::{credential_parts, IdSource, Kind};
use crate::store::{BatchOp, Entry, Stamp, Store, KEY_PREFIX};
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

    fn get(&self, kind: Kind, id: &str) -> Option<Value> {
        self.0.get(&kind.key(id)).ok().flatten().map(|e| e.value)
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A key as the back end spells it (APISIX shows etcd's own keys, so a
/// `deployment.etcd.prefix` of `/edge` answers `"key": "/edge/routes/1"`).
fn public_key(store: &dyn Store, key: &str) -> String {
    match key.strip_prefix(KEY_PREFIX) {
        Some(rest) if store.prefix() != KEY_PREFIX => format!("{}{rest}", store.prefix()),
        _ => key.to_string(),
    }
}

fn single(store: &dyn Store, entry: &Entry) -> Value {
    json!({ "key": public_key(store, &entry.key), "value": entry.value })
}

fn with_indexes(store: &dyn Store, entry: &Entry) -> Value {
    json!({
        "key": public_key(store, &entry.key),
        "value": entry.value,
        "createdIndex": entry.created_index,
        "modifiedIndex": entry.modified_index,
    })
}

/// What GET shows of a stored object: an ssl object without its private
/// keys (`key`, `keys`), as APISIX answers ("not return private key for
/// security").
fn shown(store: &dyn Store, kind: Kind, entry: &Entry) -> Value {
    let mut shown = with_indexes(store, entry);
    if kind == Kind::Ssls {
        if let Some(Value::Object(value)) = shown.get_mut("value") {
            value.remove("key");
            value.remove("keys");
        }
    }
    shown
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

/// Sets timestamps (keeping `previous`'s `create_time`), validates and
/// writes. With `conditional`, the write only lands if `previous` is still
/// the stored object (PATCH merged into it); a race answers 503 as in APISIX.
async fn store_checked(
    store: &dyn Store,
    kind: Kind,
    id: &str,
    mut conf: Value,
    previous: Option<&Stamp>,
    conditional: bool,
) -> Result<Reply, AdminError> {
    if nested_deeper_than(&conf, MAX_DEPTH) {
        return Err(too_deep());
    }
    integral_numbers(&mut conf);
    if !validate_id_text(kind, id) {
        return Err(AdminError::bad_request(
            "invalid configuration: property \"id\" validation failed: object matches none of the required",
        ));
    }
    validate::check(kind, &conf, &StoreLookup(store)).map_err(AdminError::bad_request)?;
    duplicate_key(store, kind, id, &conf)?;
    let t = now();
    if let Value::Object(map) = &mut conf {
        let created = previous
            .and_then(|p| p.create_time.clone())
            .unwrap_or_else(|| json!(t));
        map.insert("create_time".into(), created);
        map.insert("update_time".into(), json!(t));
    }
    let expect = previous.filter(|_| conditional).map(|p| p.modified_index);
    let outcome = store.put(&kind.key(id), conf, expect).await?;
    let status = if outcome.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, single(store, &outcome.entry)))
}

/// How deeply a stored object may nest. A request body is parsed to at
/// most 127 levels (serde_json's limit), and the store wraps each object in
/// a record one level deeper, whose reading back shares the limit: an object
/// of 127 levels would be stored and never read again (its key unreadable,
/// the gateway unable to start on it). A PATCH sub-path adds levels the body
/// did not have.
const MAX_DEPTH: usize = 100;

fn too_deep() -> AdminError {
    AdminError::bad_request(format!(
        "invalid configuration: nested deeper than {MAX_DEPTH} levels"
    ))
}

/// Whether `v` nests deeper than `max` levels (a scalar is one level).
/// Walked with a stack of its own, not by recursion.
fn nested_deeper_than(v: &Value, max: usize) -> bool {
    let mut todo = vec![(v, 1usize)];
    while let Some((v, depth)) = todo.pop() {
        if depth > max {
            return true;
        }
        match v {
            Value::Array(items) => todo.extend(items.iter().map(|i| (i, depth + 1))),
            Value::Object(map) => todo.extend(map.values().map(|i| (i, depth + 1))),
            _ => {}
        }
    }
    false
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

/// 405 `not supported `METHOD` method for KIND`.
pub fn not_supported(method: &str, kind: Kind) -> AdminError {
    AdminError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("not supported `{method}` method for {}", kind.label()),
    )
}

fn missing_id(kind: Kind) -> AdminError {
    AdminError::bad_request(format!("missing {} id", kind.label()))
}

/// `PUT /apisix/admin/{kind}[/{id}]`.
pub async fn put(
    store: &dyn Store,
    kind: Kind,
    url_id: Option<&str>,
    conf: Option<Value>,
) -> Result<Reply, AdminError> {
    let mut conf = conf.ok_or_else(|| AdminError::bad_request("missing configurations"))?;
    let id = match kind.info().id {
        IdSource::Id => {
            let body_id = conf.get("id").and_then(id_text);
            let id = match (url_id, &body_id) {
                (Some(u), Some(b)) if u != b && kind != Kind::Credentials => {
                    return Err(AdminError::bad_request(format!(
                        "wrong {} id",
                        kind.label()
                    )))
                }
                (Some(u), _) => u.to_string(),
                (None, Some(b)) => b.clone(),
                (None, None) => return Err(missing_id(kind)),
            };
            if let Value::Object(map) = &mut conf {
                // A body id is kept as sent (APISIX keeps `"id": 1`).
                let short = match kind {
                    Kind::Credentials => credential_parts(&id).map_or(id.as_str(), |(_, c)| c),
                    _ => id.as_str(),
                };
                map.entry("id")
                    .or_insert_with(|| Value::String(short.to_string()));
            }
            id
        }
        IdSource::Username => {
            // Schema errors (a missing username) come before the name check.
            validate::schema_of(kind)
                .validate(&conf)
                .map_err(|e| AdminError::bad_request(format!("invalid configuration: {e}")))?;
            let name = conf
                .get("username")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if url_id.is_some_and(|u| u != name) {
                return Err(AdminError::bad_request("wrong username"));
            }
            name
        }
        IdSource::PluginName => {
            let name = url_id.ok_or_else(|| AdminError::bad_request("missing plugin name"))?;
            if let Value::Object(map) = &mut conf {
                map.insert("id".into(), Value::String(name.to_string()));
            }
            name.to_string()
        }
    };
    forbid_client_timestamps(&conf)?;
    if kind == Kind::Credentials {
        let consumer = credential_parts(&id).map(|(c, _)| c).unwrap_or_default();
        if store.get(&Kind::Consumers.key(consumer))?.is_none() {
            return Err(AdminError::new(StatusCode::NOT_FOUND, "consumer not found"));
        }
    }
    let previous = if validate_id_text(kind, &id) {
        store.stamp(&kind.key(&id))?
    } else {
        None
    };
    store_checked(store, kind, &id, conf, previous.as_ref(), false).await
}

/// The owner of an auth key another consumer or credential already uses.
fn duplicate_key(store: &dyn Store, kind: Kind, id: &str, conf: &Value) -> Result<(), AdminError> {
    let Some(Value::Object(plugins_conf)) = conf.get("plugins") else {
        return Ok(());
    };
    let (consumer, credential) = match kind {
        Kind::Consumers => (id, None),
        Kind::Credentials => match credential_parts(id) {
            Some((c, cred)) => (c, Some(cred)),
            None => return Ok(()),
        },
        _ => return Ok(()),
    };
    let key_of = |name: &str, conf: &Value| -> Option<(&'static str, String)> {
        let spec = plugins::find(name).filter(|s| s.kind() == plugins::PluginKind::Auth)?;
        let key = conf.get(spec.key_attr())?;
        Some((
            spec.key_attr(),
            key.as_str().map_or_else(|| key.to_string(), str::to_string),
        ))
    };
    let wanted: Vec<(&String, &'static str, String)> = plugins_conf
        .iter()
        .filter_map(|(name, c)| key_of(name, c).map(|(attr, k)| (name, attr, k)))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    for entry in store.list(&Kind::Consumers.prefix())? {
        let Some((owner_kind, owner_id)) = Kind::parse_key(&entry.key) else {
            continue;
        };
        let (owner_consumer, owner_cred) = match owner_kind {
            Kind::Credentials => match credential_parts(owner_id) {
                Some((c, cred)) => (c, Some(cred)),
                None => continue,
            },
            _ => (owner_id, None),
        };
        let is_self = match credential {
            Some(cred) => owner_consumer == consumer && owner_cred == Some(cred),
            None => owner_consumer == consumer,
        };
        if is_self {
            continue;
        }
        let Some(Value::Object(owner_plugins)) = entry.value.get("plugins") else {
            continue;
        };
        for (name, attr, key) in &wanted {
            let taken = owner_plugins
                .get(name.as_str())
                .and_then(|c| key_of(name, c))
                .is_some_and(|(_, k)| &k == key);
            if taken {
                let owner = match owner_cred {
                    Some(cred) => format!("credential: {cred} of consumer: {owner_consumer}"),
                    None => format!("consumer: {owner_consumer}"),
                };
                return Err(AdminError::bad_request(format!(
                    "duplicate {attr} of plugin {name} found with {owner}"
                )));
            }
        }
    }
    Ok(())
}

fn validate_id_text(kind: Kind, id: &str) -> bool {
    !id.is_empty()
        && match kind {
            Kind::Credentials => credential_parts(id).is_some_and(|(c, cred)| {
                !c.is_empty() && !c.contains('/') && !cred.is_empty() && !cred.contains('/')
            }),
            _ => !id.contains('/'),
        }
}

/// `POST /apisix/admin/{kind}`: creates with a generated id.
pub async fn post(store: &dyn Store, kind: Kind, conf: Option<Value>) -> Result<Reply, AdminError> {
    if !kind.allows_post() {
        return Err(not_supported("POST", kind));
    }
    let mut conf = conf.ok_or_else(|| AdminError::bad_request("missing configurations"))?;
    if conf.get("id").is_some() {
        return Err(AdminError::bad_request(format!(
            "wrong {} id, do not need it",
            kind.label()
        )));
    }
    forbid_client_timestamps(&conf)?;
    // Like etcd's push in APISIX: a zero-padded number from the store.
    let mut next = store.next_id().await?;
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
    store_checked(store, kind, &id, conf, None, false).await
}

/// `GET /apisix/admin/{kind}/{id}`.
pub fn get(store: &dyn Store, kind: Kind, id: &str) -> Result<Reply, AdminError> {
    match store.get(&kind.key(id))? {
        Some(entry) => Ok((StatusCode::OK, shown(store, kind, &entry))),
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

/// `GET /apisix/admin/{kind}`; for credentials, `parent` is the consumer.
pub fn list(
    store: &dyn Store,
    kind: Kind,
    parent: Option<&str>,
    q: &ListQuery,
) -> Result<Reply, AdminError> {
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
    let prefix = match (kind, parent) {
        (Kind::Credentials, Some(consumer)) => format!("{}{consumer}/credentials/", kind.prefix()),
        _ => kind.prefix(),
    };
    let mut entries = store.list(&prefix)?;
    // Credentials share the consumers' prefix; each list keeps its own.
    entries.retain(|e| Kind::parse_key(&e.key).is_some_and(|(k, _)| k == kind));
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
            .map(|e| shown(store, kind, e))
            .collect(),
        _ => filtered
            .into_iter()
            .map(|e| shown(store, kind, e))
            .collect(),
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
    // Checked before nesting anything: a value tens of thousands of levels
    // deep could not even be dropped without exhausting the stack.
    if parts.len() >= MAX_DEPTH {
        return Err(too_deep());
    }
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
pub async fn patch(
    store: &dyn Store,
    kind: Kind,
    id: Option<&str>,
    sub_path: Option<&str>,
    conf: Option<Value>,
) -> Result<Reply, AdminError> {
    if !kind.info().patch {
        return Err(not_supported("PATCH", kind));
    }
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
    store_checked(store, kind, id, merged, Some(&Stamp::of(&existing)), true).await
}

/// The first object still referring to `id` of `kind`, as the refusal
/// message for deleting it.
fn in_use(store: &dyn Store, kind: Kind, id: &str) -> Result<Option<String>, AdminError> {
    if kind == Kind::Upstreams {
        if let Some(user) = split_user(store, id)? {
            return Ok(Some(user));
        }
    }
    for reference in kind.info().referenced_by {
        for entry in store.list(&reference.from.prefix())? {
            let Some((from, user)) = Kind::parse_key(&entry.key) else {
                continue;
            };
            if from == reference.from
                && entry
                    .value
                    .get(reference.field)
                    .and_then(id_text)
                    .as_deref()
                    == Some(id)
            {
                return Ok(Some(
                    reference
                        .message
                        .replace("{label}", from.label())
                        .replace("{user}", user),
                ));
            }
        }
    }
    Ok(None)
}

/// The first object whose traffic-split still sends requests to upstream
/// `id`, in APISIX's order and words.
fn split_user(store: &dyn Store, id: &str) -> Result<Option<String>, AdminError> {
    use plugins::traffic_split::{upstream_refs, UpstreamRef, NAME};
    const HOLDERS: [(Kind, &str); 6] = [
        (Kind::Routes, "route"),
        (Kind::Services, "service"),
        (Kind::PluginConfigs, "plugin_config"),
        (Kind::Consumers, "consumer"),
        (Kind::ConsumerGroups, "consumer_group"),
        (Kind::GlobalRules, "global_rules"),
    ];
    for (kind, name) in HOLDERS {
        for entry in store.list(&kind.prefix())? {
            let Some(split) = entry.value.get("plugins").and_then(|p| p.get(NAME)) else {
                continue;
            };
            let names_it = upstream_refs(split)
                .iter()
                .any(|r| matches!(r, UpstreamRef::Id(u) if u == id));
            if let (true, Some((_, user))) = (names_it, Kind::parse_key(&entry.key)) {
                return Ok(Some(format!(
                    "can not delete this upstream, plugin in {name} [{user}] is still using it now"
                )));
            }
        }
    }
    Ok(None)
}

/// `DELETE /apisix/admin/{kind}/{id}[?force=true]`. Deleting a consumer
/// deletes its credentials with it, in the same transaction.
pub async fn delete(
    store: &dyn Store,
    kind: Kind,
    id: Option<&str>,
    force: bool,
) -> Result<Reply, AdminError> {
    let id = id.ok_or_else(|| missing_id(kind))?;
    if !validate_id_text(kind, id) {
        return Err(AdminError::key_not_found());
    }
    let key = kind.key(id);
    if store.get(&key)?.is_none() {
        return Err(AdminError::key_not_found());
    }
    if !force {
        if let Some(msg) = in_use(store, kind, id)? {
            return Err(AdminError::bad_request(msg));
        }
    }
    let mut ops = vec![BatchOp::Delete { key: key.clone() }];
    if kind == Kind::Consumers {
        // Every credential, also those this node has not seen yet: one left
        // behind would come back with its secret if the name is reused.
        ops.push(BatchOp::DeletePrefix {
            prefix: format!("{key}/credentials/"),
        });
    }
    store.apply(ops).await?;
    Ok((
        StatusCode::OK,
        json!({ "deleted": "1", "key": public_key(store, &key) }),
    ))
}

#[cfg(test)]
mod tests;
