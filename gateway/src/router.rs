//! Route matching with APISIX's `radixtree_uri` rules.
//!
//! - `uri` without a trailing `*` matches that path exactly; `/foo/*` (or
//!   `/foo*`) matches every path starting with `/foo/` (`/foo`).
//! - An exact match beats any prefix match; among prefixes the longest wins.
//! - Among routes on the same path, the larger `priority` is tried first
//!   (default 0), then the older route.
//! - A candidate must also pass its `methods`, `hosts` (case-insensitive,
//!   port ignored, `*.foo.com` wildcards), `remote_addrs` and `vars`; the
//!   first candidate that passes wins, else the next shorter prefix is tried.
//! - Routes with `status: 0` are not in the router at all.
//!
//! A config change copies only the route-table shards of the paths it
//! touches; each snapshot shares the table's shards. A lookup costs one hash
//! probe for the exact path plus one per distinct prefix length, whatever
//! the number of routes.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;

/// Seeded per process, so route keys cannot be chosen to collide; much
/// cheaper than SipHash on short paths.
type RandomState = foldhash::fast::RandomState;
use std::net::IpAddr;
use std::sync::Arc;

use http::Method;

use plugins::cidr::IpSet;
use plugins::expr::{Expr, Vars};

/// The HTTP methods a route lists, as a bit set; empty means any.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MethodSet(u16);

const METHOD_BITS: [Method; 9] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::HEAD,
    Method::OPTIONS,
    Method::CONNECT,
    Method::TRACE,
];
/// PURGE has no constant in `http`; it takes the bit after the others.
const PURGE_BIT: u16 = 1 << 9;

impl MethodSet {
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Self {
        let mut bits = 0u16;
        for name in names {
            let name = name.as_ref();
            if name == "PURGE" {
                bits |= PURGE_BIT;
            } else if let Some(i) = METHOD_BITS.iter().position(|m| m.as_str() == name) {
                bits |= 1 << i;
            }
        }
        MethodSet(bits)
    }

    pub fn allows(&self, method: &Method) -> bool {
        if self.0 == 0 {
            return true;
        }
        let bit = match METHOD_BITS.iter().position(|m| m == method) {
            Some(i) => 1 << i,
            None if method.as_str() == "PURGE" => PURGE_BIT,
            None => return false,
        };
        self.0 & bit != 0
    }
}

/// Host patterns of a route, lower-cased when compiled.
#[derive(Debug, Clone, Default)]
pub struct HostSet {
    exact: Vec<String>,
    /// `*.foo.com` stored as `.foo.com`.
    suffixes: Vec<String>,
}

impl HostSet {
    pub fn new<S: AsRef<str>>(hosts: &[S]) -> Self {
        let mut set = HostSet::default();
        for h in hosts {
            let h = h.as_ref().to_ascii_lowercase();
            match h.strip_prefix('*') {
                Some(suffix) => set.suffixes.push(suffix.to_string()),
                None => set.exact.push(h),
            }
        }
        set
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.suffixes.is_empty()
    }

    /// `host` must already be lower-cased without port.
    pub fn matches(&self, host: Option<&str>) -> bool {
        let Some(host) = host else { return false };
        self.exact.iter().any(|h| h == host)
            || self.suffixes.iter().any(|s| host.ends_with(s.as_str()))
    }
}

/// What a request offers for matching.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    /// Lower-cased, port stripped.
    pub host: Option<&'a str>,
    pub client_ip: Option<IpAddr>,
    pub vars: &'a dyn Vars,
}

/// One route's match conditions plus what it leads to.
#[derive(Debug)]
pub struct Matcher {
    pub methods: MethodSet,
    pub hosts: HostSet,
    /// Boxed: an address set is some 800 bytes inline, and most routes
    /// have none.
    pub remote_addrs: Option<Box<IpSet>>,
    pub vars: Option<Expr>,
}

