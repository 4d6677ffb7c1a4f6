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
//! The router is built once per config snapshot. A lookup costs one hash
//! probe for the exact path plus one per distinct prefix length, whatever
//! the number of routes.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::Method;

use admin_api::expr::{Expr, Vars};
use plugins::cidr::IpSet;

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
    pub remote_addrs: Option<IpSet>,
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

/// The compiled router of one snapshot.
#[derive(Debug)]
pub struct Router<T> {
    exact: HashMap<Box<str>, Vec<Candidate<T>>>,
    prefix: HashMap<Box<str>, Vec<Candidate<T>>>,
    /// Distinct prefix lengths, longest first.
    prefix_lens: Vec<usize>,
}

/// Collects routes, then freezes them into a [`Router`].
pub struct RouterBuilder<T> {
    exact: HashMap<Box<str>, Vec<Candidate<T>>>,
    prefix: HashMap<Box<str>, Vec<Candidate<T>>>,
}

impl<T> Default for RouterBuilder<T> {
    fn default() -> Self {
        RouterBuilder {
            exact: HashMap::new(),
            prefix: HashMap::new(),
        }
    }
}

impl<T: Clone> RouterBuilder<T> {
    /// Adds a route under every one of its `uris`.
    pub fn add<S: AsRef<str>>(&mut self, uris: &[S], candidate: Candidate<T>) {
        for uri in uris {
            let uri = uri.as_ref();
            let (map, key) = match uri.strip_suffix('*') {
                Some(prefix) => (&mut self.prefix, prefix),
                None => (&mut self.exact, uri),
            };
            map.entry(key.into()).or_default().push(candidate.clone());
        }
    }

    pub fn build(mut self) -> Router<T> {
        let order = |list: &mut Vec<Candidate<T>>| {
            list.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.order.cmp(&b.order)));
        };
        self.exact.values_mut().for_each(order);
        self.prefix.values_mut().for_each(order);
        let mut prefix_lens: Vec<usize> = self.prefix.keys().map(|k| k.len()).collect();
        prefix_lens.sort_unstable_by(|a, b| b.cmp(a));
        prefix_lens.dedup();
        Router {
            exact: self.exact,
            prefix: self.prefix,
            prefix_lens,
        }
    }
}

impl<T> Router<T> {
    /// The route that serves `req`, if any.
    pub fn find(&self, req: &RequestView<'_>) -> Option<&T> {
        fn first_accepting<'a, T>(
            list: &'a [Candidate<T>],
            req: &RequestView<'_>,
        ) -> Option<&'a T> {
            list.iter()
                .find(|c| c.matcher.accepts(req))
                .map(|c| &c.target)
        }
        if let Some(hit) = self
            .exact
            .get(req.path)
            .and_then(|l| first_accepting(l, req))
        {
            return Some(hit);
        }
        for &len in &self.prefix_lens {
            if len > req.path.len() || !req.path.is_char_boundary(len) {
                continue;
            }
            if let Some(hit) = self
                .prefix
                .get(&req.path[..len])
                .and_then(|l| first_accepting(l, req))
            {
                return Some(hit);
            }
        }
        None
    }

    /// Number of (uri, route) entries.
    pub fn len(&self) -> usize {
        self.exact.values().map(Vec::len).sum::<usize>()
            + self.prefix.values().map(Vec::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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
