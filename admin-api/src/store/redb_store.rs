//! The embedded default store: one redb database file in the data directory,
//! with a journal file beside it.
//!
//! Each object is one key in the `objects` table, so a change costs the same
//! with 10 or 10,000 routes. When [`Store::put`] returns, the change survives
//! a crash or `kill -9`, and a torn write is never visible: the change's
//! record was written and synced to the journal (see [`super::journal`]).
//! The database file gets journaled writes in batches: until then they wait
//! in memory (`pending`, where reads look first), and every
//! [`super::journal::CHECKPOINT_RECORDS`] records one durable redb commit
//! writes them all (each B-tree page they touch once, where a commit per
//! write copied and wrote about four pages each time); the journal then
//! starts over. Opening the store applies the records the database file does
//! not have yet. A write too large for what is left of the journal is
//! committed to the file at once, durably, with everything pending.
//!
//! The store revision is kept in memory and made durable without a second
//! table in every commit: a put leaves it in the entry it writes (its
//! `modified_index`), and a checkpoint, like a replay at open, writes it to
//! the `meta` table. The last revision is then the larger of `meta`'s and the
//! newest entry's, which [`RedbStore::open`] reads back.
//!
//! A database written this way must not be opened by a build that reads the
//! revision from `meta` alone: it would hand out revisions already used; nor,
//! after a crash, by one that does not read the journal: it would miss the
//! writes acknowledged since the last checkpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::Value;

use super::journal::{self, Appended, Journal};
use super::{
    done, prefix_end, BatchOp, Change, Entry, Event, PutOutcome, Stamp, Store, StoreError, Watcher,
    Watchers, WriteFuture, KEY_PREFIX,
};

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";

/// redb's page cache. Its default (1 GiB) would keep every page a bulk load
/// touched in memory for good; the data plane never reads the store (it
/// runs on compiled snapshots), the kernel's page cache serves the Admin
/// API's occasional reads, and a checkpoint touches each page once.
const CACHE_BYTES: usize = 4 * 1024 * 1024;

/// A key's stored bytes, or `None` where it was deleted.
type Stored = Option<Arc<[u8]>>;

/// A [`Store`] backed by a redb database file.
pub struct RedbStore {
    db: Database,
    /// Serialises writers so that watchers see changes in commit order (and
    /// the journal's records are in that order too).
    write_lock: Mutex<Journal>,
    /// Journaled writes the database file does not have yet, the newest per
    /// key. Changed only under `write_lock`; cleared once a checkpoint has
    /// committed them. Readers look here before the file.
    pending: RwLock<BTreeMap<String, Stored>>,
    /// The revision of the last committed change; advanced only after its
    /// commit succeeded, under `write_lock`.
    revision: AtomicU64,
    watchers: Watchers,
}

