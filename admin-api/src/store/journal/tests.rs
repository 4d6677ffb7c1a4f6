use super::*;

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.to_string(),
        value: value.as_bytes().to_vec(),
    }
}

fn write(journal: &mut Journal, revision: u64, ops: &[Op]) -> Appended {
    journal.begin();
    for op in ops {
        match op {
            Op::Put { key, value } => journal.put(key, value),
            Op::Delete { key } => journal.delete(key),
        }
    }
    journal.append(revision).unwrap()
}

/// A new journal in a directory of its own (kept alive by the `TempDir`).
fn new_journal() -> (tempfile::TempDir, std::path::PathBuf, Journal) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let (journal, found) = Journal::open(&path, false).unwrap();
    assert!(found.is_empty());
    (dir, path, journal)
}

/// A journal holding `put a` (revision 1) and `put b` (revision 2), and
/// where the second record starts.
fn two_records() -> (tempfile::TempDir, std::path::PathBuf, Journal, u64) {
    let (dir, path, mut j) = new_journal();
    write(&mut j, 1, &[put("a", "1")]);
    let Appended::At(at) = write(&mut j, 2, &[put("b", "2")]) else {
        panic!("full")
    };
    (dir, path, j, at)
}

#[test]
fn records_read_back_in_order_after_reopen() {
    let (_dir, path, mut j) = new_journal();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), CAPACITY);
    let one = vec![put("/apisix/routes/1", "{\"a\":1}")];
    let two = vec![
        Op::Delete {
            key: "/apisix/routes/1".into(),
        },
        put("/apisix/routes/2", ""),
    ];
    assert_eq!(write(&mut j, 7, &one), Appended::At(0));
    assert!(matches!(write(&mut j, 9, &two), Appended::At(n) if n > 0));
    drop(j);
    let (_, found) = Journal::open(&path, false).unwrap();
    assert_eq!(
        found,
        vec![
            Record {
                revision: 7,
                ops: one
            },
            Record {
                revision: 9,
                ops: two
            }
        ]
    );
}

#[test]
fn a_restart_ends_the_older_records_even_where_they_are_not_overwritten() {
    let (_dir, path, mut j) = new_journal();
    // Same sizes, so the new generation's record ends exactly where an
    // older record begins.
    for rev in 1..=3 {
        write(&mut j, rev, &[put("k", "v")]);
    }
    j.restart();
    write(&mut j, 4, &[put("k", "w")]);
    let (_, found) = Journal::open(&path, false).unwrap();
    assert_eq!(
        found,
        vec![Record {
            revision: 4,
            ops: vec![put("k", "w")]
        }]
    );
}

#[test]
fn a_torn_record_ends_the_journal() {
    let (_dir, path, mut j, at) = two_records();
    write(&mut j, 3, &[put("c", "3")]);
    drop(j);
    // The second record's last byte never reached the disk.
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    let last = at + HEADER as u64 + 12 + 1 + 4 + 1 + 4;
    file.write_all_at(b"X", last).unwrap();
    let (_, found) = Journal::open(&path, false).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].revision, 1);
}

#[test]
fn a_fresh_store_does_not_see_an_old_journal_even_after_another_crash() {
    let (_dir, path, mut j) = new_journal();
    write(&mut j, 1, &[put("a", "1")]);
    drop(j);
    let (_, found) = Journal::open(&path, true).unwrap();
    assert!(found.is_empty());
    // Nothing written since: the old record stays unreadable.
    let (_, found) = Journal::open(&path, false).unwrap();
    assert!(found.is_empty());
}

#[test]
fn a_record_that_does_not_fit_is_not_written() {
    let (_dir, path, mut j) = new_journal();
    let big = "x".repeat(CAPACITY as usize / 2);
    assert_eq!(write(&mut j, 1, &[put("a", &big)]), Appended::At(0));
    assert_eq!(write(&mut j, 2, &[put("b", &big)]), Appended::Full);
    let (_, found) = Journal::open(&path, false).unwrap();
    assert_eq!(found.len(), 1);
    // After a restart it fits again.
    j.restart();
    assert_eq!(write(&mut j, 2, &[put("b", &big)]), Appended::At(0));
}

#[test]
fn checkpoints_are_asked_for_after_enough_records() {
    let (_dir, _path, mut j) = new_journal();
    for rev in 0..u64::from(CHECKPOINT_RECORDS) {
        assert!(!j.wants_checkpoint());
        write(&mut j, rev, &[Op::Delete { key: "k".into() }]);
    }
    assert!(j.wants_checkpoint());
    j.restart();
    assert!(!j.wants_checkpoint());
}

#[test]
fn a_well_sealed_record_that_does_not_parse_is_an_error() {
    let (_dir, path, mut j) = new_journal();
    j.begin();
    j.buf.push(9); // an unknown op tag
    j.ops = 1;
    j.append(1).unwrap();
    let err = Journal::open(&path, false).err().unwrap();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
}

#[test]
fn garbage_never_reads_as_records() {
    // Every prefix and every single-byte change of a valid journal reads
    // as some leading part of its records, never as anything else.
    let (_dir, path, mut j) = new_journal();
    write(&mut j, 1, &[put("a", "1")]);
    write(&mut j, 2, &[Op::Delete { key: "a".into() }]);
    drop(j);
    let (_, all) = Journal::open(&path, false).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let used = 2 * HEADER + 2 * 12 + (1 + 4 + 1 + 4 + 1) + (1 + 4 + 1);
    for i in 0..used {
        let mut damaged = bytes.clone();
        damaged[i] ^= 0x5a;
        std::fs::write(&path, &damaged).unwrap();
        let (_, found) = Journal::open(&path, false).unwrap();
        assert!(all.starts_with(&found), "byte {i}");
        assert!(found.len() < all.len(), "byte {i}");
    }
}
