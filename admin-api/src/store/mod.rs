//! Where Admin API objects live.
//!
//! Objects are kept one key per object in APISIX's etcd layout
//! (`/apisix/routes/1`), each with the revision that created it and the one
//! that last changed it. A [`Store`] is small on purpose: local reads,
//! asynchronous writes, and a revisioned change feed that starts with the
//! whole contents. [`RedbStore`] is the embedded default, [`MemoryStore`]
//! holds a standalone YAML file, and `EtcdStore` shares one configuration
//! between gateways; the data plane does not notice which one it runs on.

pub mod crypt;
#[cfg(feature = "etcd")]
mod etcd;
mod journal;
mod memory;
mod redb_store;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use futures_util::future::BoxFuture;

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[cfg(feature = "etcd")]
pub use etcd::{EtcdSettings, EtcdStore, EtcdTls};
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

/// What replacing a stored object needs of it: its `create_time` (kept
/// across updates) and `modified_index` (for a conditional write).
#[derive(Debug, Clone, PartialEq)]
pub struct Stamp {
    pub create_time: Option<Value>,
    pub modified_index: u64,
}

impl Stamp {
    pub fn of(entry: &Entry) -> Self {
        Stamp {
            create_time: entry.value.get("create_time").cloned(),
            modified_index: entry.modified_index,
        }
    }
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
    Put {
        key: String,
        value: Value,
    },
    Delete {
        key: String,
    },
    /// Every key that starts with `prefix`, including keys this node has
    /// not seen yet (a consumer's credentials, as APISIX's `rmdir`).
    DeletePrefix {
        prefix: String,
    },
}

/// What a watcher is told, in commit order.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// Changes committed together; after them the store is at `revision`.
    Events { events: &'a [Event], revision: u64 },
    /// Everything the store holds at `revision`. Replaces whatever the
    /// watcher knew: sent first on [`Store::subscribe`], and again whenever
    /// a remote store cannot replay what it missed (compaction, an outage).
    Reset { entries: &'a [Entry], revision: u64 },
}

impl Change<'_> {
    pub fn revision(&self) -> u64 {
        match self {
            Change::Events { revision, .. } | Change::Reset { revision, .. } => *revision,
        }
    }
}

/// Told of every change the store applies, in order, one call per batch, so
/// a watcher never sees a batch half-applied. A watcher must not call back
/// into the store.
pub trait Watcher: Send + Sync {
    fn on_change(&self, change: &Change<'_>);
}

/// Why the store could not do what was asked. Never caused by user input.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store backend: {0}")]
    Backend(String),
    #[error("stored object {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    /// A remote store cannot be reached; the Admin API answers 503.
    #[error("{0}")]
    Unavailable(String),
    /// A conditional write found the object changed since it was read.
    #[error("value changed before overwritten")]
    Conflict,
}

impl StoreError {
    pub(crate) fn backend(e: impl std::fmt::Display) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// A write in flight. Embedded stores finish the work when the method is
/// called (the future is ready at once), so call them where blocking is
/// allowed; remote stores do their I/O when the future is polled.
pub type WriteFuture<'a, T> = BoxFuture<'a, Result<T, StoreError>>;

/// The key prefix every object key starts with inside ferrogate. A store
/// whose back end uses another prefix (etcd's `deployment.etcd.prefix`)
/// maps keys at its boundary and says so through [`Store::prefix`].
pub const KEY_PREFIX: &str = "/apisix";

/// A transactional key/value store of Admin API objects.
///
/// Reads (`get`, `list`, `revision`) answer from the local view: the
/// database file, or a remote store's mirror. Writes are futures: when one
/// resolves, the change is durable and this node's view (and its watchers)
/// already has it, so a client reading after a write sees it.
pub trait Store: Send + Sync + 'static {
    /// The back end's key prefix (`/apisix` unless configured), used where
    /// APISIX shows keys to clients (`"key": "/apisix/routes/1"`).
    fn prefix(&self) -> &str {
        KEY_PREFIX
    }
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError>;
    /// The [`Stamp`] of the object at `key`: [`Store::get`] unless the
    /// back end can read less than the whole object.
    fn stamp(&self, key: &str) -> Result<Option<Stamp>, StoreError> {
        Ok(self.get(key)?.as_ref().map(Stamp::of))
    }
    /// Every entry whose key starts with `prefix`, in key order.
    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError>;
    /// The revision of the last change applied to this view (0: empty).
    fn revision(&self) -> Result<u64, StoreError>;
    /// Writes `value` under `key`. With `expect_modified`, only if the key's
    /// `modified_index` is still that ([`StoreError::Conflict`] otherwise).
    fn put(
        &self,
        key: &str,
        value: Value,
        expect_modified: Option<u64>,
    ) -> WriteFuture<'_, PutOutcome>;
    /// Applies every op in one transaction: all of them or none. Deletes of
    /// missing keys are skipped. Watchers hear of the batch in one call.
    fn apply(&self, ops: Vec<BatchOp>) -> WriteFuture<'_, Vec<Event>>;
    /// A number for a generated id (`POST`), larger than any revision so
    /// far, as etcd's revision of a write to `/gen_id` is in APISIX.
    fn next_id(&self) -> WriteFuture<'_, u64>;
    /// Registers `watcher`: it is first sent a [`Change::Reset`] with the
    /// store's current contents, then every later change, with no gap and
    /// no overlap between the two.
    fn subscribe(&self, watcher: Arc<dyn Watcher>) -> Result<(), StoreError>;
    /// For a remote store (etcd): whether the last exchange with it worked.
    /// `None` for a local one.
    fn remote_reachable(&self) -> Option<bool> {
        None
    }
}

/// The watchers of one store.
#[derive(Default)]
pub(crate) struct Watchers(RwLock<Vec<Arc<dyn Watcher>>>);

impl Watchers {
    pub(crate) fn add(&self, watcher: Arc<dyn Watcher>) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(watcher);
    }

    pub(crate) fn notify(&self, change: &Change<'_>) {
        if let Change::Events { events: [], .. } = change {
            return;
        }
        for w in self.0.read().unwrap_or_else(|p| p.into_inner()).iter() {
            w.on_change(change);
        }
    }
}

/// The entries of an in-memory map whose keys start with `prefix`, in key
/// order.
pub(crate) fn entries_below(objects: &BTreeMap<String, Entry>, prefix: &str) -> Vec<Entry> {
    objects
        .range(prefix.to_string()..)
        .take_while(|(k, _)| k.starts_with(prefix))
        .map(|(_, e)| e.clone())
        .collect()
}

/// A write that is done already.
pub(crate) fn done<'a, T: Send + 'a>(result: Result<T, StoreError>) -> WriteFuture<'a, T> {
    Box::pin(std::future::ready(result))
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
