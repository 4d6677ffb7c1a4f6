use super::*;
use futures_util::FutureExt;
use redb::{ReadableDatabase, ReadableTable};
use serde_json::json;
use std::sync::Mutex;

#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl Watcher for Recorder {
    fn on_change(&self, change: &Change<'_>) {
        let events = match change {
            Change::Events { events, .. } => *events,
            Change::Reset { entries, revision } => {
                let keys: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
                self.0
                    .lock()
                    .unwrap()
                    .push(format!("reset {} at {revision}", keys.join(",")));
                return;
            }
        };
        let lines: Vec<String> = events
            .iter()
            .map(|event| match event {
                Event::Put(e) => format!("put {} {}", e.key, e.modified_index),
                Event::Delete { key } => format!("delete {key}"),
            })
            .collect();
        self.0.lock().unwrap().push(lines.join(" + "));
    }
}

fn put(store: &dyn Store, key: &str, value: Value) -> Result<PutOutcome, StoreError> {
    store.put(key, value, None).now_or_never().expect("ready")
}

fn apply(store: &dyn Store, ops: Vec<BatchOp>) -> Result<Vec<Event>, StoreError> {
    store.apply(ops).now_or_never().expect("ready")
}

fn delete(store: &dyn Store, key: &str) -> bool {
    !apply(store, vec![BatchOp::Delete { key: key.into() }])
        .unwrap()
        .is_empty()
}

fn exercise(store: &dyn Store) {
    let rec = Arc::new(Recorder::default());
    store.subscribe(rec.clone()).unwrap();
    assert_eq!(store.revision().unwrap(), 0);
    let a = put(store, "/apisix/routes/1", json!({"uri": "/a"})).unwrap();
    assert!(a.created);
    assert_eq!((a.entry.created_index, a.entry.modified_index), (1, 1));
    let b = put(store, "/apisix/routes/1", json!({"uri": "/b"})).unwrap();
    assert!(!b.created);
    assert_eq!((b.entry.created_index, b.entry.modified_index), (1, 2));
    put(store, "/apisix/routes/2", json!({"uri": "/c"})).unwrap();
    put(store, "/apisix/routes0", json!({})).unwrap();
    put(store, "/apisix/upstreams/1", json!({})).unwrap();
    let routes = store.list("/apisix/routes/").unwrap();
    let keys: Vec<_> = routes.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["/apisix/routes/1", "/apisix/routes/2"]);
    assert_eq!(
        store.get("/apisix/routes/1").unwrap().unwrap().value,
        json!({"uri": "/b"})
    );
    assert!(delete(store, "/apisix/routes/1"));
    assert!(!delete(store, "/apisix/routes/1"));
    assert!(store.get("/apisix/routes/1").unwrap().is_none());
    assert_eq!(store.revision().unwrap(), 6);
    // A batch is one transaction and one notification; deleting a missing
    // key is skipped.
    let events = apply(
        store,
        vec![
            BatchOp::Put {
                key: "/apisix/routes/3".into(),
                value: json!({"uri": "/d"}),
            },
            BatchOp::Delete {
                key: "/apisix/routes/2".into(),
            },
            BatchOp::Delete {
                key: "/apisix/routes/404".into(),
            },
        ],
    )
    .unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(store.revision().unwrap(), 8);
    assert!(store.get("/apisix/routes/2").unwrap().is_none());
    assert_eq!(
        *rec.0.lock().unwrap(),
        [
            "reset  at 0",
            "put /apisix/routes/1 1",
            "put /apisix/routes/1 2",
            "put /apisix/routes/2 3",
            "put /apisix/routes0 4",
            "put /apisix/upstreams/1 5",
            "delete /apisix/routes/1",
            "put /apisix/routes/3 7 + delete /apisix/routes/2",
        ]
    );
    put(store, "/apisix/routes/2", json!({"uri": "/c"})).unwrap();
}

#[test]
fn memory_store_contract() {
    exercise(&MemoryStore::new());
}

