//! An in-memory [`Store`]: nothing survives a restart. For tests and for
//! configurations that are loaded whole at start (standalone mode).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use serde_json::Value;

use super::{BatchOp, Entry, Event, PutOutcome, Store, StoreError, Watcher};

#[derive(Default)]
struct Inner {
    objects: BTreeMap<String, Entry>,
    revision: u64,
}

/// A [`Store`] kept in memory only.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    watchers: RwLock<Vec<Arc<dyn Watcher>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        let watchers = self.watchers.read().unwrap_or_else(|p| p.into_inner());
        for w in watchers.iter() {
            w.on_change(events);
        }
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        Ok(self.lock().objects.get(key).cloned())
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        Ok(self
            .lock()
            .objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, e)| e.clone())
            .collect())
    }

    fn put(&self, key: &str, value: &Value) -> Result<PutOutcome, StoreError> {
        // Hold the lock while notifying so watchers see commit order.
        let mut inner = self.lock();
        inner.revision += 1;
        let revision = inner.revision;
        let previous = inner.objects.get(key).map(|e| e.created_index);
        let entry = Entry {
            key: key.to_string(),
            value: value.clone(),
            created_index: previous.unwrap_or(revision),
            modified_index: revision,
        };
        inner.objects.insert(key.to_string(), entry.clone());
        self.notify(&[Event::Put(entry.clone())]);
        Ok(PutOutcome {
            entry,
            created: previous.is_none(),
        })
    }

    fn delete(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let mut inner = self.lock();
        let removed = inner.objects.remove(key);
        if removed.is_some() {
            inner.revision += 1;
            self.notify(&[Event::Delete {
                key: key.to_string(),
            }]);
        }
        Ok(removed)
    }

    fn apply(&self, ops: &[BatchOp]) -> Result<Vec<Event>, StoreError> {
        let mut inner = self.lock();
        let mut events = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                BatchOp::Put { key, value } => {
                    inner.revision += 1;
                    let revision = inner.revision;
                    let created = inner.objects.get(key).map_or(revision, |e| e.created_index);
                    let entry = Entry {
                        key: key.clone(),
                        value: value.clone(),
                        created_index: created,
                        modified_index: revision,
                    };
                    inner.objects.insert(key.clone(), entry.clone());
                    events.push(Event::Put(entry));
                }
                BatchOp::Delete { key } => {
                    if inner.objects.remove(key).is_some() {
                        inner.revision += 1;
                        events.push(Event::Delete { key: key.clone() });
                    }
                }
            }
        }
        self.notify(&events);
        Ok(events)
    }

    fn revision(&self) -> Result<u64, StoreError> {
        Ok(self.lock().revision)
    }

    fn subscribe(&self, watcher: Arc<dyn Watcher>) {
        self.watchers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(watcher);
    }
}
