//! Which ssl object serves a handshake, by the name the client asked for.
//!
//! APISIX's rules: an exact name wins; otherwise a wildcard `*.example.com`
//! (or `*example.com`) covers names that add exactly one label, so
//! `a.example.com` but neither `example.com` nor `a.b.example.com`; a lone
//! `*` covers every name. Among wildcards the longest match is taken. Two
//! objects claiming the same name: the one compiled first (the lower id)
//! keeps it.

use std::collections::HashMap;
use std::sync::Arc;

/// Names to values, with APISIX's SNI matching.
#[derive(Debug)]
pub struct SniTable<T> {
    exact: HashMap<Box<str>, Arc<T>>,
    /// Keyed by what follows the `*`.
    wildcard: HashMap<Box<str>, Arc<T>>,
    /// Longest key in `wildcard`, so lookups try no longer suffix.
    longest_wildcard: usize,
    any: Option<Arc<T>>,
}

impl<T> Default for SniTable<T> {
    fn default() -> Self {
        SniTable {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            longest_wildcard: 0,
            any: None,
        }
    }
}

impl<T> SniTable<T> {
    /// Adds `pattern` (lower-case, no trailing dot, as the compiler keeps
    /// names); a pattern already taken stays with its first owner.
    pub fn insert(&mut self, pattern: &str, value: Arc<T>) {
        if pattern == "*" {
            self.any.get_or_insert(value);
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            self.longest_wildcard = self.longest_wildcard.max(suffix.len());
            self.wildcard.entry(suffix.into()).or_insert(value);
        } else {
            self.exact.entry(pattern.into()).or_insert(value);
        }
    }

    /// The value for `name`, which must already be lower-case without a
    /// trailing dot (see [`normalize`]).
    pub fn find(&self, name: &str) -> Option<&Arc<T>> {
        if let Some(v) = self.exact.get(name) {
            return Some(v);
        }
        if !self.wildcard.is_empty() {
            // The part the `*` stands for is one label: non-empty, no dot.
            // Longest suffix first: the shortest stand-in.
            let label_end = name.find('.').unwrap_or(name.len());
            for start in 1..=label_end.min(name.len().saturating_sub(1)) {
                let suffix = &name[start..];
                if suffix.len() > self.longest_wildcard {
                    continue;
                }
                if let Some(v) = self.wildcard.get(suffix) {
                    return Some(v);
                }
            }
        }
        self.any.as_ref()
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty() && self.any.is_none()
    }
}

/// A client's server name as the table keys it: lower-case, without a
/// trailing dot. Borrowed when it already is.
pub fn normalize(name: &str) -> std::borrow::Cow<'_, str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(name.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(patterns: &[&str]) -> SniTable<String> {
        let mut t = SniTable::default();
        for p in patterns {
            t.insert(p, Arc::new(p.to_string()));
        }
        t
    }

    fn found<'a>(t: &'a SniTable<String>, name: &str) -> Option<&'a str> {
        t.find(name).map(|v| v.as_str())
    }

    #[test]
    fn exact_beats_wildcard() {
        let t = table(&["*.example.com", "api.example.com"]);
        assert_eq!(found(&t, "api.example.com"), Some("api.example.com"));
        assert_eq!(found(&t, "www.example.com"), Some("*.example.com"));
    }

    #[test]
    fn wildcard_covers_exactly_one_label() {
        let t = table(&["*.example.com"]);
        assert_eq!(found(&t, "a.example.com"), Some("*.example.com"));
        assert_eq!(found(&t, "example.com"), None);
        assert_eq!(found(&t, "a.b.example.com"), None);
        assert_eq!(found(&t, ".example.com"), None);
        assert_eq!(found(&t, "com"), None);
    }

    #[test]
    fn longest_wildcard_wins_and_star_catches_the_rest() {
        let t = table(&["*.b.example.com", "*.example.com", "*"]);
        assert_eq!(found(&t, "a.b.example.com"), Some("*.b.example.com"));
        assert_eq!(found(&t, "b.example.com"), Some("*.example.com"));
        assert_eq!(found(&t, "other.org"), Some("*"));
    }

    #[test]
    fn prefix_wildcard_without_dot() {
        let t = table(&["*example.com"]);
        assert_eq!(found(&t, "myexample.com"), Some("*example.com"));
        assert_eq!(found(&t, "a.example.com"), None);
    }

    #[test]
    fn first_owner_keeps_a_name() {
        let mut t = SniTable::default();
        t.insert("a.test", Arc::new(1));
        t.insert("a.test", Arc::new(2));
        assert_eq!(t.find("a.test").map(|v| **v), Some(1));
    }

    #[test]
    fn names_are_normalized() {
        assert_eq!(normalize("API.Example.COM."), "api.example.com");
        assert!(matches!(normalize("a.test"), std::borrow::Cow::Borrowed(_)));
    }
}
