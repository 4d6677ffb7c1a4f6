//! etcd as the shared store: several gateways, one configuration.
//!
//! Keys and values are APISIX's (`{prefix}/routes/1` holding the route's
//! JSON, credentials under `{prefix}/consumers/{name}/credentials/{id}`,
//! secrets encrypted with `data_encryption`), so ferrogate and APISIX nodes
//! can share one etcd. Inside ferrogate keys keep the `/apisix` prefix; this
//! store maps them to `deployment.etcd.prefix` at its boundary.
//!
//! Each node keeps a mirror of the prefix: it lists once, then watches from
//! the listed revision, so no change is missed between the two. Reads answer
//! from the mirror (and keep answering while etcd is down); writes go to
//! etcd and resolve once the mirror has applied their revision, so the
//! writing node's next request already sees them. When the watch cannot
//! replay what was missed (compaction, etcd restored from an older state),
//! the node lists again and publishes the result as one snapshot. The
//! mirror is also written to a local cache file, which serves a node that
//! starts while etcd is unreachable.
//!
//! Failure modes: etcd unreachable makes writes fail with
//! [`StoreError::Unavailable`] (the Admin API answers 503) while reads and
//! the data plane go on with the last configuration; the watch retries with
//! a growing delay (up to `resync_delay`) and resyncs on its own. A value
//! that is not JSON or fails validation is logged with its key and skipped.

mod cache;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KeyValue,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use futures_util::FutureExt;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use self::cache::{Cache, CacheOp, Cached};
use super::crypt::Keyring;
use super::{
    entries_below, BatchOp, Change, Entry, Event, PutOutcome, Store, StoreError, Watcher, Watchers,
    WriteFuture, KEY_PREFIX,
};
use crate::validate::{self, Lookup};
use crate::Kind;

/// Objects per page of a full listing (etcd's answers stay well under the
/// client's 4 MiB message limit even with certificates).
const LIST_PAGE: i64 = 500;
/// APISIX's error when no etcd endpoint can be reached.
const NO_ENDPOINT: &str = "has no healthy etcd endpoint available";
/// Longest wait between two attempts to reach etcd again.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// `deployment.etcd` of config.yaml, resolved.
#[derive(Debug)]
pub struct EtcdSettings {
    /// `host`: endpoints, `http://` or `https://`.
    pub hosts: Vec<String>,
    /// `prefix` without a trailing slash (default `/apisix`).
    pub prefix: String,
    /// `timeout`: bound of each request to etcd (default 30 s).
    pub timeout: Duration,
    /// `user` and `password`, when etcd has authentication on.
    pub auth: Option<(String, String)>,
    pub tls: Option<EtcdTls>,
    /// `startup_retry`: attempts at the first listing (default 2).
    pub startup_retry: u32,
    /// `watch_timeout`: a watch is re-created after this long (default 50 s).
    pub watch_timeout: Duration,
    /// `resync_delay`: the longest wait before retrying (default 5 s).
    pub resync_delay: Duration,
    /// Where the local copy of the configuration is kept.
    pub cache: Option<PathBuf>,
    /// `apisix.data_encryption`.
    pub keyring: Keyring,
}

/// `deployment.etcd.tls` plus the CA certificates to trust.
#[derive(Debug, Default, Clone)]
pub struct EtcdTls {
    /// PEM CA certificates (`apisix.ssl.ssl_trusted_certificate`).
    pub ca: Option<Vec<u8>>,
    /// PEM client certificate and key (`tls.cert`, `tls.key`).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// `tls.sni`: the name to verify instead of the host's.
    pub sni: Option<String>,
}

/// A [`Store`] on etcd. Dropping it stops its watch.
pub struct EtcdStore {
    shared: Arc<Shared>,
    follower: JoinHandle<()>,
}