#[test]
fn redb_store_contract_and_durability() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.redb");
    {
        let store = RedbStore::open(&path).unwrap();
        exercise(&store);
    }
    let reopened = RedbStore::open(&path).unwrap();
    assert_eq!(reopened.revision().unwrap(), 9);
    let e = reopened.get("/apisix/routes/2").unwrap().unwrap();
    assert_eq!(e.value, json!({"uri": "/c"}));
    assert_eq!(e.created_index, 9);
    let e = reopened.get("/apisix/routes/3").unwrap().unwrap();
    assert_eq!(e.created_index, 7);
}

#[test]
fn redb_revision_survives_reopen_whatever_wrote_it_last() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.redb");
    let reopen = |store: RedbStore| {
        drop(store);
        RedbStore::open(&path).unwrap()
    };
    let store = RedbStore::open(&path).unwrap();
    put(&store, "/apisix/routes/1", json!({})).unwrap();
    put(&store, "/apisix/routes/2", json!({})).unwrap();
    // The last write a put: its entry carries the revision.
    let store = reopen(store);
    assert_eq!(store.revision().unwrap(), 2);
    // A delete of the newest entry: only `meta` knows revision 3.
    assert!(delete(&store, "/apisix/routes/2"));
    let store = reopen(store);
    assert_eq!(store.revision().unwrap(), 3);
    // A put after the delete, of an older entry: the entry's 4 beats meta's 3.
    put(&store, "/apisix/routes/1", json!({"uri": "/a"})).unwrap();
    let store = reopen(store);
    assert_eq!(store.revision().unwrap(), 4);
    let e = store.get("/apisix/routes/1").unwrap().unwrap();
    assert_eq!((e.created_index, e.modified_index), (1, 4));
    // Everything deleted: meta alone still holds the last revision.
    assert!(delete(&store, "/apisix/routes/1"));
    let store = reopen(store);
    assert_eq!(store.revision().unwrap(), 5);
    assert_eq!(
        put(&store, "/apisix/routes/9", json!({}))
            .unwrap()
            .entry
            .modified_index,
        6
    );
}

#[test]
fn subscribe_starts_with_the_contents_then_follows() {
    let store = MemoryStore::new();
    put(&store, "/apisix/routes/1", json!({})).unwrap();
    put(&store, "/apisix/routes/2", json!({})).unwrap();
    let rec = Arc::new(Recorder::default());
    store.subscribe(rec.clone()).unwrap();
    put(&store, "/apisix/routes/3", json!({})).unwrap();
    assert_eq!(
        *rec.0.lock().unwrap(),
        [
            "reset /apisix/routes/1,/apisix/routes/2 at 2",
            "put /apisix/routes/3 3"
        ]
    );
}

#[test]
fn conditional_put_refuses_a_changed_object() {
    let store = MemoryStore::new();
    let first = put(&store, "/apisix/routes/1", json!({"uri": "/a"})).unwrap();
    put(&store, "/apisix/routes/1", json!({"uri": "/b"})).unwrap();
    let stale = store
        .put(
            "/apisix/routes/1",
            json!({"uri": "/c"}),
            Some(first.entry.modified_index),
        )
        .now_or_never()
        .unwrap();
    assert!(matches!(stale, Err(StoreError::Conflict)));
    assert_eq!(
        store.get("/apisix/routes/1").unwrap().unwrap().value,
        json!({"uri": "/b"})
    );
}

#[test]
fn redb_stamp_reads_what_a_whole_get_would() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(&dir.path().join("config.redb")).unwrap();
    let memory = MemoryStore::new();
    let values = [
        json!({"uri": "/a", "create_time": 1700000000, "plugins": {"p": {"create_time": 1}}}),
        json!({"uri": "/b"}),
        json!({"create_time": "text", "nested": [1, {"create_time": 2}]}),
        json!(["not", "an", "object"]),
        json!("scalar"),
    ];
    for (i, value) in values.into_iter().enumerate() {
        let key = format!("/apisix/routes/{i}");
        put(&store, &key, value.clone()).unwrap();
        put(&memory, &key, value).unwrap();
        let whole = store.get(&key).unwrap().map(|e| Stamp::of(&e));
        assert_eq!(store.stamp(&key).unwrap(), whole, "{key}");
        assert_eq!(memory.stamp(&key).unwrap(), whole, "{key}");
    }
    assert_eq!(store.stamp("/apisix/routes/none").unwrap(), None);
}

