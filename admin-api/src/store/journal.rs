//! The write-ahead journal in front of the embedded store's redb file.
//!
//! A durable redb commit writes about eight pages at scattered places of its
//! file and waits for all of them: most of the CPU a route update costs. With
//! the journal an acknowledged write is durable once its record (the keys and
//! bytes it stores or deletes) is written and synced at the end of the
//! journal: one small write. The store keeps those writes in memory, and one
//! durable redb commit every [`CHECKPOINT_RECORDS`] records, or when the
//! journal is full, writes them all to its file; the journal then starts
//! over. When the store is opened, records newer than the redb file's
//! revision are applied again. etcd keeps its write-ahead log in front of
//! bbolt the same way.
//!
//! The file is [`CAPACITY`] bytes, written with zeros when it is created, so
//! a record's write never changes its size or its extents and syncing it
//! (`fdatasync`) writes the record's blocks and no file-system metadata.
//! Records follow one another from offset 0, little-endian:
//!
//! `magic u32 | payload length u32 | generation u64 | crc32 u32 | payload`
//!
//! The crc covers the length, the generation and the payload. Each start-over
//! takes a new random generation; the current records are those read from
//! offset 0 up to the first that is torn, damaged or of another generation.
//! A torn record is one whose write had not finished, so it was never
//! acknowledged. The payload is `revision u64 | op count u32 | ops`, an op
//! `tag u8 (1 put, 2 delete) | key length u32 | key` and, for a put,
//! `value length u32 | value`.

use std::collections::hash_map::RandomState;
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// The journal's size. Records of this many bytes in all (about 8,000 route
/// updates) fit between two checkpoints; a single write larger than that is
/// committed to redb durably instead.
pub(super) const CAPACITY: u64 = 4 << 20;

/// Records after which the store writes what they hold to its redb file and
/// starts the journal over. What the store holds in memory until then grows
/// with them, and so does the work of a start-up replay.
pub(super) const CHECKPOINT_RECORDS: u32 = 1024;

const MAGIC: u32 = u32::from_le_bytes(*b"FGJ1");
const HEADER: usize = 20;
const PUT: u8 = 1;
const DELETE: u8 = 2;

/// One change a record holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Op {
    /// Store `value` (an entry's stored bytes) under `key`.
    Put {
        key: String,
        value: Vec<u8>,
    },
    Delete {
        key: String,
    },
}

/// A record read back: the store's revision after it, and its changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Record {
    pub revision: u64,
    pub ops: Vec<Op>,
}

/// Where [`Journal::append`] put a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Appended {
    /// Written and synced at this offset.
    At(u64),
    /// It does not fit in what is left; nothing was written.
    Full,
}

/// An open journal file. Not shared: the store keeps it under its write lock.
pub(super) struct Journal {
    file: File,
    generation: u64,
    /// Where the next record goes.
    end: u64,
    /// Records written since the journal last started over.
    records: u32,
    /// The record being built (header, revision and count filled in by
    /// [`Journal::append`]).
    buf: Vec<u8>,
    ops: u32,
}

