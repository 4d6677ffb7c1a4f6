//! Where Admin API objects live.
//!
//! Objects are kept one key per object in APISIX's etcd layout
//! (`/apisix/routes/1`), each with the revision that created it and the one
//! that last changed it. A [`Store`] is small on purpose: get, list by prefix,
//! put, delete and change notification. [`RedbStore`] is the embedded default;
//! other back ends (a standalone YAML file, etcd) implement the same trait and
//! the data plane does not notice.

mod memory;
mod redb_store;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use memory::MemoryStore;
pub use redb_store::RedbStore;

/// One stored object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub key: String,
    pub value: Value,
    pub created_index: u64,
    pub modified_index: u64,
}

/// What a put did.
#[derive(Debug, Clone)]
pub struct PutOutcome {
    pub entry: Entry,
    /// True when the key did not exist before (APISIX answers 201 then).
    pub created: bool,
}

/// A committed change, in commit order.
#[derive(Debug, Clone)]
pub enum Event {
    Put(Entry),
    Delete { key: String },
}

/// One write of a batch.
#[derive(Debug, Clone)]
pub enum BatchOp {
    Put { key: String, value: Value },
    Delete { key: String },
}

/// Told of every committed change, synchronously and in order, before the
/// write that caused it returns. A batch arrives as one call, so a watcher
/// never sees it half-applied. A watcher must not call back into the store.
pub trait Watcher: Send + Sync {
    fn on_change(&self, events: &[Event]);
}

/// Why the store could not do what was asked. Never caused by user input.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store backend: {0}")]
    Backend(String),
    #[error("stored object {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
}

impl StoreError {
    pub(crate) fn backend(e: impl std::fmt::Display) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// A transactional key/value store of Admin API objects.
pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError>;
    /// Every entry whose key starts with `prefix`, in key order.
    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError>;
    /// Writes `value` under `key`. When this returns, the write is durable.
    fn put(&self, key: &str, value: &Value) -> Result<PutOutcome, StoreError>;
    /// Removes `key`; `None` when it did not exist.
    fn delete(&self, key: &str) -> Result<Option<Entry>, StoreError>;
    /// Applies every op in one transaction: all of them or none. Deletes of
    /// missing keys are skipped. Watchers hear of the batch in one call.
    fn apply(&self, ops: &[BatchOp]) -> Result<Vec<Event>, StoreError>;
    /// The revision of the last committed change (0 for an empty store).
    fn revision(&self) -> Result<u64, StoreError>;
    /// Registers a watcher for every later change.
    fn subscribe(&self, watcher: Arc<dyn Watcher>);
}

/// The keys of everything below one prefix: `"/apisix/routes/"` ..
/// `"/apisix/routes0"` (`'0'` follows `'/'`).
pub(crate) fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.to_string();
    if let Some(last) = end.pop() {
        end.push(char::from_u32(last as u32 + 1).unwrap_or(char::MAX));
    }
    end
}

#[cfg(test)]
mod tests;
