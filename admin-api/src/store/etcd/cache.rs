//! The local copy of the last configuration an [`EtcdStore`] saw, so that a
//! node restarted while etcd is down serves that instead of nothing.
//!
//! One redb file: each object as etcd holds it (still encrypted) with its
//! indexes, the revision it reflects and the etcd it came from. It is
//! rewritten whole after a full listing and changed key by key for each watch
//! batch; each write is one transaction, so the file always holds a whole
//! revision.
//!
//! [`EtcdStore`]: super::EtcdStore

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::store::StoreError;

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("etcd_objects");
const META: TableDefinition<&str, &str> = TableDefinition::new("etcd_meta");

/// One cached object: key inside ferrogate (`/apisix/routes/1`), etcd's
/// raw value and indexes.
#[derive(Debug, Clone)]
pub struct Cached {
    pub key: String,
    pub raw: Vec<u8>,
    pub created_index: u64,
    pub modified_index: u64,
}

pub struct Cache {
    db: Database,
}

impl Cache {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(StoreError::backend)?;
        let txn = db.begin_write().map_err(StoreError::backend)?;
        {
            txn.open_table(OBJECTS).map_err(StoreError::backend)?;
            txn.open_table(META).map_err(StoreError::backend)?;
        }
        txn.commit().map_err(StoreError::backend)?;
        Ok(Cache { db })
    }

    /// The cached objects and revision, when they came from `origin` (the
    /// etcd prefix and hosts: a cache of another cluster is not served).
    pub fn load(&self, origin: &str) -> Result<Option<(Vec<Cached>, u64)>, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::backend)?;
        let meta = txn.open_table(META).map_err(StoreError::backend)?;
        let same_origin = meta
            .get("origin")
            .map_err(StoreError::backend)?
            .is_some_and(|v| v.value() == origin);
        let revision = meta
            .get("revision")
            .map_err(StoreError::backend)?
            .and_then(|v| v.value().parse::<u64>().ok());
        let (true, Some(revision)) = (same_origin, revision) else {
            return Ok(None);
        };
        let objects = txn.open_table(OBJECTS).map_err(StoreError::backend)?;
        let mut out = Vec::new();
        for item in objects.iter().map_err(StoreError::backend)? {
            let (k, v) = item.map_err(StoreError::backend)?;
            if let Some(c) = decode(k.value(), v.value()) {
                out.push(c);
            }
        }
        Ok(Some((out, revision)))
    }

    /// Applies `ops` in order, in one transaction.
    pub fn write(&self, origin: &str, ops: &[CacheOp]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(StoreError::backend)?;
        let mut revision = None;
        for op in ops {
            match op {
                CacheOp::Replace {
                    objects,
                    revision: r,
                } => {
                    txn.delete_table(OBJECTS).map_err(StoreError::backend)?;
                    let mut table = txn.open_table(OBJECTS).map_err(StoreError::backend)?;
                    for c in objects {
                        table
                            .insert(c.key.as_str(), encode(c).as_slice())
                            .map_err(StoreError::backend)?;
                    }
                    let mut meta = txn.open_table(META).map_err(StoreError::backend)?;
                    meta.insert("origin", origin).map_err(StoreError::backend)?;
                    revision = Some(*r);
                }
                CacheOp::Apply {
                    puts,
                    deletes,
                    revision: r,
                } => {
                    let mut table = txn.open_table(OBJECTS).map_err(StoreError::backend)?;
                    for c in puts {
                        table
                            .insert(c.key.as_str(), encode(c).as_slice())
                            .map_err(StoreError::backend)?;
                    }
                    for key in deletes {
                        table.remove(key.as_str()).map_err(StoreError::backend)?;
                    }
                    revision = Some(*r);
                }
            }
        }
        if let Some(revision) = revision {
            let mut meta = txn.open_table(META).map_err(StoreError::backend)?;
            meta.insert("revision", revision.to_string().as_str())
                .map_err(StoreError::backend)?;
        }
        txn.commit().map_err(StoreError::backend)
    }
}

/// One change to the cache.
#[derive(Debug)]
pub enum CacheOp {
    /// Everything, after a full listing.
    Replace { objects: Vec<Cached>, revision: u64 },
    /// One watch batch.
    Apply {
        puts: Vec<Cached>,
        deletes: Vec<String>,
        revision: u64,
    },
}

fn encode(c: &Cached) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + c.raw.len());
    out.extend_from_slice(&c.created_index.to_le_bytes());
    out.extend_from_slice(&c.modified_index.to_le_bytes());
    out.extend_from_slice(&c.raw);
    out
}

fn decode(key: &str, bytes: &[u8]) -> Option<Cached> {
    let created = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let modified = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
    Some(Cached {
        key: key.to_string(),
        raw: bytes.get(16..)?.to_vec(),
        created_index: created,
        modified_index: modified,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(key: &str, raw: &str, m: u64) -> Cached {
        Cached {
            key: key.into(),
            raw: raw.as_bytes().to_vec(),
            created_index: 1,
            modified_index: m,
        }
    }

    #[test]
    fn survives_reopen_and_checks_origin() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.redb");
        {
            let cache = Cache::open(&path).unwrap();
            assert!(cache.load("a").unwrap().is_none());
            let replace = CacheOp::Replace {
                objects: vec![obj("/apisix/routes/1", "{}", 3)],
                revision: 3,
            };
            cache.write("a", &[replace]).unwrap();
            let apply = CacheOp::Apply {
                puts: vec![obj("/apisix/routes/2", "{\"x\":1}", 5)],
                deletes: vec!["/apisix/routes/1".into()],
                revision: 5,
            };
            cache.write("a", &[apply]).unwrap();
        }
        let cache = Cache::open(&path).unwrap();
        let (objects, revision) = cache.load("a").unwrap().unwrap();
        assert_eq!(revision, 5);
        assert_eq!(objects.len(), 1);
        assert_eq!(objects[0].key, "/apisix/routes/2");
        assert_eq!(objects[0].raw, b"{\"x\":1}");
        assert_eq!(objects[0].modified_index, 5);
        assert!(cache.load("b").unwrap().is_none());
    }
}
