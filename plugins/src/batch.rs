//! APISIX's batch processor, shared by the loggers: entries gather in a
//! batch that is sent when it holds `batch_max_size` entries, when
//! `inactive_timeout` seconds pass without a new entry, or when the oldest
//! entry is `buffer_duration` seconds old. A failed batch is tried again
//! after `retry_delay` seconds, `max_retry_count` times, then dropped and
//! counted.
//!
//! Memory is bounded: at most `max_pending_entries` (default 8192) entries
//! wait, in the batch being filled and the batches being sent or retried
//! together; entries beyond that are dropped and counted, so a collector that
//! is down never makes the gateway grow. Adding an entry takes a short lock
//! and never waits for a send: requests are never held by a logger.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::schema::Schema;

/// `max_pending_entries` default, as APISIX's.
pub const DEFAULT_MAX_PENDING: usize = 8192;

/// The batch processor's settings, from a logger's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchConf {
    pub name: String,
    pub batch_max_size: usize,
    pub inactive_timeout: Duration,
    pub buffer_duration: Duration,
    pub max_retry_count: u32,
    pub retry_delay: Duration,
    pub max_pending: usize,
}

impl BatchConf {
    /// Reads the keys [`add_schema`] declares; `name` defaults to
    /// `default_name`.
    pub fn from_conf(conf: &Value, default_name: &str, max_pending: Option<usize>) -> BatchConf {
        let int = |k: &str, d: u64| conf.get(k).and_then(Value::as_u64).unwrap_or(d);
        BatchConf {
            name: conf
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or(default_name)
                .to_string(),
            batch_max_size: int("batch_max_size", 1000).max(1) as usize,
            inactive_timeout: Duration::from_secs(int("inactive_timeout", 5).max(1)),
            buffer_duration: Duration::from_secs(int("buffer_duration", 60).max(1)),
            max_retry_count: int("max_retry_count", 0).min(u64::from(u32::MAX)) as u32,
            retry_delay: Duration::from_secs(int("retry_delay", 1)),
            max_pending: max_pending.unwrap_or(DEFAULT_MAX_PENDING).max(1),
        }
    }
}

/// Adds the batch processor's keys (APISIX's schema and defaults) to a
/// logger's schema.
pub fn add_schema(schema: crate::schema::ObjectRule) -> crate::schema::ObjectRule {
    let int = |min: f64| Schema::integer().min(min).int();
    schema
        .prop("name", Schema::string().done())
        .prop("max_retry_count", int(0.0))
        .prop("retry_delay", int(0.0))
        .prop("buffer_duration", int(1.0))
        .prop("inactive_timeout", int(1.0))
        .prop("batch_max_size", int(1.0))
}

/// Sends one batch; `Err` with the reason when it failed.
pub type SendFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Where batches go (an HTTP collector, a file, a socket). Entries are
/// JSON log entries unless a processor says otherwise (spans).
pub trait Sender<T = Value>: Send + Sync + 'static {
    fn send(&self, entries: Vec<T>) -> SendFuture;
}

struct Pending<T> {
    entries: Vec<T>,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
}

/// One batch processor (one per logger configuration).
pub struct Processor<T = Value> {
    conf: BatchConf,
    pending: Mutex<Pending<T>>,
    /// Entries held: in `pending` and in batches being sent.
    held: AtomicUsize,
    wake: Notify,
    /// Entries dropped: over `max_pending_entries`, or after the last retry.
    pub dropped: AtomicU64,
    /// Entries delivered.
    pub sent: AtomicU64,
    sender: Arc<dyn Sender<T>>,
    task: OnceLock<()>,
}

