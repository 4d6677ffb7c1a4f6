//! The server's TLS session cache: what lets a client resume a session
//! (TLS 1.2 session ids, TLS 1.3 single-use tickets) without a full
//! handshake.
//!
//! rustls's own memory cache finds the entry to forget by scanning its
//! whole insertion queue when a TLS 1.3 ticket is used, which costs tens of
//! microseconds per resumed handshake with tens of thousands of sessions.
//! This one does every operation in constant (amortised) time: entries
//! carry a sequence number, the queue may hold stale positions, and stale
//! positions are dropped as the queue is walked.
//!
//! Bounds: at most `capacity` sessions (the oldest go first), each kept for
//! at most `2 * capacity` later insertions, and a queue of at most twice the
//! capacity.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use rustls::server::StoresServerSessions;

/// Sessions by id, oldest dropped first.
#[derive(Debug)]
pub struct SessionCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// id -> (session, sequence number of its insertion).
    sessions: HashMap<Vec<u8>, (Vec<u8>, u64)>,
    /// Insertion order; an entry whose number no longer matches is stale.
    order: VecDeque<(Vec<u8>, u64)>,
    next: u64,
}

impl SessionCache {
    pub fn new(capacity: usize) -> Self {
        SessionCache {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave the maps inconsistent in a way that
        // matters more than losing a resumption.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sessions held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    /// Drops the oldest live session.
    fn evict_one(&mut self) {
        while let Some((id, seq)) = self.order.pop_front() {
            if self.sessions.get(&id).is_some_and(|(_, s)| *s == seq) {
                self.sessions.remove(&id);
                return;
            }
        }
    }

    /// Shortens the queue to `limit` from the front: stale positions go,
    /// and so do sessions older than `limit` insertions (whose positions
    /// would otherwise pin the queue's length).
    fn compact(&mut self, limit: usize) {
        while self.order.len() > limit {
            let Some((id, seq)) = self.order.pop_front() else {
                return;
            };
            if self.sessions.get(&id).is_some_and(|(_, s)| *s == seq) {
                self.sessions.remove(&id);
            }
        }
    }
}

impl StoresServerSessions for SessionCache {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let mut inner = self.lock();
        inner.next += 1;
        let seq = inner.next;
        inner.sessions.insert(key.clone(), (value, seq));
        inner.order.push_back((key, seq));
        while inner.sessions.len() > self.capacity {
            inner.evict_one();
        }
        inner.compact(2 * self.capacity);
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.lock().sessions.get(key).map(|(v, _)| v.clone())
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.lock().sessions.remove(key).map(|(v, _)| v)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> Vec<u8> {
        n.to_be_bytes().to_vec()
    }

    #[test]
    fn put_get_take() {
        let c = SessionCache::new(4);
        assert!(c.put(id(1), b"one".to_vec()));
        assert_eq!(c.get(&id(1)).as_deref(), Some(&b"one"[..]));
        assert_eq!(c.take(&id(1)).as_deref(), Some(&b"one"[..]));
        assert_eq!(c.take(&id(1)), None, "a ticket is used once");
        assert!(c.is_empty());
    }

    #[test]
    fn oldest_go_first_and_the_queue_stays_bounded() {
        let c = SessionCache::new(3);
        for n in 0..3 {
            c.put(id(n), vec![n as u8]);
        }
        c.put(id(3), vec![3]);
        assert_eq!(c.get(&id(0)), None, "the oldest was dropped");
        assert_eq!(c.len(), 3);
        // Replacing a session makes it the newest.
        c.put(id(1), vec![11]);
        c.put(id(4), vec![4]);
        assert_eq!(c.get(&id(2)), None);
        assert_eq!(c.get(&id(1)), Some(vec![11]));
        // Many put+take pairs leave no garbage behind.
        for n in 100..10_000 {
            c.put(id(n), vec![0]);
            c.take(&id(n));
        }
        let inner = c.lock();
        assert!(inner.order.len() <= 6, "{}", inner.order.len());
        assert!(inner.sessions.len() <= 3);
    }
}