impl Matcher {
    fn accepts(&self, req: &RequestView<'_>) -> bool {
        self.methods.allows(req.method)
            && (self.hosts.is_empty() || self.hosts.matches(req.host))
            && self
                .remote_addrs
                .as_ref()
                .is_none_or(|set| req.client_ip.is_some_and(|ip| set.contains(ip)))
            && self.vars.as_ref().is_none_or(|e| e.eval(req.vars))
    }
}

/// A route as the router holds it.
#[derive(Debug)]
pub struct Candidate<T> {
    pub priority: i64,
    /// Creation order: older wins among equal priorities.
    pub order: u64,
    pub matcher: Arc<Matcher>,
    pub target: T,
}

impl<T> Clone for Candidate<T>
where
    T: Clone,
{
    fn clone(&self) -> Self {
        Candidate {
            priority: self.priority,
            order: self.order,
            matcher: self.matcher.clone(),
            target: self.target.clone(),
        }
    }
}

/// How a route was found: under its exact path, or under the prefix of a
/// `/foo/*` pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Matched<'a> {
    /// The path (`/foo`) or prefix (`/foo/`) the route is filed under.
    pub key: &'a str,
    pub prefix: bool,
}

impl Matched<'_> {
    /// Whether `uri` (a route's `uri` as configured) is this pattern.
    pub fn is(&self, uri: &str) -> bool {
        match uri.strip_suffix('*') {
            Some(prefix) => self.prefix && prefix == self.key,
            None => !self.prefix && uri == self.key,
        }
    }
}

/// Number of copy-on-write shards per table. A change copies only the shards
/// holding the changed paths, so its cost is about `routes / SHARDS` entries.
pub const SHARDS: usize = 256;

/// Keys and candidate lists are shared between a shard and its copies, so
/// copying a shard on write costs two reference counts per entry rather
/// than two allocations and the candidates' copies (and dropping the old copy
/// as little). A list is itself copied on write: once when a change reaches
/// it in a shared shard, in place when nothing else holds it (a table being
/// built, or a second change in one update), so adding many routes on one
/// path stays linear in memory moves rather than in copies.
type Shard<T> = HashMap<Arc<str>, Arc<Vec<Candidate<T>>>, RandomState>;

/// One map from path (exact) or prefix to its ordered candidates, split into
/// shards by the hash of the key.
struct Table<T> {
    shards: Vec<Arc<Shard<T>>>,
}

impl<T> Clone for Table<T> {
    fn clone(&self) -> Self {
        Table {
            shards: self.shards.clone(),
        }
    }
}

impl<T> Table<T> {
    fn new() -> Self {
        Table {
            shards: (0..SHARDS)
                .map(|_| Arc::new(HashMap::with_hasher(RandomState::default())))
                .collect(),
        }
    }

    fn get_key_value(&self, hasher: &RandomState, key: &str) -> Option<(&str, &[Candidate<T>])> {
        self.shards[shard_of(hasher, key)]
            .get_key_value(key)
            .map(|(k, v)| (&**k, v.as_slice()))
    }
}

fn shard_of(hasher: &RandomState, key: &str) -> usize {
    (hasher.hash_one(key) as usize) % SHARDS
}

fn by_precedence<T>(a: &Candidate<T>, b: &Candidate<T>) -> std::cmp::Ordering {
    b.priority.cmp(&a.priority).then(a.order.cmp(&b.order))
}

/// The router of one snapshot: cheap to clone, immutable.
pub struct Router<T> {
    exact: Table<T>,
    prefix: Table<T>,
    /// Distinct prefix lengths, longest first.
    prefix_lens: Arc<Vec<usize>>,
    hasher: RandomState,
    len: usize,
}

impl<T> std::fmt::Debug for Router<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("entries", &self.len)
            .finish()
    }
}

/// The mutable route table the compiler keeps between snapshots. Adding or
/// removing a route touches only the shards of its paths; [`Self::router`]
/// then shares every untouched shard with the previous snapshot.
pub struct RouteTable<T> {
    exact: Table<T>,
    prefix: Table<T>,
    prefix_len_counts: BTreeMap<usize, usize>,
    prefix_lens: Arc<Vec<usize>>,
    hasher: RandomState,
    len: usize,
}