impl<T: Clone + Send + 'static> Processor<T> {
    /// A processor sending through `sender`. Its task starts with the
    /// first entry (on the runtime that entry comes from) and ends when the
    /// last handle (the compiled plugin) is dropped, after sending what it
    /// holds.
    pub fn new(conf: BatchConf, sender: Arc<dyn Sender<T>>) -> Processor<T> {
        Processor {
            conf,
            pending: Mutex::new(Pending {
                entries: Vec::new(),
                first_at: None,
                last_at: None,
            }),
            held: AtomicUsize::new(0),
            wake: Notify::new(),
            dropped: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            sender,
            task: OnceLock::new(),
        }
    }

    #[cfg(test)]
    fn start(conf: BatchConf, sender: Arc<dyn Sender<T>>) -> Arc<Processor<T>> {
        Arc::new(Processor::new(conf, sender))
    }

    /// Adds the entry `build` makes, building it only when it will be
    /// kept: a collector that is down costs requests nothing but this
    /// check. Never waits.
    pub fn push_with(self: &Arc<Self>, build: impl FnOnce() -> T) {
        if self.has_room() {
            self.push(build());
        } else {
            self.drop_one();
        }
    }

    fn has_room(&self) -> bool {
        self.held.load(Ordering::Relaxed) < self.conf.max_pending
    }

    fn drop_one(&self) {
        let before = self.dropped.fetch_add(1, Ordering::Relaxed);
        if before.is_multiple_of(1000) {
            tracing::warn!(name = %self.conf.name, max_pending_entries = self.conf.max_pending, dropped = before + 1, "batch queue full; entries dropped");
        }
    }

    /// Adds an entry; never waits.
    pub fn push(self: &Arc<Self>, entry: T) {
        self.task
            .get_or_init(|| match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(run(Arc::downgrade(self), self.sender.clone()));
                }
                Err(_) => {
                    tracing::error!(name = %self.conf.name, "no runtime: log entries not sent")
                }
            });
        if !self.has_room() {
            self.drop_one();
            return;
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        let full = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            p.first_at.get_or_insert(now);
            p.last_at = Some(now);
            p.entries.push(entry);
            p.entries.len() >= self.conf.batch_max_size || p.entries.len() == 1
        };
        // The first entry arms the timers; a full batch goes at once.
        if full {
            self.wake.notify_one();
        }
    }

    /// The batch to send now, if one is due; otherwise when to look again.
    fn due(&self, closing: bool) -> Result<Vec<T>, Option<Instant>> {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let (Some(first), Some(last)) = (p.first_at, p.last_at) else {
            return Err(None);
        };
        // The schema bounds neither duration: one past what `Instant` holds
        // is no deadline at all, not a panic.
        let deadline = match (
            last.checked_add(self.conf.inactive_timeout),
            first.checked_add(self.conf.buffer_duration),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let expired = deadline.is_some_and(|d| Instant::now() >= d);
        if closing || p.entries.len() >= self.conf.batch_max_size || expired {
            let take = p.entries.len().min(self.conf.batch_max_size);
            let batch: Vec<T> = p.entries.drain(..take).collect();
            if p.entries.is_empty() {
                p.first_at = None;
                p.last_at = None;
            } else {
                p.first_at = Some(Instant::now());
            }
            Ok(batch)
        } else {
            Err(deadline)
        }
    }

    /// Entries waiting or being sent.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// Sends `batch`, retrying as configured; counts what happened.
async fn deliver<T: Clone + 'static>(p: &Processor<T>, sender: &dyn Sender<T>, batch: Vec<T>) {
    let n = batch.len();
    let mut tries = 0;
    loop {
        match sender.send(batch.clone()).await {
            Ok(()) => {
                p.sent.fetch_add(n as u64, Ordering::Relaxed);
                break;
            }
            Err(e) if tries < p.conf.max_retry_count => {
                tries += 1;
                tracing::warn!(name = %p.conf.name, error = %e, retry = tries, "failed to send a batch; retrying");
                tokio::time::sleep(p.conf.retry_delay).await;
            }
            Err(e) => {
                p.dropped.fetch_add(n as u64, Ordering::Relaxed);
                tracing::error!(name = %p.conf.name, error = %e, entries = n, "batch dropped after {tries} retries");
                break;
            }
        }
    }
    p.held.fetch_sub(n, Ordering::Relaxed);
}

async fn run<T: Clone + Send + 'static>(
    p: std::sync::Weak<Processor<T>>,
    sender: Arc<dyn Sender<T>>,
) {
    loop {
        let Some(strong) = p.upgrade() else { return };
        let next = match strong.due(false) {
            Ok(batch) => {
                deliver(&strong, sender.as_ref(), batch).await;
                continue;
            }
            Err(next) => next,
        };
        // Wait for an entry or the deadline without keeping the processor
        // alive; check now and then whether it is still wanted.
        let wake = async {
            let waiter = strong.wake.notified();
            tokio::pin!(waiter);
            let limit = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            tokio::select! {
                _ = &mut waiter => {}
                _ = tokio::time::sleep_until(limit.min(Instant::now() + Duration::from_secs(1))) => {}
            }
        };
        wake.await;
        if Arc::strong_count(&strong) == 1 {
            // Only this task holds it: send what is left, then stop.
            while let Ok(batch) = strong.due(true) {
                if batch.is_empty() {
                    break;
                }
                deliver(&strong, sender.as_ref(), batch).await;
            }
            return;
        }
    }
}