impl RedbStore {
    /// Opens (or creates) the database at `path`, and its journal at `path`
    /// with the extension `journal`, applying the journal's records the
    /// database does not have yet. Fails when another process holds it open,
    /// and when the journal cannot be read or written.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let fresh = !path.exists();
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(StoreError::backend)?;
        // Make sure both tables exist so that readers never fail on a fresh file.
        let txn = db.begin_write().map_err(StoreError::backend)?;
        {
            txn.open_table(OBJECTS).map_err(StoreError::backend)?;
            txn.open_table(META).map_err(StoreError::backend)?;
        }
        txn.commit().map_err(StoreError::backend)?;
        let journal_path = path.with_extension("journal");
        let (mut journal, records) = Journal::open(&journal_path, fresh)
            .map_err(|e| StoreError::backend(format!("journal {}: {e}", journal_path.display())))?;
        let mut revision = Self::last_revision(&db)?;
        let missing: Vec<_> = records.iter().filter(|r| r.revision > revision).collect();
        if let Some(last) = missing.last() {
            let ops = missing.iter().flat_map(|r| &r.ops).map(|op| match op {
                journal::Op::Put { key, value } => (key.as_str(), Some(value.as_slice())),
                journal::Op::Delete { key } => (key.as_str(), None),
            });
            Self::commit_to_file(&db, ops, last.revision)?;
            tracing::info!(
                writes = missing.len(),
                revision = last.revision,
                "config store: journaled writes applied"
            );
            revision = last.revision;
        }
        // Everything the journal holds is in the database now, durably.
        journal.restart();
        Ok(RedbStore {
            db,
            write_lock: Mutex::new(journal),
            pending: RwLock::default(),
            revision: AtomicU64::new(revision),
            watchers: Watchers::default(),
        })
    }

    /// Writes `ops` (in order; `None` deletes) and the store `revision` to
    /// the database file in one durable commit. Fails, with the file as it
    /// was, when redb cannot.
    fn commit_to_file<'a>(
        db: &Database,
        ops: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
        revision: u64,
    ) -> Result<(), StoreError> {
        let txn = db.begin_write().map_err(StoreError::backend)?;
        let written = (|| -> Result<(), redb::Error> {
            let mut objects = txn.open_table(OBJECTS)?;
            for (key, value) in ops {
                match value {
                    Some(bytes) => drop(objects.insert(key, bytes)?),
                    None => drop(objects.remove(key)?),
                }
            }
            // Whatever the last change was, `meta` holds its revision.
            txn.open_table(META)?.insert(REVISION, revision)?;
            Ok(())
        })();
        match written {
            Ok(()) => txn.commit().map_err(StoreError::backend),
            Err(e) => {
                let _ = txn.abort();
                Err(StoreError::backend(e))
            }
        }
    }

    /// Makes a write durable: its record, begun last in `journal` (the store
    /// at `revision` after it), is written and synced, and `changes` join
    /// the pending ones; enough records make a checkpoint. A record that does
    /// not fit in what is left of the journal is not written: the changes
    /// go to the database file at once, with everything pending. Fails, with
    /// nothing changed, when neither could be done.
    fn commit(
        &self,
        journal: &mut Journal,
        changes: Vec<(String, Stored)>,
        revision: u64,
    ) -> Result<(), StoreError> {
        match journal.append(revision) {
            Ok(Appended::At(_)) => {}
            Ok(Appended::Full) => return self.checkpoint(journal, &changes, revision),
            Err(e) => return Err(StoreError::backend(format!("journal: {e}"))),
        }
        self.pending
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .extend(changes);
        if journal.wants_checkpoint() {
            // The write is durable already (journaled); a failed checkpoint
            // leaves the journal to fill up, and the next write to try again.
            if let Err(e) = self.checkpoint(journal, &[], revision) {
                tracing::warn!(error = %e, "config store: checkpoint failed");
            }
        }
        Ok(())
    }

    /// Writes the pending changes, then `more`, to the database file in one
    /// durable commit (the store at `revision` after them), and starts the
    /// journal over. Fails, with nothing changed, when redb cannot commit.
    fn checkpoint(
        &self,
        journal: &mut Journal,
        more: &[(String, Stored)],
        revision: u64,
    ) -> Result<(), StoreError> {
        {
            // Only writers change `pending`, and this is the writer: readers
            // go on reading it while the file is written.
            let pending = self.pending.read().unwrap_or_else(|p| p.into_inner());
            let ops = pending
                .iter()
                .chain(more.iter().map(|(k, v)| (k, v)))
                .map(|(key, value)| (key.as_str(), value.as_deref()));
            Self::commit_to_file(&self.db, ops, revision)?;
        }
        self.pending
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        journal.restart();
        Ok(())
    }

    /// `read` of the bytes stored under `key`, or `None` when there are none:
    /// a pending write's, else the database file's.
    fn read_stored<R>(
        &self,
        key: &str,
        read: impl FnOnce(&[u8]) -> Result<R, StoreError>,
    ) -> Result<Option<R>, StoreError> {
        let pending = self
            .pending
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned();
        match pending {
            Some(Some(bytes)) => read(&bytes).map(Some),
            Some(None) => Ok(None),
            // Not pending: the file has the newest (a checkpoint writes the
            // file before it clears `pending`).
            None => {
                let txn = self.db.begin_read().map_err(StoreError::backend)?;
                let table = txn.open_table(OBJECTS).map_err(StoreError::backend)?;
                match table.get(key).map_err(StoreError::backend)? {
                    Some(v) => read(v.value()).map(Some),
                    None => Ok(None),
                }
            }
        }
    }

    /// The revision of the last change in the file: `meta`'s (written by
    /// every checkpoint and replay; by deletes and batches in a file an
    /// earlier build wrote) or the newest entry's, whichever is larger.
    /// Reads every entry's revisions once, at open.
    fn last_revision(db: &Database) -> Result<u64, StoreError> {
        let txn = db.begin_read().map_err(StoreError::backend)?;
        let meta = txn.open_table(META).map_err(StoreError::backend)?;
        let mut last = meta
            .get(REVISION)
            .map_err(StoreError::backend)?
            .map(|v| v.value())
            .unwrap_or(0);
        let objects = txn.open_table(OBJECTS).map_err(StoreError::backend)?;
        for item in objects.iter().map_err(StoreError::backend)? {
            let (k, v) = item.map_err(StoreError::backend)?;
            last = last.max(Self::decode_indexes(k.value(), v.value())?.modified_index);
        }
        Ok(last)
    }

    fn decode(key: &str, bytes: &[u8]) -> Result<Entry, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            key: key.to_string(),
            reason: e.to_string(),
        })
    }

    /// Just the revisions of a stored entry: its value is skipped over, not
    /// built (a write needs only these of the entry it replaces, and opening
    /// the store only these of every entry).
    fn decode_indexes(key: &str, bytes: &[u8]) -> Result<Indexes, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            key: key.to_string(),
            reason: e.to_string(),
        })
    }
}