impl<T: Clone> Default for RouteTable<T> {
    fn default() -> Self {
        RouteTable {
            exact: Table::new(),
            prefix: Table::new(),
            prefix_len_counts: BTreeMap::new(),
            prefix_lens: Arc::new(Vec::new()),
            hasher: RandomState::default(),
            len: 0,
        }
    }
}

/// Splits `/foo/*` into (`/foo/`, prefix) and `/foo` into (`/foo`, exact).
fn classify(uri: &str) -> (&str, bool) {
    match uri.strip_suffix('*') {
        Some(prefix) => (prefix, true),
        None => (uri, false),
    }
}

impl<T: Clone> RouteTable<T> {
    /// The table and shard a key lives in.
    fn locate(&mut self, key: &str, is_prefix: bool) -> (&mut Table<T>, usize) {
        let shard = shard_of(&self.hasher, key);
        let table = if is_prefix {
            &mut self.prefix
        } else {
            &mut self.exact
        };
        (table, shard)
    }

    /// Adds a route under every one of its `uris`.
    pub fn add<S: AsRef<str>>(&mut self, uris: &[S], candidate: Candidate<T>) {
        for uri in uris {
            let (key, is_prefix) = classify(uri.as_ref());
            let (table, shard) = self.locate(key, is_prefix);
            let map = Arc::make_mut(&mut table.shards[shard]);
            match map.get_mut(key) {
                Some(list) => {
                    let list = Arc::make_mut(list);
                    let at = list.partition_point(|c| by_precedence(c, &candidate).is_le());
                    list.insert(at, candidate.clone());
                }
                None => {
                    map.insert(key.into(), Arc::new(vec![candidate.clone()]));
                }
            }
            self.len += 1;
            if is_prefix {
                *self.prefix_len_counts.entry(key.len()).or_default() += 1;
            }
        }
        self.refresh_lens();
    }

    /// Removes, under each of `uris`, the candidates `pred` selects.
    pub fn remove_where<S: AsRef<str>>(
        &mut self,
        uris: &[S],
        pred: impl Fn(&Candidate<T>) -> bool,
    ) {
        for uri in uris {
            let (key, is_prefix) = classify(uri.as_ref());
            let (table, shard) = self.locate(key, is_prefix);
            let Some(list) = table.shards[shard].get(key) else {
                continue;
            };
            // Only a shard that loses a candidate is copied.
            if !list.iter().any(&pred) {
                continue;
            }
            let map = Arc::make_mut(&mut table.shards[shard]);
            let Some(list) = map.get_mut(key) else {
                continue;
            };
            let list = Arc::make_mut(list);
            let before = list.len();
            list.retain(|c| !pred(c));
            let removed = before - list.len();
            if list.is_empty() {
                map.remove(key);
            }
            self.len -= removed;
            if is_prefix && removed > 0 {
                if let Some(n) = self.prefix_len_counts.get_mut(&key.len()) {
                    *n -= removed.min(*n);
                    if *n == 0 {
                        self.prefix_len_counts.remove(&key.len());
                    }
                }
            }
        }
        self.refresh_lens();
    }

    fn refresh_lens(&mut self) {
        let lens: Vec<usize> = self.prefix_len_counts.keys().rev().copied().collect();
        if *self.prefix_lens != lens {
            self.prefix_lens = Arc::new(lens);
        }
    }

    /// An immutable router sharing this table's current shards.
    pub fn router(&self) -> Router<T> {
        Router {
            exact: self.exact.clone(),
            prefix: self.prefix.clone(),
            prefix_lens: self.prefix_lens.clone(),
            hasher: self.hasher.clone(),
            len: self.len,
        }
    }
}

/// Collects routes, then freezes them into a [`Router`].
pub struct RouterBuilder<T> {
    table: RouteTable<T>,
}

impl<T: Clone> Default for RouterBuilder<T> {
    fn default() -> Self {
        RouterBuilder {
            table: RouteTable::default(),
        }
    }
}