/// [`encode`] on a blocking thread: a batch of large entries takes long
/// enough to encode that it would hold up the requests of a
/// single-threaded runtime.
pub async fn encode_off_thread(
    entries: Vec<Value>,
    batch_max_size: usize,
    new_line: bool,
) -> String {
    match tokio::task::spawn_blocking(move || encode(&entries, batch_max_size, new_line)).await {
        Ok(text) => text,
        Err(e) => {
            tracing::error!(error = %e, "log batch encoding failed");
            String::new()
        }
    }
}

/// The JSON body APISIX's loggers send for `entries`: one object when
/// `batch_max_size` is 1, else an array (`json`) or one object per line
/// (`new_line`).
pub fn encode(entries: &[Value], batch_max_size: usize, new_line: bool) -> String {
    if batch_max_size == 1 && entries.len() == 1 {
        return entries[0].to_string();
    }
    if new_line {
        entries
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        json!(entries).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Collect {
        got: Mutex<Vec<Vec<Value>>>,
        fail: AtomicUsize,
    }

    impl Sender for Collect {
        fn send(&self, entries: Vec<Value>) -> SendFuture {
            let failing = self.fail.load(Ordering::Relaxed) > 0;
            if failing {
                self.fail.fetch_sub(1, Ordering::Relaxed);
            } else {
                self.got.lock().expect("lock").push(entries);
            }
            Box::pin(async move {
                if failing {
                    Err("down".to_string())
                } else {
                    Ok(())
                }
            })
        }
    }

    fn conf(v: Value) -> BatchConf {
        BatchConf::from_conf(&v, "test", Some(10))
    }

    #[tokio::test(start_paused = true)]
    async fn sends_full_batches_then_the_rest_after_inactivity() {
        let sink = Arc::new(Collect {
            got: Mutex::default(),
            fail: AtomicUsize::new(0),
        });
        let p = Processor::start(
            conf(json!({"batch_max_size": 3, "inactive_timeout": 2})),
            sink.clone(),
        );
        for i in 0..4 {
            p.push(json!(i));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(sink.got.lock().expect("lock").len(), 1);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let got = sink.got.lock().expect("lock").clone();
        assert_eq!(
            got,
            vec![vec![json!(0), json!(1), json!(2)], vec![json!(3)]]
        );
        assert_eq!(p.sent.load(Ordering::Relaxed), 4);
        assert_eq!(p.held(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_then_drops_and_bounds_the_backlog() {
        let sink = Arc::new(Collect {
            got: Mutex::default(),
            fail: AtomicUsize::new(100),
        });
        let p = Processor::start(
            conf(json!({"batch_max_size": 5, "max_retry_count": 2, "retry_delay": 1})),
            sink.clone(),
        );
        for i in 0..25 {
            p.push(json!(i));
        }
        // Ten held at most (max_pending 10): fifteen dropped at once.
        assert_eq!(p.dropped.load(Ordering::Relaxed), 15);
        tokio::time::sleep(Duration::from_secs(30)).await;
        // Both batches failed three times (one try, two retries): dropped.
        assert_eq!(p.dropped.load(Ordering::Relaxed), 25);
        assert_eq!(p.held(), 0);
        // The collector is back: new entries go through.
        sink.fail.store(0, Ordering::Relaxed);
        for i in 0..5 {
            p.push(json!(i));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(p.sent.load(Ordering::Relaxed), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_beyond_the_clock_wait_for_a_full_batch() {
        let sink = Arc::new(Collect {
            got: Mutex::default(),
            fail: AtomicUsize::new(0),
        });
        let huge = u64::MAX;
        let p = Processor::start(
            conf(json!({"batch_max_size": 2, "inactive_timeout": huge, "buffer_duration": huge})),
            sink.clone(),
        );
        p.push(json!(1));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(sink.got.lock().expect("lock").is_empty());
        p.push(json!(2));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(p.sent.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn encodes_as_apisix() {
        let e = [json!({"a": 1}), json!({"b": 2})];
        assert_eq!(encode(&e[..1], 1, false), "{\"a\":1}");
        assert_eq!(encode(&e, 10, false), "[{\"a\":1},{\"b\":2}]");
        assert_eq!(encode(&e, 10, true), "{\"a\":1}\n{\"b\":2}");
    }
}