/// An entry read for its [`Stamp`] only: the rest of the stored JSON is
/// skipped over, not built into a tree. Skipping checks less than a whole
/// read (missing fields, bad escapes inside skipped strings): a damaged
/// entry may give a stamp here and fail [`Store::get`], as it may in the
/// revision check of a write.
#[derive(serde::Deserialize)]
struct StampOnDisk {
    value: CreateTime,
    modified_index: u64,
}

/// The `create_time` of a stored object (`None` when it has none). A value
/// that is not a JSON object fails, and is then read whole.
struct CreateTime(Option<Value>);

impl<'de> serde::Deserialize<'de> for CreateTime {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = CreateTime;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a stored object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<CreateTime, A::Error> {
                let mut found = None;
                while let Some(IsCreateTime(wanted)) = map.next_key()? {
                    if wanted {
                        found = Some(map.next_value::<Value>()?);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(CreateTime(found))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Whether an object key is `create_time`, decided without copying the key
/// (serde reads a `Cow<str>` key into an owned `String`).
struct IsCreateTime(bool);

impl<'de> serde::Deserialize<'de> for IsCreateTime {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = IsCreateTime;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<IsCreateTime, E> {
                Ok(IsCreateTime(key == "create_time"))
            }
        }
        d.deserialize_str(Visit)
    }
}

/// The revisions of an [`Entry`].
#[derive(serde::Deserialize)]
struct Indexes {
    created_index: u64,
    modified_index: u64,
}

impl RedbStore {
    /// [`Store::put`], done (committed and told to watchers) before it
    /// returns.
    pub fn put_now(
        &self,
        key: &str,
        value: Value,
        expect_modified: Option<u64>,
    ) -> Result<PutOutcome, StoreError> {
        let mut journal = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let previous = self.read_stored(key, |b| Self::decode_indexes(key, b))?;
        if expect_modified.is_some()
            && previous.as_ref().map(|p| p.modified_index) != expect_modified
        {
            return Err(StoreError::Conflict);
        }
        // The entry carries the revision to disk (see the module docs).
        let revision = self.revision.load(Ordering::Acquire) + 1;
        let entry = Entry {
            key: key.to_string(),
            value,
            created_index: previous.as_ref().map_or(revision, |p| p.created_index),
            modified_index: revision,
        };
        let bytes = serde_json::to_vec(&entry).map_err(StoreError::backend)?;
        journal.begin();
        journal.put(key, &bytes);
        self.commit(
            &mut journal,
            vec![(entry.key.clone(), Some(bytes.into()))],
            revision,
        )?;
        self.revision.store(revision, Ordering::Release);
        // The watchers borrow the entry; the caller gets it back, not a copy.
        let events = [Event::Put(entry)];
        self.watchers.notify(&Change::Events {
            events: &events,
            revision,
        });
        let [Event::Put(entry)] = events else {
            unreachable!("built as a put just above")
        };
        Ok(PutOutcome {
            entry,
            created: previous.is_none(),
        })
    }