#[test]
fn redb_revision_survives_reopen_after_batches() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.redb");
    let put_op = |key: &str| BatchOp::Put {
        key: key.to_string(),
        value: json!({}),
    };
    let delete_op = |key: &str| BatchOp::Delete {
        key: key.to_string(),
    };
    let steps: Vec<(Vec<BatchOp>, u64)> = vec![
        // Puts only: the last entry written carries the revision.
        (
            vec![put_op("/apisix/routes/a"), put_op("/apisix/routes/b")],
            2,
        ),
        // A put then its delete in one batch: only meta can hold 4.
        (
            vec![put_op("/apisix/routes/c"), delete_op("/apisix/routes/c")],
            4,
        ),
        // Every route gone by prefix.
        (
            vec![BatchOp::DeletePrefix {
                prefix: "/apisix/routes/".to_string(),
            }],
            6,
        ),
        // A delete of nothing is no change; the put after it is 7.
        (
            vec![delete_op("/apisix/routes/x"), put_op("/apisix/routes/d")],
            7,
        ),
    ];
    for (ops, revision) in steps {
        let store = RedbStore::open(&path).unwrap();
        apply(&store, ops).unwrap();
        assert_eq!(store.revision().unwrap(), revision);
        drop(store);
        let reopened = RedbStore::open(&path).unwrap();
        assert_eq!(reopened.revision().unwrap(), revision, "after reopen");
    }
}

#[test]
fn redb_stamp_of_entries_written_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.redb");
    drop(RedbStore::open(&path).unwrap());
    let raw = [
        // An escaped key is still `create_time`.
        (
            "/apisix/routes/1",
            r#"{"key":"/apisix/routes/1","value":{"uri":"/a","create\u005ftime":5},"created_index":1,"modified_index":2}"#,
        ),
        // A null create_time is kept as null.
        (
            "/apisix/routes/2",
            r#"{"key":"/apisix/routes/2","value":{"create_time":null},"created_index":3,"modified_index":3}"#,
        ),
        // Repeated keys: the last one counts, as in a parsed object.
        (
            "/apisix/routes/3",
            r#"{"key":"/apisix/routes/3","value":{"create_time":1,"x":{},"create_time":2},"created_index":4,"modified_index":4}"#,
        ),
    ];
    {
        let db = redb::Database::open(&path).unwrap();
        let objects: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("objects");
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(objects).unwrap();
            for (key, json) in raw {
                table.insert(key, json.as_bytes()).unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let store = RedbStore::open(&path).unwrap();
    assert_eq!(store.revision().unwrap(), 4);
    let stamps: Vec<Option<Stamp>> = raw.iter().map(|(k, _)| store.stamp(k).unwrap()).collect();
    let wholes: Vec<Option<Stamp>> = raw
        .iter()
        .map(|(k, _)| store.get(k).unwrap().as_ref().map(Stamp::of))
        .collect();
    assert_eq!(stamps, wholes);
    let times: Vec<Option<Value>> = stamps.into_iter().map(|s| s.unwrap().create_time).collect();
    assert_eq!(times, [Some(json!(5)), Some(Value::Null), Some(json!(2))]);
}

/// What a crash leaves behind: records in the journal that the database
/// file does not have. Opening the store applies the newer ones, once.
#[test]
fn redb_applies_the_journaled_writes_its_file_misses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.redb");
    {
        let store = RedbStore::open(&path).unwrap();
        put(&store, "/apisix/routes/1", json!({"uri": "/a"})).unwrap();
    }
    {
        let (mut journal, found) =
            journal::Journal::open(&path.with_extension("journal"), false).unwrap();
        // Everything journaled before the clean close is in the file.
        assert!(found.iter().all(|r| r.revision <= 1));
        let entry = |key: &str, uri: &str, rev: u64| {
            serde_json::to_vec(&Entry {
                key: key.to_string(),
                value: json!({ "uri": uri }),
                created_index: rev,
                modified_index: rev,
            })
            .unwrap()
        };
        // Revision 1 is in the file already: not applied again.
        journal.begin();
        journal.put("/apisix/routes/1", &entry("/apisix/routes/1", "/stale", 1));
        journal.append(1).unwrap();
        journal.begin();
        journal.put("/apisix/routes/2", &entry("/apisix/routes/2", "/b", 2));
        journal.append(2).unwrap();
        journal.begin();
        journal.delete("/apisix/routes/1");
        journal.append(3).unwrap();
    }
    // Opened twice: the second open finds them applied (and its own write).
    for revision in [3, 4] {
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.revision().unwrap(), revision);
        assert_eq!(store.get("/apisix/routes/1").unwrap(), None);
        let e = store.get("/apisix/routes/2").unwrap().unwrap();
        assert_eq!(e.value, json!({"uri": "/b"}));
        if revision == 3 {
            let next = put(&store, "/apisix/routes/3", json!({})).unwrap();
            assert_eq!(next.entry.modified_index, 4);
        }
    }
}