impl Journal {
    /// Opens the journal at `path`, creating it (and syncing its directory)
    /// when missing or short, and returns it with the records of its current
    /// generation. `fresh`: the store's database file was just created, so
    /// records here belong to a store that is gone; they are made unreadable
    /// (synced) and none is returned. Fails on I/O errors and on a record
    /// whose checksum holds but whose payload does not parse (not a torn write:
    /// the file was written by something else).
    pub(super) fn open(path: &Path, fresh: bool) -> io::Result<(Journal, Vec<Record>)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            // Stored objects may hold secrets (consumers' keys).
            .mode(0o600)
            .open(path)?;
        let len = file.metadata()?.len();
        if len < CAPACITY {
            zero_fill(&file, len, CAPACITY)?;
            file.sync_all()?;
            sync_dir(path)?;
        }
        let records = if fresh {
            file.write_all_at(&[0; HEADER], 0)?;
            file.sync_data()?;
            Vec::new()
        } else {
            read_records(&file)?
        };
        let journal = Journal {
            file,
            generation: new_generation(),
            end: 0,
            records: 0,
            buf: Vec::new(),
            ops: 0,
        };
        Ok((journal, records))
    }

    /// Starts over: what the journal holds is durable elsewhere (the store's
    /// durable commit came first). Nothing is written; the next record goes
    /// to offset 0 with a new generation, which ends the current records.
    pub(super) fn restart(&mut self) {
        self.generation = new_generation();
        self.end = 0;
        self.records = 0;
    }

    /// Whether the store should make its commits durable and restart.
    pub(super) fn wants_checkpoint(&self) -> bool {
        self.records >= CHECKPOINT_RECORDS
    }

    /// Begins a record; [`Journal::put`] and [`Journal::delete`] add to it,
    /// [`Journal::append`] writes it.
    pub(super) fn begin(&mut self) {
        self.buf.clear();
        // Header, revision and op count: filled in by `append`.
        self.buf.resize(HEADER + 12, 0);
        self.ops = 0;
    }

    pub(super) fn put(&mut self, key: &str, value: &[u8]) {
        self.buf.push(PUT);
        push_bytes(&mut self.buf, key.as_bytes());
        push_bytes(&mut self.buf, value);
        self.ops += 1;
    }

    pub(super) fn delete(&mut self, key: &str) {
        self.buf.push(DELETE);
        push_bytes(&mut self.buf, key.as_bytes());
        self.ops += 1;
    }

    /// Writes the record begun last, the store at `revision` after it, and
    /// waits until it is on disk. On an I/O error the record may or may not
    /// be there: a restart then applies it or not, as with any write that was
    /// not acknowledged.
    pub(super) fn append(&mut self, revision: u64) -> io::Result<Appended> {
        let total = self.buf.len() as u64;
        if self.end + total > CAPACITY {
            return Ok(Appended::Full);
        }
        // Fits in u32: the record is at most CAPACITY bytes.
        let payload = (self.buf.len() - HEADER) as u32;
        self.buf[HEADER..HEADER + 8].copy_from_slice(&revision.to_le_bytes());
        self.buf[HEADER + 8..HEADER + 12].copy_from_slice(&self.ops.to_le_bytes());
        self.buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        self.buf[4..8].copy_from_slice(&payload.to_le_bytes());
        self.buf[8..16].copy_from_slice(&self.generation.to_le_bytes());
        let crc = checksum(&self.buf[4..16], &self.buf[HEADER..]);
        self.buf[16..20].copy_from_slice(&crc.to_le_bytes());
        let at = self.end;
        self.file.write_all_at(&self.buf, at)?;
        self.file.sync_data()?;
        self.end += total;
        self.records += 1;
        Ok(Appended::At(at))
    }
}

fn push_bytes(buf: &mut Vec<u8>, bytes: &[u8]) {
    // A longer field makes the record larger than CAPACITY, which `append`
    // refuses before writing anything.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(bytes);
}

fn checksum(head: &[u8], payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(head);
    crc.update(payload);
    crc.finalize()
}

/// A generation no earlier start-over is likely to have had: 64 random bits
/// (std's hasher keys come from the OS's random source), mixed with the time.
fn new_generation() -> u64 {
    let mut h = RandomState::new().build_hasher();
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(now.as_nanos());
    }
    h.finish()
}

fn zero_fill(file: &File, from: u64, to: u64) -> io::Result<()> {
    let zeros = vec![0u8; 1 << 16];
    let mut at = from;
    while at < to {
        let n = (to - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Makes a new file's name durable: its directory is synced.
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// The records of the generation found at offset 0.
fn read_records(file: &File) -> io::Result<Vec<Record>> {
    let len = file.metadata()?.len();
    let len = usize::try_from(len).map_err(|_| invalid("journal too large"))?;
    let mut data = vec![0; len];
    file.read_exact_at(&mut data, 0)?;
    let mut out = Vec::new();
    let mut generation = None;
    let mut at = 0;
    while let Some((gen, payload, next)) = frame(&data, at) {
        if *generation.get_or_insert(gen) != gen {
            break;
        }
        out.push(decode(payload).ok_or_else(|| invalid("journal record does not parse"))?);
        at = next;
    }
    Ok(out)
}

/// The record at `at`, if one is whole there: its generation, payload and
/// the offset after it.
fn frame(data: &[u8], at: usize) -> Option<(u64, &[u8], usize)> {
    let head = data.get(at..at.checked_add(HEADER)?)?;
    if u32::from_le_bytes(head[0..4].try_into().ok()?) != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(head[4..8].try_into().ok()?) as usize;
    let generation = u64::from_le_bytes(head[8..16].try_into().ok()?);
    let crc = u32::from_le_bytes(head[16..20].try_into().ok()?);
    let start = at + HEADER;
    let end = start.checked_add(len)?;
    let payload = data.get(start..end)?;
    (checksum(&head[4..16], payload) == crc).then_some((generation, payload, end))
}

fn decode(payload: &[u8]) -> Option<Record> {
    let mut r = Reader(payload);
    let revision = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
    let count = u32::from_le_bytes(r.take(4)?.try_into().ok()?);
    let mut ops = Vec::new();
    for _ in 0..count {
        let tag = r.take(1)?[0];
        let key = String::from_utf8(r.bytes()?.to_vec()).ok()?;
        ops.push(match tag {
            PUT => Op::Put {
                key,
                value: r.bytes()?.to_vec(),
            },
            DELETE => Op::Delete { key },
            _ => return None,
        });
    }
    r.0.is_empty().then_some(Record { revision, ops })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        self.take(len)
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

#[cfg(test)]
mod tests;