    /// [`Store::apply`], done before it returns.
    pub fn apply_now(&self, ops: &[BatchOp]) -> Result<Vec<Event>, StoreError> {
        let mut journal = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        journal.begin();
        // This batch's changes so far: its later ops see them.
        let mut changed: BTreeMap<String, Stored> = BTreeMap::new();
        let mut events = Vec::with_capacity(ops.len());
        let mut revision = self.revision.load(Ordering::Acquire);
        for op in ops {
            match op {
                BatchOp::Put { key, value } => {
                    revision += 1;
                    let created = match changed.get(key.as_str()) {
                        Some(Some(bytes)) => Self::decode_indexes(key, bytes)?.created_index,
                        Some(None) => revision,
                        None => self
                            .read_stored(key, |b| Self::decode_indexes(key, b))?
                            .map_or(revision, |i| i.created_index),
                    };
                    let entry = Entry {
                        key: key.clone(),
                        value: value.clone(),
                        created_index: created,
                        modified_index: revision,
                    };
                    let bytes = serde_json::to_vec(&entry).map_err(StoreError::backend)?;
                    journal.put(key, &bytes);
                    changed.insert(key.clone(), Some(bytes.into()));
                    events.push(Event::Put(entry));
                }
                BatchOp::Delete { key } => {
                    let exists = match changed.get(key.as_str()) {
                        Some(stored) => stored.is_some(),
                        None => self.read_stored(key, |_| Ok(()))?.is_some(),
                    };
                    if exists {
                        revision += 1;
                        journal.delete(key);
                        changed.insert(key.clone(), None);
                        events.push(Event::Delete { key: key.clone() });
                    }
                }
                BatchOp::DeletePrefix { prefix } => {
                    for key in self.keys_with_prefix(prefix, &changed)? {
                        revision += 1;
                        journal.delete(&key);
                        changed.insert(key.clone(), None);
                        events.push(Event::Delete { key });
                    }
                }
            }
        }
        if events.is_empty() {
            return Ok(events);
        }
        self.commit(&mut journal, changed.into_iter().collect(), revision)?;
        self.revision.store(revision, Ordering::Release);
        self.watchers.notify(&Change::Events {
            events: &events,
            revision,
        });
        Ok(events)
    }

    /// The keys under `prefix` that exist, in order, with `changed` (a
    /// batch's changes so far) over the pending writes over the file.
    fn keys_with_prefix(
        &self,
        prefix: &str,
        changed: &BTreeMap<String, Stored>,
    ) -> Result<Vec<String>, StoreError> {
        let end = prefix_end(prefix);
        let mut keys = BTreeSet::new();
        {
            let txn = self.db.begin_read().map_err(StoreError::backend)?;
            let table = txn.open_table(OBJECTS).map_err(StoreError::backend)?;
            for item in table
                .range(prefix..end.as_str())
                .map_err(StoreError::backend)?
            {
                let (k, _) = item.map_err(StoreError::backend)?;
                keys.insert(k.value().to_string());
            }
        }
        let pending = self.pending.read().unwrap_or_else(|p| p.into_inner());
        let range = (Bound::Included(prefix), Bound::Excluded(end.as_str()));
        for layer in [&*pending, changed] {
            for (key, stored) in layer.range::<str, _>(range) {
                match stored {
                    Some(_) => keys.insert(key.clone()),
                    None => keys.remove(key),
                };
            }
        }
        Ok(keys.into_iter().collect())
    }