/// Writes the cache, several queued changes per transaction.
async fn write_cache(
    cache: Arc<Cache>,
    origin: String,
    dirty: Arc<AtomicBool>,
    mut rx: mpsc::UnboundedReceiver<CacheOp>,
) {
    while let Some(first) = rx.recv().await {
        let mut ops = vec![first];
        while let Ok(op) = rx.try_recv() {
            ops.push(op);
        }
        let (cache, origin) = (cache.clone(), origin.clone());
        let written = tokio::task::spawn_blocking(move || cache.write(&origin, &ops)).await;
        let error = match written {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(error = %error, "writing the local copy of etcd's configuration failed; it is rewritten whole next time");
        dirty.store(true, Ordering::Relaxed);
    }
}

struct Shared {
    settings: EtcdSettings,
    client: tokio::sync::Mutex<Option<Client>>,
    view: RwLock<View>,
    /// Held while the mirror changes and watchers are told, and while a
    /// watcher subscribes: the order every watcher sees.
    feed: Mutex<()>,
    watchers: Watchers,
    applied: watch::Sender<u64>,
    /// Revision up to which etcd has sent everything under the prefix
    /// (events or progress notices); watches resume after it.
    cursor: AtomicU64,
    /// Changes for the local copy, written by their own task so that a slow
    /// disk never holds up the next change.
    cache: Option<mpsc::UnboundedSender<CacheOp>>,
    /// A cache write failed: the next one rewrites it whole.
    cache_dirty: Arc<AtomicBool>,
    reachable: AtomicBool,
}

#[derive(Default)]
struct View {
    objects: BTreeMap<String, Entry>,
    revision: u64,
}

/// How one watch ended.
enum WatchEnd {
    /// `watch_timeout` passed: watch again from the same revision.
    Renew,
    /// etcd can no longer replay from our revision: list again.
    Relist,
}

impl EtcdStore {
    /// Connects and loads the configuration: from etcd, or when etcd cannot
    /// be reached after `startup_retry` attempts, from the local cache. Fails
    /// when neither has it.
    pub async fn open(settings: EtcdSettings) -> Result<Self, StoreError> {
        let cache = match &settings.cache {
            Some(path) => match Cache::open(path) {
                Ok(c) => Some(Arc::new(c)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "local copy of etcd's configuration unusable; going on without it");
                    None
                }
            },
            None => None,
        };
        let origin = origin_of(&settings);
        let cached = match &cache {
            Some(c) => c.load(&origin).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read the local copy of etcd's configuration");
                None
            }),
            None => None,
        };
        let cache_dirty = Arc::new(AtomicBool::new(false));
        let cache_tx = cache.map(|cache| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(write_cache(cache, origin, cache_dirty.clone(), rx));
            tx
        });
        let (applied, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            settings,
            client: tokio::sync::Mutex::new(None),
            view: RwLock::new(View::default()),
            feed: Mutex::new(()),
            watchers: Watchers::default(),
            applied,
            cursor: AtomicU64::new(0),
            cache: cache_tx,
            cache_dirty,
            reachable: AtomicBool::new(false),
        });
        let attempts = shared.settings.startup_retry.max(1);
        let mut last_error = None;
        for attempt in 1..=attempts {
            match shared.relist().await {
                Ok(()) => {
                    last_error = None;
                    break;
                }
                Err(e) => {
                    tracing::warn!(attempt, error = %e, hosts = ?shared.settings.hosts, "etcd not reachable");
                    last_error = Some(e);
                    if attempt < attempts {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
        if let Some(error) = last_error {
            let Some((objects, revision)) = cached else {
                return Err(StoreError::Unavailable(format!(
                    "cannot reach etcd at {} and no local copy of its configuration: {error}",
                    shared.settings.hosts.join(", ")
                )));
            };
            tracing::warn!(
                revision,
                objects = objects.len(),
                "etcd unreachable: serving the local copy of its last configuration"
            );
            shared.reset(objects, revision, false);
        }
        let follower = tokio::spawn(shared.clone().follow());
        Ok(EtcdStore { shared, follower })
    }

    /// Whether the last exchange with etcd worked.
    pub fn reachable(&self) -> bool {
        self.shared.reachable.load(Ordering::Relaxed)
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

/// Validation looks at each object alone: references may arrive in any
/// order from etcd, so they are taken as present.
struct AnyReference;

impl Lookup for AnyReference {
    fn exists(&self, _kind: Kind, _id: &str) -> bool {
        true
    }
}

/// What a client is told when etcd fails: APISIX's words when no endpoint
/// answers, etcd's own message otherwise. The details go to the log.
fn unavailable(e: etcd_client::Error) -> StoreError {
    tracing::debug!(error = %e, "etcd request failed");
    let message = match &e {
        etcd_client::Error::GRpcStatus(status)
            if !matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
            ) =>
        {
            format!("etcd: {}", status.message())
        }
        _ => NO_ENDPOINT.to_string(),
    };
    StoreError::Unavailable(message)
}

fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> u64 {
    header.map_or(0, |h| h.revision().max(0) as u64)
}

/// Which etcd a local copy came from: a copy of another cluster or prefix
/// is never served.
fn origin_of(settings: &EtcdSettings) -> String {
    format!("{} {}", settings.hosts.join(","), settings.prefix)
}

impl Shared {
    /// etcd's key for a key inside ferrogate.
    fn physical(&self, key: &str) -> String {
        match key.strip_prefix(KEY_PREFIX) {
            Some(rest) => format!("{}{rest}", self.settings.prefix),
            None => key.to_string(),
        }
    }

    /// The key inside ferrogate for an etcd key, for objects ferrogate
    /// serves; `None` for the rest (`gen_id`, `plugins`, directory markers).
    fn canonical(&self, key: &[u8]) -> Option<String> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(self.settings.prefix.as_str())?;
        if !rest.starts_with('/') {
            return None;
        }
        let canonical = format!("{KEY_PREFIX}{rest}");
        Kind::parse_key(&canonical)?;
        Some(canonical)
    }

    /// The object an etcd value holds, decrypted and checked; `None` (and a
    /// log line naming the key) when it cannot be served.
    fn decode(&self, key: &str, raw: &[u8], created: u64, modified: u64) -> Option<Entry> {
        // Values come from outside: a bug they trigger costs that value only.
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.decode_checked(key, raw, created, modified)
        }));
        decoded.unwrap_or_else(|_| {
            tracing::error!(key = %self.physical(key), "checking this etcd value failed; skipped");
            None
        })
    }

    fn decode_checked(&self, key: &str, raw: &[u8], created: u64, modified: u64) -> Option<Entry> {
        let (kind, _) = Kind::parse_key(key)?;
        let physical = self.physical(key);
        let mut value: Value = match serde_json::from_slice(raw) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(key = %physical, error = %e, "etcd value is not JSON; skipped");
                return None;
            }
        };
        for what in self.settings.keyring.open(kind, &mut value) {
            tracing::warn!(key = %physical, "cannot decrypt the {what} with data_encryption.keyring; kept as stored");
        }
        if let Err(e) = validate::check(kind, &value, &AnyReference) {
            tracing::warn!(key = %physical, error = %e, "invalid object in etcd; skipped");
            return None;
        }
        Some(Entry {
            key: key.to_string(),
            value,
            created_index: created,
            modified_index: modified,
        })
    }

    fn cached(&self, kv: &KeyValue) -> Option<Cached> {
        Some(Cached {
            key: self.canonical(kv.key())?,
            raw: kv.value().to_vec(),
            created_index: kv.create_revision().max(0) as u64,
            modified_index: kv.mod_revision().max(0) as u64,
        })
    }

    fn set_reachable(&self, now: bool) {
        let before = self.reachable.swap(now, Ordering::Relaxed);
        if before != now && now {
            tracing::info!(hosts = ?self.settings.hosts, "etcd reachable");
        }
    }

    async fn client(&self) -> Result<Client, StoreError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let s = &self.settings;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(s.timeout.min(Duration::from_secs(5)))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some((user, password)) = &s.auth {
            options = options
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = &s.tls {
            let mut t = TlsOptions::new();
            if let Some(ca) = &tls.ca {
                t = t.ca_certificate(etcd_client::Certificate::from_pem(ca.clone()));
            }
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(etcd_client::Identity::from_pem(cert.clone(), key.clone()));
            }
            if let Some(sni) = &tls.sni {
                t = t.domain_name(sni.clone());
            }
            options = options.with_tls(t);
        }
        let client = tokio::time::timeout(s.timeout, Client::connect(&s.hosts, Some(options)))
            .await
            .map_err(|_| StoreError::Unavailable(NO_ENDPOINT.into()))?
            .map_err(unavailable)?;
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Runs one request to etcd, bounded by `timeout`.
    async fn call<T>(
        &self,
        request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        let result = tokio::time::timeout(self.settings.timeout, request)
            .await
            .map_err(|_| StoreError::Unavailable(NO_ENDPOINT.into()))
            .and_then(|r| r.map_err(unavailable));
        self.set_reachable(result.is_ok());
        result
    }

    /// Every object under the prefix at one revision, page by page.
    async fn list_all(&self) -> Result<(Vec<KeyValue>, u64), StoreError> {
        let client = self.client().await?;
        let mut kv = client.kv_client().max_decoding_message_size(64 << 20);
        let base = format!("{}/", self.settings.prefix);
        let end = super::prefix_end(&base);
        let mut from = base.into_bytes();
        let mut revision = 0i64;
        let mut out = Vec::new();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.as_bytes())
                .with_limit(LIST_PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let mut page = self.call(kv.get(from.clone(), Some(options))).await?;
            if revision == 0 {
                revision = page.header().map_or(0, |h| h.revision());
            }
            let more = page.more();
            let kvs = page.take_kvs();
            let Some(last) = kvs.last() else { break };
            from = last.key().to_vec();
            from.push(0);
            out.extend(kvs);
            if !more {
                break;
            }
        }
        Ok((out, revision.max(0) as u64))
    }

    /// Lists everything and makes it the mirror, as one [`Change::Reset`].
    async fn relist(self: &Arc<Self>) -> Result<(), StoreError> {
        let (kvs, revision) = self.list_all().await?;
        let objects: Vec<Cached> = kvs.iter().filter_map(|kv| self.cached(kv)).collect();
        let shared = self.clone();
        // Compiling a whole configuration is work for a blocking thread, not
        // for the runtime serving requests.
        tokio::task::spawn_blocking(move || shared.reset(objects, revision, true))
            .await
            .map_err(StoreError::backend)
    }

    /// Makes `objects` at `revision` the mirror and tells the watchers; with
    /// `save`, the local copy too.
    fn reset(&self, objects: Vec<Cached>, revision: u64, save: bool) {
        let mut map = BTreeMap::new();
        for c in &objects {
            if let Some(e) = self.decode(&c.key, &c.raw, c.created_index, c.modified_index) {
                map.insert(c.key.clone(), e);
            }
        }
        let _feed = self.feed.lock().unwrap_or_else(|p| p.into_inner());
        let entries: Vec<Entry> = map.values().cloned().collect();
        {
            let mut view = self.view.write().unwrap_or_else(|p| p.into_inner());
            view.objects = map;
            view.revision = revision;
        }
        self.cursor.store(revision, Ordering::Relaxed);
        self.watchers.notify(&Change::Reset {
            entries: &entries,
            revision,
        });
        self.applied.send_replace(revision);
        if save {
            self.cache_dirty.store(false, Ordering::Relaxed);
            self.save(CacheOp::Replace { objects, revision });
        }
    }

    /// Queues a change for the local copy; after a failed write, the whole
    /// mirror instead.
    fn save(&self, op: CacheOp) {
        let Some(tx) = &self.cache else { return };
        let op = if self.cache_dirty.swap(false, Ordering::Relaxed) {
            let view = self.view.read().unwrap_or_else(|p| p.into_inner());
            let objects = view
                .objects
                .values()
                .filter_map(|e| {
                    Some(Cached {
                        key: e.key.clone(),
                        raw: self.sealed(&e.key, &e.value).ok()?.1,
                        created_index: e.created_index,
                        modified_index: e.modified_index,
                    })
                })
                .collect();
            CacheOp::Replace {
                objects,
                revision: view.revision,
            }
        } else {
            op
        };
        // The writer only stops with the store.
        let _ = tx.send(op);
    }

    /// Applies one watch batch to the mirror and tells the watchers.
    fn apply_events(&self, events: &[etcd_client::Event], revision: u64) {
        let mut changes = Vec::new();
        let mut puts = Vec::new();
        let mut deletes = Vec::new();
        let _feed = self.feed.lock().unwrap_or_else(|p| p.into_inner());
        let mut view = self.view.write().unwrap_or_else(|p| p.into_inner());
        if revision <= view.revision {
            return;
        }
        for event in events {
            let Some(kv) = event.kv() else { continue };
            let Some(key) = self.canonical(kv.key()) else {
                continue;
            };
            match event.event_type() {
                EventType::Put => {
                    let Some(c) = self.cached(kv) else { continue };
                    if let Some(entry) =
                        self.decode(&key, &c.raw, c.created_index, c.modified_index)
                    {
                        view.objects.insert(key, entry.clone());
                        changes.push(Event::Put(entry));
                    }
                    puts.push(c);
                }
                EventType::Delete => {
                    if view.objects.remove(&key).is_some() {
                        changes.push(Event::Delete { key: key.clone() });
                    }
                    deletes.push(key);
                }
            }
        }
        view.revision = revision;
        drop(view);
        self.cursor.fetch_max(revision, Ordering::Relaxed);
        self.watchers.notify(&Change::Events {
            events: &changes,
            revision,
        });
        self.applied.send_replace(revision);
        self.save(CacheOp::Apply {
            puts,
            deletes,
            revision,
        });
    }

    /// Follows etcd for as long as the store lives.
    async fn follow(self: Arc<Self>) {
        let mut delay = Duration::from_millis(100);
        let mut relist = false;
        loop {
            let step = if relist {
                self.relist().map(|r| r.map(|()| WatchEnd::Renew)).boxed()
            } else {
                self.watch_once().boxed()
            };
            // A bug must not leave the node silently stale: log it, and
            // start over from a full listing.
            let result = std::panic::AssertUnwindSafe(step)
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    tracing::error!("following etcd failed unexpectedly; loading everything again");
                    Err(StoreError::Backend("follower panicked".into()))
                });
            match result {
                Ok(WatchEnd::Renew) => {
                    relist = false;
                    delay = Duration::from_millis(100);
                }
                Ok(WatchEnd::Relist) => relist = true,
                Err(e) => {
                    if self.reachable.swap(false, Ordering::Relaxed) || delay.as_millis() == 100 {
                        tracing::warn!(error = %e, hosts = ?self.settings.hosts, "lost etcd; serving the last configuration and retrying");
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.settings.resync_delay.min(MAX_RETRY_DELAY));
                    // The next watch resumes after the cursor; etcd says
                    // when it cannot (compaction, an older revision), and
                    // only then is everything listed again.
                    relist = relist || matches!(e, StoreError::Backend(_));
                }
            }
        }
    }

    /// One watch of the prefix from the mirror's revision.
    async fn watch_once(self: &Arc<Self>) -> Result<WatchEnd, StoreError> {
        let mut client = self.client().await?;
        let from = self.cursor.load(Ordering::Relaxed);
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from as i64 + 1)
            .with_progress_notify();
        let key = format!("{}/", self.settings.prefix);
        let mut stream = self.call(client.watch(key, Some(options))).await?;
        let deadline = tokio::time::Instant::now() + self.settings.watch_timeout;
        loop {
            let message = match tokio::time::timeout_at(deadline, stream.message()).await {
                Err(_) => return Ok(WatchEnd::Renew),
                Ok(m) => m.map_err(unavailable)?,
            };
            let Some(response) = message else {
                return Err(StoreError::Unavailable("etcd: watch closed".into()));
            };
            self.set_reachable(true);
            if response.canceled() {
                if response.compact_revision() > 0 {
                    tracing::info!(
                        compacted = response.compact_revision(),
                        "etcd compacted past this node's revision; loading everything again"
                    );
                    return Ok(WatchEnd::Relist);
                }
                return Err(StoreError::Unavailable(format!(
                    "etcd canceled the watch: {}",
                    response.cancel_reason()
                )));
            }
            let revision = revision_of(response.header());
            if response.created() && revision < from {
                tracing::warn!(
                    etcd = revision,
                    ours = from,
                    "etcd is at an older revision than this node (restored or replaced); loading everything again"
                );
                return Ok(WatchEnd::Relist);
            }
            if response.events().is_empty() {
                // A progress notice: nothing under the prefix up to here.
                if !response.created() {
                    self.cursor.fetch_max(revision, Ordering::Relaxed);
                }
                continue;
            }
            let revision = response
                .events()
                .iter()
                .filter_map(|e| e.kv())
                .map(|kv| kv.mod_revision().max(0) as u64)
                .max()
                .unwrap_or(revision);
            let events = response.events().to_vec();
            let shared = self.clone();
            tokio::task::spawn_blocking(move || shared.apply_events(&events, revision))
                .await
                .map_err(StoreError::backend)?;
        }
    }

    /// Waits until the mirror has applied `revision` (a write's own), so a
    /// read after the write sees it; gives up after `timeout`.
    async fn caught_up(&self, revision: u64) {
        let mut applied = self.applied.subscribe();
        let waited =
            tokio::time::timeout(self.settings.timeout, applied.wait_for(|r| *r >= revision)).await;
        if waited.is_err() {
            tracing::warn!(
                revision,
                "etcd accepted a write that this node has not seen back yet"
            );
        }
    }

    /// The value as etcd stores it (secrets encrypted), and its bytes.
    fn sealed(&self, key: &str, value: &Value) -> Result<(Value, Vec<u8>), StoreError> {
        let mut stored = value.clone();
        if let Some((kind, _)) = Kind::parse_key(key) {
            self.settings.keyring.seal(kind, &mut stored);
        }
        let bytes = serde_json::to_vec(&stored).map_err(StoreError::backend)?;
        Ok((stored, bytes))
    }

    async fn put(
        &self,
        key: String,
        value: Value,
        expect_modified: Option<u64>,
    ) -> Result<PutOutcome, StoreError> {
        let (stored, bytes) = self.sealed(&key, &value)?;
        let physical = self.physical(&key);
        let mut client = self.client().await?;
        let (revision, created) = match expect_modified {
            Some(modified) => {
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        physical.as_str(),
                        CompareOp::Equal,
                        modified as i64,
                    )])
                    .and_then([TxnOp::put(physical.as_str(), bytes, None)]);
                let answer = self.call(client.txn(txn)).await?;
                if !answer.succeeded() {
                    return Err(StoreError::Conflict);
                }
                (revision_of(answer.header()), false)
            }
            None => {
                let answer = self
                    .call(client.put(physical, bytes, Some(PutOptions::new().with_prev_key())))
                    .await?;
                (revision_of(answer.header()), answer.prev_key().is_none())
            }
        };
        self.caught_up(revision).await;
        let view = self.view.read().unwrap_or_else(|p| p.into_inner());
        let created_index = match view.objects.get(&key) {
            Some(e) if !created => e.created_index,
            _ => revision,
        };
        // As APISIX answers: the object as stored, secrets encrypted.
        let entry = Entry {
            key,
            value: stored,
            created_index,
            modified_index: revision,
        };
        Ok(PutOutcome { entry, created })
    }

    async fn apply(&self, ops: Vec<BatchOp>) -> Result<Vec<Event>, StoreError> {
        let mut txn_ops = Vec::with_capacity(ops.len());
        let mut events = Vec::with_capacity(ops.len());
        {
            let view = self.view.read().unwrap_or_else(|p| p.into_inner());
            for op in &ops {
                match op {
                    BatchOp::Put { key, value } => {
                        txn_ops.push(TxnOp::put(
                            self.physical(key),
                            self.sealed(key, value)?.1,
                            None,
                        ));
                        events.push(Event::Put(Entry {
                            key: key.clone(),
                            value: value.clone(),
                            created_index: 0,
                            modified_index: 0,
                        }));
                    }
                    BatchOp::Delete { key } => {
                        // Also when this node does not have it (skipped as
                        // invalid, or not seen yet): etcd decides.
                        txn_ops.push(TxnOp::delete(self.physical(key), None));
                        if view.objects.contains_key(key) {
                            events.push(Event::Delete { key: key.clone() });
                        }
                    }
                    BatchOp::DeletePrefix { prefix } => {
                        txn_ops.push(TxnOp::delete(
                            self.physical(prefix),
                            Some(DeleteOptions::new().with_prefix()),
                        ));
                        events.extend(
                            entries_below(&view.objects, prefix)
                                .into_iter()
                                .map(|e| Event::Delete { key: e.key }),
                        );
                    }
                }
            }
        }
        if txn_ops.is_empty() {
            return Ok(events);
        }
        let mut client = self.client().await?;
        let answer = self.call(client.txn(Txn::new().and_then(txn_ops))).await?;
        let revision = revision_of(answer.header());
        self.caught_up(revision).await;
        let view = self.view.read().unwrap_or_else(|p| p.into_inner());
        for event in &mut events {
            if let Event::Put(entry) = event {
                if let Some(seen) = view.objects.get(&entry.key) {
                    *entry = seen.clone();
                }
            }
        }
        Ok(events)
    }

    /// APISIX's id for POST: the revision of a write to `{prefix}/gen_id`.
    async fn next_id(&self) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let key = format!("{}/gen_id", self.settings.prefix);
        let answer = self.call(client.put(key, "1", None)).await?;
        Ok(revision_of(answer.header()))
    }
}

