//! The embedded default store: one redb database file in the data directory,
//! with a journal file beside it.
//!
//! Each object is one key in the `objects` table, so a change costs the same
//! with 10 or 10,000 routes. Every put and delete is its own write
//! transaction. When [`Store::put`] returns, the change survives a crash or
//! `kill -9`, and a torn write is never visible: the change's record was
//! written and synced to the journal (see [`super::journal`]) before redb
//! committed it without waiting for the disk, and every
//! [`super::journal::CHECKPOINT_RECORDS`] records one durable redb commit
//! makes the journaled commits durable in the database file itself. Opening
//! the store applies the records the database file does not have yet. A
//! write too large for the journal is committed durably by redb alone.
//!
//! The store revision is kept in memory and made durable without a second
//! table in every commit: a put leaves it in the entry it writes (its
//! `modified_index`); a write whose last change is a delete writes it to the
//! `meta` table. The last revision is then the larger of `meta`'s and the
//! newest entry's, which [`RedbStore::open`] reads back. A put commits one
//! table instead of two: a page write and a table-root update fewer.
//!
//! A database written this way must not be opened by a build that reads the
//! revision from `meta` alone: it would hand out revisions already used; nor,
//! after a crash, by one that does not read the journal: it would miss the
//! writes acknowledged since the last checkpoint.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
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
/// API's occasional reads, and writes touch a few pages each.
const CACHE_BYTES: usize = 4 * 1024 * 1024;

