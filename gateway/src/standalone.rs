//! Standalone mode: routes come from `conf/apisix.yaml` instead of the Admin
//! API (`deployment.role: data_plane`, `config_provider: yaml`).
//!
//! The file holds lists named like the Admin API collections (`routes`,
//! `services`, `upstreams`, `global_rules`, `consumers`, `consumer_groups`,
//! `plugin_configs`, `plugin_metadata`) and must end with a `#END` line,
//! as APISIX requires, so that a half-written file is never loaded. It is
//! checked for changes every [`POLL_INTERVAL`]; a new version replaces the
//! objects whose content changed, all in one batch (one new snapshot). Objects that fail validation are logged and
//! left out; a file that does not parse keeps the previous configuration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use admin_api::resource::IdSource;
use admin_api::store::{BatchOp, MemoryStore, Store, StoreError, KEY_PREFIX};
use admin_api::validate::{self, Lookup};
use admin_api::Kind;

/// How often the file's modification time is checked.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Why the file was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0} does not end with #END yet; not loaded")]
    Incomplete(PathBuf),
    #[error("{0} is not valid YAML: {1}")]
    Yaml(PathBuf, String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct Pending<'a>(&'a BTreeMap<String, Value>);

impl Lookup for Pending<'_> {
    fn exists(&self, kind: Kind, id: &str) -> bool {
        self.0.contains_key(&kind.key(id))
    }

    fn get(&self, kind: Kind, id: &str) -> Option<Value> {
        self.0.get(&kind.key(id)).cloned()
    }
}

/// Reads the file into `key → object`, validated.
pub fn read_objects(path: &Path) -> Result<BTreeMap<String, Value>, StandaloneError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| StandaloneError::Read(path.to_path_buf(), e))?;
    if !text.lines().any(|l| l.trim() == "#END") {
        return Err(StandaloneError::Incomplete(path.to_path_buf()));
    }
    let doc: Value = crate::yaml::parse(&text)
        .map_err(|e| StandaloneError::Yaml(path.to_path_buf(), e.to_string()))?;
    let mut objects = BTreeMap::new();
    // Referenced kinds first, so that reference checks can see them.
    for kind in Kind::ALL {
        if kind == Kind::Credentials {
            continue;
        }
        let Some(items) = doc.get(kind.collection()).and_then(Value::as_array) else {
            continue;
        };
        for (i, item) in items.iter().enumerate() {
            let mut item = item.clone();
            let id = match kind.info().id {
                IdSource::Username => item
                    .get("username")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                _ => item
                    .get("id")
                    .and_then(admin_api::model::id_text)
                    .unwrap_or_else(|| (i + 1).to_string()),
            };
            if let (Value::Object(map), false) = (&mut item, kind == Kind::Consumers) {
                map.entry("id").or_insert_with(|| Value::String(id.clone()));
            }
            match validate::check(kind, &item, &Pending(&objects)) {
                Ok(()) => {
                    objects.insert(kind.key(&id), item);
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), kind = kind.label(), id, error = %e, "object skipped")
                }
            }
        }
    }
    Ok(objects)
}

/// Makes `store` hold exactly `objects`, writing only what changed, as one
/// batch: the data plane goes from the old file to the new one in one
/// snapshot, never through a half-applied mix.
pub fn sync(store: &MemoryStore, objects: &BTreeMap<String, Value>) -> Result<(), StoreError> {
    let mut ops = Vec::new();
    for entry in store.list(&format!("{KEY_PREFIX}/"))? {
        if !objects.contains_key(&entry.key) {
            ops.push(BatchOp::Delete { key: entry.key });
        }
    }
    for (key, value) in objects {
        if store.get(key)?.map(|e| e.value) != Some(value.clone()) {
            ops.push(BatchOp::Put {
                key: key.clone(),
                value: value.clone(),
            });
        }
    }
    if !ops.is_empty() {
        store.apply_now(&ops)?;
    }
    Ok(())
}

/// What tells one version of the file from the next: its modification
/// time, and its inode and size, because a file replaced by a rename within
/// the same clock tick (file times are only as fine as the kernel's coarse
/// clock, a few milliseconds) keeps the old modification time.
fn modified(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.ino(), m.len()))
}

/// Loads the file once (an error if it cannot be loaded) and returns the store.
pub fn load(path: &Path) -> Result<Arc<MemoryStore>, StandaloneError> {
    let store = Arc::new(MemoryStore::new());
    sync(store.as_ref(), &read_objects(path)?)?;
    Ok(store)
}

/// Re-reads the file whenever it changes, until the task is dropped.
pub async fn watch(path: PathBuf, store: Arc<MemoryStore>) {
    let mut seen = modified(&path);
    loop {
        tokio::time::sleep(POLL_INTERVAL).await;
        let now = modified(&path);
        if now == seen {
            continue;
        }
        seen = now;
        let path2 = path.clone();
        let store2 = store.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<usize, StandaloneError> {
            let objects = read_objects(&path2)?;
            sync(store2.as_ref(), &objects)?;
            Ok(objects.len())
        })
        .await;
        match result {
            Ok(Ok(n)) => {
                tracing::info!(file = %path.display(), objects = n, "standalone configuration reloaded")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "standalone configuration kept as it was"),
            Err(e) => tracing::error!(error = %e, "standalone reload task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_apisix_example_file() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/apisix-examples/apisix.yaml");
        let objects = read_objects(&path).unwrap();
        let route = &objects["/apisix/routes/1"];
        assert_eq!(route["uri"], "/hello");
    }

    #[test]
    fn incomplete_file_is_not_loaded_and_invalid_objects_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("apisix.yaml");
        std::fs::write(
            &path,
            "routes:\n  - uri: /a\n    upstream:\n      nodes:\n        \"127.0.0.1:1\": 1\n",
        )
        .unwrap();
        assert!(matches!(
            read_objects(&path),
            Err(StandaloneError::Incomplete(_))
        ));
        std::fs::write(
            &path,
            "routes:\n  - id: ok\n    uri: /a\n    upstream:\n      nodes:\n        \"127.0.0.1:1\": 1\n  - id: bad\n    uri: 5\n#END\n",
        )
        .unwrap();
        let objects = read_objects(&path).unwrap();
        assert!(objects.contains_key("/apisix/routes/ok"));
        assert!(!objects.contains_key("/apisix/routes/bad"));
        let store = MemoryStore::new();
        sync(&store, &objects).unwrap();
        let rev = store.revision().unwrap();
        sync(&store, &objects).unwrap();
        assert_eq!(
            store.revision().unwrap(),
            rev,
            "unchanged objects are not rewritten"
        );
    }
}