impl Store for EtcdStore {
    fn remote_reachable(&self) -> Option<bool> {
        Some(self.reachable())
    }

    fn prefix(&self) -> &str {
        &self.shared.settings.prefix
    }

    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let view = self.shared.view.read().unwrap_or_else(|p| p.into_inner());
        Ok(view.objects.get(key).cloned())
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let view = self.shared.view.read().unwrap_or_else(|p| p.into_inner());
        Ok(entries_below(&view.objects, prefix))
    }

    fn revision(&self) -> Result<u64, StoreError> {
        Ok(self
            .shared
            .view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .revision)
    }

    fn put(
        &self,
        key: &str,
        value: Value,
        expect_modified: Option<u64>,
    ) -> WriteFuture<'_, PutOutcome> {
        Box::pin(self.shared.put(key.to_string(), value, expect_modified))
    }

    fn apply(&self, ops: Vec<BatchOp>) -> WriteFuture<'_, Vec<Event>> {
        Box::pin(self.shared.apply(ops))
    }

    fn next_id(&self) -> WriteFuture<'_, u64> {
        Box::pin(self.shared.next_id())
    }

    fn subscribe(&self, watcher: Arc<dyn Watcher>) -> Result<(), StoreError> {
        let _feed = self.shared.feed.lock().unwrap_or_else(|p| p.into_inner());
        let view = self.shared.view.read().unwrap_or_else(|p| p.into_inner());
        let entries: Vec<Entry> = view.objects.values().cloned().collect();
        let revision = view.revision;
        drop(view);
        watcher.on_change(&Change::Reset {
            entries: &entries,
            revision,
        });
        self.shared.watchers.add(watcher);
        Ok(())
    }
}