impl<T: Clone> RouterBuilder<T> {
    /// Adds a route under every one of its `uris`.
    pub fn add<S: AsRef<str>>(&mut self, uris: &[S], candidate: Candidate<T>) {
        self.table.add(uris, candidate);
    }

    pub fn build(self) -> Router<T> {
        self.table.router()
    }
}

impl<T> Router<T> {
    /// The route that serves `req`, if any.
    pub fn find(&self, req: &RequestView<'_>) -> Option<&T> {
        self.find_matched(req).map(|(target, _)| target)
    }

    /// The route that serves `req` and the pattern it matched by: the
    /// exact path, or the prefix of a `/foo/*` pattern (`/foo/`).
    pub fn find_matched(&self, req: &RequestView<'_>) -> Option<(&T, Matched<'_>)> {
        fn first_accepting<'a, T>(
            list: &'a [Candidate<T>],
            req: &RequestView<'_>,
        ) -> Option<&'a T> {
            list.iter()
                .find(|c| c.matcher.accepts(req))
                .map(|c| &c.target)
        }
        if let Some((key, hit)) = self
            .exact
            .get_key_value(&self.hasher, req.path)
            .and_then(|(k, l)| Some((k, first_accepting(l, req)?)))
        {
            return Some((hit, Matched { key, prefix: false }));
        }
        for &len in self.prefix_lens.iter() {
            if len > req.path.len() || !req.path.is_char_boundary(len) {
                continue;
            }
            if let Some((key, hit)) = self
                .prefix
                .get_key_value(&self.hasher, &req.path[..len])
                .and_then(|(k, l)| Some((k, first_accepting(l, req)?)))
            {
                return Some((hit, Matched { key, prefix: true }));
            }
        }
        None
    }

    /// Number of (uri, route) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The path routes are matched against, made as nginx makes `$uri`:
/// `%XX` decoded, repeated slashes merged, `.` and `..` segments resolved.
/// Routing on the raw path would let `/public/../admin` or `/%61dmin` reach
/// a route other than the one the upstream ends up serving. `None` when the
/// path is malformed (a bad `%` escape, a NUL, `..` above the root): 400.
/// The upstream still receives the path exactly as the client sent it.
/// Whether `path` holds a `%`, `//` or `/.`: anything else is already in
/// normal form. One pass over the bytes, as every request asks.
fn needs_normalizing(path: &[u8]) -> bool {
    let mut after_slash = false;
    for &b in path {
        match b {
            b'%' => return true,
            b'/' | b'.' if after_slash => return true,
            _ => {}
        }
        after_slash = b == b'/';
    }
    false
}

pub fn normalize_path(raw: &str) -> Option<Cow<'_, str>> {
    if !needs_normalizing(raw.as_bytes()) {
        return Some(Cow::Borrowed(raw));
    }
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let value = std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())?;
            if value == 0 {
                return None;
            }
            decoded.push(value);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    let text = String::from_utf8_lossy(&decoded);
    if !text.starts_with('/') {
        return Some(Cow::Owned(text.into_owned()));
    }
    let mut segments: Vec<&str> = Vec::new();
    for seg in text.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop()?;
            }
            s => segments.push(s),
        }
    }
    let trailing = text.ends_with('/') || text.ends_with("/.") || text.ends_with("/..");
    let mut out = String::with_capacity(text.len());
    for seg in &segments {
        out.push('/');
        out.push_str(seg);
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    Some(Cow::Owned(out))
}

/// Lower-cases a Host value and strips its port (`[::1]:80` → `[::1]`).
pub fn normalize_host(raw: &str) -> Cow<'_, str> {
    let without_port = if raw.starts_with('[') {
        match raw.find(']') {
            Some(end) => &raw[..=end],
            None => raw,
        }
    } else {
        match raw.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => raw,
        }
    };
    if without_port.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(without_port.to_ascii_lowercase())
    } else {
        Cow::Borrowed(without_port)
    }
}

#[cfg(test)]
mod tests;
