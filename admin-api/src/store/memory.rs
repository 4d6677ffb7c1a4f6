//! An in-memory [`Store`]: nothing survives a restart. For tests and for
//! configurations that are loaded whole at start (standalone mode).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;

use super::{
    done, entries_below, BatchOp, Change, Entry, Event, PutOutcome, Store, StoreError, Watcher,
    Watchers, WriteFuture,
};

#[derive(Default)]
struct Inner {
    objects: BTreeMap<String, Entry>,
    revision: u64,
}

/// A [`Store`] kept in memory only.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    watchers: Watchers,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// [`Store::put`], done before it returns.
    pub fn put_now(
        &self,
        key: &str,
        value: &Value,
        expect_modified: Option<u64>,
    ) -> Result<PutOutcome, StoreError> {
        // Hold the lock while notifying so watchers see commit order.
        let mut inner = self.lock();
        let previous = inner
            .objects
            .get(key)
            .map(|e| (e.created_index, e.modified_index));
        if expect_modified.is_some() && previous.map(|p| p.1) != expect_modified {
            return Err(StoreError::Conflict);
        }
        inner.revision += 1;
        let revision = inner.revision;
        let entry = Entry {
            key: key.to_string(),
            value: value.clone(),
            created_index: previous.map_or(revision, |p| p.0),
            modified_index: revision,
        };
        inner.objects.insert(key.to_string(), entry.clone());
        self.watchers.notify(&Change::Events {
            events: &[Event::Put(entry.clone())],
            revision,
        });
        Ok(PutOutcome {
            entry,
            created: previous.is_none(),
        })
    }

    /// [`Store::apply`], done before it returns.
    pub fn apply_now(&self, ops: &[BatchOp]) -> Result<Vec<Event>, StoreError> {
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
                BatchOp::DeletePrefix { prefix } => {
                    let keys: Vec<String> = entries_below(&inner.objects, prefix)
                        .into_iter()
                        .map(|e| e.key)
                        .collect();
                    for key in keys {
                        inner.objects.remove(&key);
                        inner.revision += 1;
                        events.push(Event::Delete { key });
                    }
                }
            }
        }
        self.watchers.notify(&Change::Events {
            events: &events,
            revision: inner.revision,
        });
        Ok(events)
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        Ok(self.lock().objects.get(key).cloned())
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        Ok(entries_below(&self.lock().objects, prefix))
    }

    fn revision(&self) -> Result<u64, StoreError> {
        Ok(self.lock().revision)
    }

    fn put(
        &self,
        key: &str,
        value: Value,
        expect_modified: Option<u64>,
    ) -> WriteFuture<'_, PutOutcome> {
        done(self.put_now(key, &value, expect_modified))
    }

    fn apply(&self, ops: Vec<BatchOp>) -> WriteFuture<'_, Vec<Event>> {
        done(self.apply_now(&ops))
    }

    fn next_id(&self) -> WriteFuture<'_, u64> {
        done(Ok(self.lock().revision + 1))
    }

    fn subscribe(&self, watcher: Arc<dyn Watcher>) -> Result<(), StoreError> {
        // Under the lock: no change can slip between the contents and the
        // registration.
        let inner = self.lock();
        let entries: Vec<Entry> = inner.objects.values().cloned().collect();
        watcher.on_change(&Change::Reset {
            entries: &entries,
            revision: inner.revision,
        });
        self.watchers.add(watcher);
        Ok(())
    }
}