#[test]
fn redb_keeps_every_write_across_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.redb");
    let n = u64::from(journal::CHECKPOINT_RECORDS) * 2 + 10;
    {
        let store = RedbStore::open(&path).unwrap();
        for i in 0..n {
            put(
                &store,
                &format!("/apisix/routes/{}", i % 50),
                json!({ "n": i }),
            )
            .unwrap();
        }
        assert_eq!(store.revision().unwrap(), n);
    }
    let store = RedbStore::open(&path).unwrap();
    assert_eq!(store.revision().unwrap(), n);
    let last = store
        .get(&format!("/apisix/routes/{}", (n - 1) % 50))
        .unwrap()
        .unwrap();
    assert_eq!(last.value, json!({ "n": n - 1 }));
    assert_eq!(store.list("/apisix/routes/").unwrap().len(), 50);
}

/// A journal left by a store whose database file was removed is not
/// applied to the new, empty one.
#[test]
fn redb_new_file_ignores_an_old_journal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.redb");
    {
        let store = RedbStore::open(&path).unwrap();
        put(&store, "/apisix/routes/1", json!({})).unwrap();
    }
    {
        let (mut journal, _) =
            journal::Journal::open(&path.with_extension("journal"), false).unwrap();
        journal.begin();
        journal.delete("/apisix/routes/9");
        journal.append(2).unwrap();
    }
    std::fs::remove_file(&path).unwrap();
    for _ in 0..2 {
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.revision().unwrap(), 0);
        assert!(store.list("/apisix/").unwrap().is_empty());
    }
}

/// A checkpoint makes the journaled (non-durable) commits durable in the
/// database file itself: a copy of the file taken while the store runs, as
/// a crash would leave it, holds every write up to the last checkpoint and
/// none after it.
#[test]
fn redb_file_alone_holds_every_write_up_to_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.redb");
    let store = RedbStore::open(&path).unwrap();
    let checkpoint = u64::from(journal::CHECKPOINT_RECORDS);
    for i in 1..=checkpoint + 5 {
        put(&store, &format!("/apisix/routes/{i}"), json!({ "n": i })).unwrap();
    }
    let copy = dir.path().join("crashed.redb");
    std::fs::copy(&path, &copy).unwrap();
    drop(store);
    let crashed = RedbStore::open(&copy).unwrap();
    assert_eq!(crashed.revision().unwrap(), checkpoint);
    let last = format!("/apisix/routes/{checkpoint}");
    assert_eq!(
        crashed.get(&last).unwrap().unwrap().value,
        json!({ "n": checkpoint })
    );
    let after = format!("/apisix/routes/{}", checkpoint + 1);
    assert_eq!(crashed.get(&after).unwrap(), None);
}