    /// The revision of the last committed change.
    pub fn current_revision(&self) -> Result<u64, StoreError> {
        Ok(self.revision.load(Ordering::Acquire))
    }
}

/// Writes what is pending to the database file, so that the next open
/// finds it there and has nothing to apply.
impl Drop for RedbStore {
    fn drop(&mut self) {
        let pending = std::mem::take(self.pending.get_mut().unwrap_or_else(|p| p.into_inner()));
        if pending.is_empty() {
            return;
        }
        let ops = pending
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_deref()));
        if let Err(e) = Self::commit_to_file(&self.db, ops, *self.revision.get_mut()) {
            // Still in the journal: the next open applies them.
            tracing::warn!(error = %e, "config store: pending writes left to the journal at close");
        }
    }
}

impl Store for RedbStore {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.read_stored(key, |b| Self::decode(key, b))
    }

    fn stamp(&self, key: &str) -> Result<Option<Stamp>, StoreError> {
        self.read_stored(key, |bytes| {
            match serde_json::from_slice::<StampOnDisk>(bytes) {
                Ok(read) => Ok(Stamp {
                    create_time: read.value.0,
                    modified_index: read.modified_index,
                }),
                Err(_) => Ok(Stamp::of(&Self::decode(key, bytes)?)),
            }
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let end = prefix_end(prefix);
        // Copied first: a checkpoint between this and the file's read below
        // leaves the same bytes in the file, and these win.
        let pending: Vec<(String, Stored)> = self
            .pending
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .range::<str, _>((Bound::Included(prefix), Bound::Excluded(end.as_str())))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut pending = pending.into_iter().peekable();
        let txn = self.db.begin_read().map_err(StoreError::backend)?;
        let table = txn.open_table(OBJECTS).map_err(StoreError::backend)?;
        let mut out = Vec::new();
        let mut push = |key: &str, stored: Option<&[u8]>| -> Result<(), StoreError> {
            if let Some(bytes) = stored {
                out.push(Self::decode(key, bytes)?);
            }
            Ok(())
        };
        for item in table
            .range(prefix..end.as_str())
            .map_err(StoreError::backend)?
        {
            let (k, v) = item.map_err(StoreError::backend)?;
            let key = k.value();
            while let Some((p, stored)) = pending.next_if(|(p, _)| p.as_str() < key) {
                push(&p, stored.as_deref())?;
            }
            match pending.next_if(|(p, _)| p.as_str() == key) {
                Some((p, stored)) => push(&p, stored.as_deref())?,
                None => push(key, Some(v.value()))?,
            }
        }
        for (p, stored) in pending {
            push(&p, stored.as_deref())?;
        }
        Ok(out)
    }

    fn revision(&self) -> Result<u64, StoreError> {
        self.current_revision()
    }

    fn put(
        &self,
        key: &str,
        value: Value,
        expect_modified: Option<u64>,
    ) -> WriteFuture<'_, PutOutcome> {
        done(self.put_now(key, value, expect_modified))
    }

    fn apply(&self, ops: Vec<BatchOp>) -> WriteFuture<'_, Vec<Event>> {
        done(self.apply_now(&ops))
    }

    fn next_id(&self) -> WriteFuture<'_, u64> {
        done(self.current_revision().map(|r| r + 1))
    }

    fn subscribe(&self, watcher: Arc<dyn Watcher>) -> Result<(), StoreError> {
        // Writers wait while the contents are read and the watcher added:
        // no change falls between the two.
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let entries = self.list(&format!("{KEY_PREFIX}/"))?;
        watcher.on_change(&Change::Reset {
            entries: &entries,
            revision: self.current_revision()?,
        });
        self.watchers.add(watcher);
        Ok(())
    }
}