/// A [`Store`] backed by a redb database file.
pub struct RedbStore {
    db: Database,
    /// Serialises writers so that watchers see changes in commit order (and
    /// the journal's records are in that order too).
    write_lock: Mutex<Journal>,
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
            Self::replay(&db, &missing)?;
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
            revision: AtomicU64::new(revision),
            watchers: Watchers::default(),
        })
    }

    /// Applies journal records (in order) in one durable commit.
    fn replay(db: &Database, records: &[&journal::Record]) -> Result<(), StoreError> {
        let txn = db.begin_write().map_err(StoreError::backend)?;
        {
            let mut objects = txn.open_table(OBJECTS).map_err(StoreError::backend)?;
            for op in records.iter().flat_map(|r| &r.ops) {
                match op {
                    journal::Op::Put { key, value } => {
                        objects
                            .insert(key.as_str(), value.as_slice())
                            .map_err(StoreError::backend)?;
                    }
                    journal::Op::Delete { key } => {
                        objects.remove(key.as_str()).map_err(StoreError::backend)?;
                    }
                }
            }
            if let Some(last) = records.last() {
                // Whatever the last change was, `meta` holds its revision.
                let mut meta = txn.open_table(META).map_err(StoreError::backend)?;
                meta.insert(REVISION, last.revision)
                    .map_err(StoreError::backend)?;
            }
        }
        txn.commit().map_err(StoreError::backend)
    }

    /// Commits `txn`, whose changes `journal` holds as its record begun last
    /// (the store at `revision` after it): the record is written and synced,
    /// then redb commits without waiting for the disk. When the record does
    /// not fit, or enough have been written, the commit is a durable one
    /// (which makes the journaled commits before it durable too) and the
    /// journal starts over. Fails, with nothing changed, when the record
    /// could not be written or redb could not commit.
    fn commit(
        &self,
        journal: &mut Journal,
        mut txn: WriteTransaction,
        revision: u64,
    ) -> Result<(), StoreError> {
        let at = match journal.append(revision) {
            Ok(Appended::At(at)) => at,
            Ok(Appended::Full) => return Self::commit_durably(journal, txn),
            Err(e) => {
                let _ = txn.abort();
                return Err(StoreError::backend(format!("journal: {e}")));
            }
        };
        if txn.set_durability(Durability::None).is_err() {
            return Self::commit_durably(journal, txn);
        }
        if let Err(e) = txn.commit() {
            if let Err(io) = journal.retract(at) {
                tracing::error!(error = %io, "config store: a journaled write redb refused could not be taken back; a restart applies it");
            }
            return Err(StoreError::backend(e));
        }
        if journal.wants_checkpoint() {
            // The write is durable already (journaled); a failed checkpoint
            // leaves the journal to fill up, and the next write to try again.
            let checkpoint = || -> Result<(), redb::Error> { Ok(self.db.begin_write()?.commit()?) };
            match checkpoint() {
                Ok(()) => journal.restart(),
                Err(e) => tracing::warn!(error = %e, "config store: checkpoint failed"),
            }
        }
        Ok(())
    }

    fn commit_durably(journal: &mut Journal, txn: WriteTransaction) -> Result<(), StoreError> {
        txn.commit().map_err(StoreError::backend)?;
        journal.restart();
        Ok(())
    }

    /// The revision of the last committed change: `meta`'s (written by
    /// deletes and batches) or the newest entry's (written by puts),
    /// whichever is larger. Reads every entry's revisions once, at open.
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
        value: &Value,
        expect_modified: Option<u64>,
    ) -> Result<PutOutcome, StoreError> {
        let mut journal = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let txn = self.db.begin_write().map_err(StoreError::backend)?;
        let outcome = {
            let mut objects = txn.open_table(OBJECTS).map_err(StoreError::backend)?;
            let previous = match objects.get(key).map_err(StoreError::backend)? {
                Some(v) => Some(Self::decode_indexes(key, v.value())?),
                None => None,
            };
            if expect_modified.is_some()
                && previous.as_ref().map(|p| p.modified_index) != expect_modified
            {
                return Err(StoreError::Conflict);
            }
            // The entry carries the revision to disk (see the module docs).
            let revision = self.revision.load(Ordering::Acquire) + 1;
            let entry = Entry {
                key: key.to_string(),
                value: value.clone(),
                created_index: previous.as_ref().map_or(revision, |p| p.created_index),
                modified_index: revision,
            };
            let bytes = serde_json::to_vec(&entry).map_err(StoreError::backend)?;
            objects
                .insert(key, bytes.as_slice())
                .map_err(StoreError::backend)?;
            journal.begin();
            journal.put(key, &bytes);
            PutOutcome {
                entry,
                created: previous.is_none(),
            }
        };
        self.commit(&mut journal, txn, outcome.entry.modified_index)?;
        self.revision
            .store(outcome.entry.modified_index, Ordering::Release);
        self.watchers.notify(&Change::Events {
            events: &[Event::Put(outcome.entry.clone())],
            revision: outcome.entry.modified_index,
        });
        Ok(outcome)
    }

    /// [`Store::apply`], done before it returns.
    pub fn apply_now(&self, ops: &[BatchOp]) -> Result<Vec<Event>, StoreError> {
        let mut journal = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let txn = self.db.begin_write().map_err(StoreError::backend)?;
        journal.begin();
        let mut events = Vec::with_capacity(ops.len());
        let mut revision = self.revision.load(Ordering::Acquire);
        {
            let mut objects = txn.open_table(OBJECTS).map_err(StoreError::backend)?;
            for op in ops {
                match op {
                    BatchOp::Put { key, value } => {
                        revision += 1;
                        let created =
                            match objects.get(key.as_str()).map_err(StoreError::backend)? {
                                Some(v) => Self::decode_indexes(key, v.value())?.created_index,
                                None => revision,
                            };
                        let entry = Entry {
                            key: key.clone(),
                            value: value.clone(),
                            created_index: created,
                            modified_index: revision,
                        };
                        let bytes = serde_json::to_vec(&entry).map_err(StoreError::backend)?;
                        objects
                            .insert(key.as_str(), bytes.as_slice())
                            .map_err(StoreError::backend)?;
                        journal.put(key, &bytes);
                        events.push(Event::Put(entry));
                    }
                    BatchOp::Delete { key } => {
                        if objects
                            .remove(key.as_str())
                            .map_err(StoreError::backend)?
                            .is_some()
                        {
                            revision += 1;
                            journal.delete(key);
                            events.push(Event::Delete { key: key.clone() });
                        }
                    }
                    BatchOp::DeletePrefix { prefix } => {
                        let end = prefix_end(prefix);
                        let mut keys = Vec::new();
                        for item in objects
                            .range(prefix.as_str()..end.as_str())
                            .map_err(StoreError::backend)?
                        {
                            let (k, _) = item.map_err(StoreError::backend)?;
                            keys.push(k.value().to_string());
                        }
                        for key in keys {
                            objects.remove(key.as_str()).map_err(StoreError::backend)?;
                            revision += 1;
                            journal.delete(&key);
                            events.push(Event::Delete { key });
                        }
                    }
                }
            }
        }
        if events.is_empty() {
            txn.abort().map_err(StoreError::backend)?;
            return Ok(events);
        }
        if matches!(events.last(), Some(Event::Delete { .. })) {
            // A delete leaves no entry behind to carry the revision.
            let mut meta = txn.open_table(META).map_err(StoreError::backend)?;
            meta.insert(REVISION, revision)
                .map_err(StoreError::backend)?;
        }
        self.commit(&mut journal, txn, revision)?;
        self.revision.store(revision, Ordering::Release);
        self.watchers.notify(&Change::Events {
            events: &events,
            revision,
        });
        Ok(events)
    }

    /// The revision of the last committed change.
    pub fn current_revision(&self) -> Result<u64, StoreError> {
        Ok(self.revision.load(Ordering::Acquire))
    }
}

impl Store for RedbStore {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::backend)?;
        let table = txn.open_table(OBJECTS).map_err(StoreError::backend)?;
        match table.get(key).map_err(StoreError::backend)? {
            Some(v) => Ok(Some(Self::decode(key, v.value())?)),
            None => Ok(None),
        }
    }

    fn stamp(&self, key: &str) -> Result<Option<Stamp>, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::backend)?;
        let table = txn.open_table(OBJECTS).map_err(StoreError::backend)?;
        let Some(v) = table.get(key).map_err(StoreError::backend)? else {
            return Ok(None);
        };
        match serde_json::from_slice::<StampOnDisk>(v.value()) {
            Ok(read) => Ok(Some(Stamp {
                create_time: read.value.0,
                modified_index: read.modified_index,
            })),
            Err(_) => Ok(Some(Stamp::of(&Self::decode(key, v.value())?))),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::backend)?;
        let table = txn.open_table(OBJECTS).map_err(StoreError::backend)?;
        let end = prefix_end(prefix);
        let mut out = Vec::new();
        for item in table
            .range(prefix..end.as_str())
            .map_err(StoreError::backend)?
        {
            let (k, v) = item.map_err(StoreError::backend)?;
            out.push(Self::decode(k.value(), v.value())?);
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
        done(self.put_now(key, &value, expect_modified))
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