/// Reads see the writes still waiting for a checkpoint over the older
/// bytes in the database file: a get, a list (merged in key order), the
/// existence a delete checks and the keys a prefix delete removes.
#[test]
fn redb_reads_see_pending_writes_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(&dir.path().join("config.redb")).unwrap();
    let checkpoint = u64::from(journal::CHECKPOINT_RECORDS);
    let key = |i: u64| format!("/apisix/consumers/c/credentials/{i:05}");
    // The first `checkpoint` writes reach the file; the rest wait.
    for i in 0..checkpoint + 10 {
        put(&store, &key(i), json!({ "n": i })).unwrap();
    }
    put(&store, &key(3), json!({ "n": "new" })).unwrap();
    apply(
        &store,
        vec![
            BatchOp::Delete { key: key(4) },
            BatchOp::Delete {
                key: key(checkpoint + 1),
            },
            // Deleted a second time in the batch: nothing left to delete.
            BatchOp::Delete { key: key(4) },
        ],
    )
    .unwrap();
    assert_eq!(
        store.get(&key(3)).unwrap().unwrap().value,
        json!({"n": "new"})
    );
    assert_eq!(store.get(&key(3)).unwrap().unwrap().created_index, 4);
    assert_eq!(store.get(&key(4)).unwrap(), None);
    assert_eq!(store.stamp(&key(checkpoint + 1)).unwrap(), None);
    let listed: Vec<String> = store
        .list("/apisix/consumers/c/credentials/")
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    let expected: Vec<String> = (0..checkpoint + 10)
        .filter(|&i| i != 4 && i != checkpoint + 1)
        .map(key)
        .collect();
    assert_eq!(listed, expected);
    // A prefix delete, then a put under the prefix in the same batch.
    let events = apply(
        &store,
        vec![
            BatchOp::DeletePrefix {
                prefix: "/apisix/consumers/c/credentials/".into(),
            },
            BatchOp::Put {
                key: key(0),
                value: json!({ "back": true }),
            },
        ],
    )
    .unwrap();
    assert_eq!(events.len(), expected.len() + 1);
    let left = store.list("/apisix/consumers/c/").unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].value, json!({ "back": true }));
    // Created anew after its delete in the same batch.
    assert_eq!(left[0].created_index, left[0].modified_index);
}

/// A clean close writes the pending writes to the database file: read
/// alone, without the journal, it has them all.
#[test]
fn redb_close_leaves_every_write_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.redb");
    {
        let store = RedbStore::open(&path).unwrap();
        for i in 1..=5 {
            put(&store, &format!("/apisix/routes/{i}"), json!({ "n": i })).unwrap();
        }
        apply(
            &store,
            vec![BatchOp::Delete {
                key: "/apisix/routes/2".into(),
            }],
        )
        .unwrap();
    }
    let db = redb::Database::open(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let objects: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("objects");
    let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
    let table = txn.open_table(objects).unwrap();
    let keys: Vec<String> = table
        .iter()
        .unwrap()
        .map(|item| item.unwrap().0.value().to_string())
        .collect();
    assert_eq!(
        keys,
        [
            "/apisix/routes/1",
            "/apisix/routes/3",
            "/apisix/routes/4",
            "/apisix/routes/5"
        ]
    );
    let revision = txn
        .open_table(meta)
        .unwrap()
        .get("revision")
        .unwrap()
        .unwrap()
        .value();
    assert_eq!(revision, 6);
}

/// A write that does not fit in what is left of the journal goes to the
/// database file at once, with the writes pending before it.
#[test]
fn redb_writes_too_large_for_the_journal_go_to_the_file_with_the_pending_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.redb");
    let store = RedbStore::open(&path).unwrap();
    let mib = |n: usize| json!({ "desc": "x".repeat(n << 20) });
    put(&store, "/apisix/routes/small", json!({})).unwrap();
    put(&store, "/apisix/routes/a", mib(2)).unwrap();
    // Journaled: a copy of the file alone misses both.
    let copy = dir.path().join("copy1.redb");
    std::fs::copy(&path, &copy).unwrap();
    assert_eq!(RedbStore::open(&copy).unwrap().revision().unwrap(), 0);
    put(&store, "/apisix/routes/b", mib(3)).unwrap();
    put(&store, "/apisix/routes/c", mib(5)).unwrap();
    let copy = dir.path().join("copy2.redb");
    std::fs::copy(&path, &copy).unwrap();
    let alone = RedbStore::open(&copy).unwrap();
    assert_eq!(alone.revision().unwrap(), 4);
    assert_eq!(alone.list("/apisix/routes/").unwrap().len(), 4);
    assert_eq!(
        alone.get("/apisix/routes/c").unwrap().unwrap().value,
        mib(5)
    );
}
