//! The kinds of objects the Admin API manages, with APISIX's names.

/// One Admin API collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Routes,
    Services,
    Upstreams,
    GlobalRules,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Routes,
        Kind::Services,
        Kind::Upstreams,
        Kind::GlobalRules,
    ];

    /// The collection name in URLs and keys (`routes`).
    pub fn collection(self) -> &'static str {
        match self {
            Kind::Routes => "routes",
            Kind::Services => "services",
            Kind::Upstreams => "upstreams",
            Kind::GlobalRules => "global_rules",
        }
    }

    /// The singular name APISIX uses in messages (`missing route id`).
    pub fn label(self) -> &'static str {
        match self {
            Kind::Routes => "route",
            Kind::Services => "service",
            Kind::Upstreams => "upstream",
            Kind::GlobalRules => "global rule",
        }
    }

    pub fn from_collection(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.collection() == name)
    }

    /// `/apisix/routes/` — the store prefix of this collection.
    pub fn prefix(self) -> String {
        format!("/apisix/{}/", self.collection())
    }

    /// `/apisix/routes/1` — the store key of one object.
    pub fn key(self, id: &str) -> String {
        format!("/apisix/{}/{}", self.collection(), id)
    }

    /// Parses a store key back into kind and id.
    pub fn parse_key(key: &str) -> Option<(Kind, &str)> {
        let rest = key.strip_prefix("/apisix/")?;
        let (collection, id) = rest.split_once('/')?;
        Some((Kind::from_collection(collection)?, id))
    }

    /// Whether APISIX allows POST (generated ids) on this collection.
    pub fn allows_post(self) -> bool {
        !matches!(self, Kind::GlobalRules)
    }
}

/// Resource types APISIX has that ferrogate does not serve yet; they answer
/// an empty list rather than "Unsupported resource type" so that APISIX
/// tooling that lists them keeps working.
pub const KNOWN_UNSERVED: &[&str] = &[
    "consumers",
    "credentials",
    "ssls",
    "protos",
    "stream_routes",
    "plugin_metadata",
    "plugin_configs",
    "consumer_groups",
    "secrets",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for kind in Kind::ALL {
            let key = kind.key("a-1");
            assert_eq!(Kind::parse_key(&key), Some((kind, "a-1")));
            assert!(key.starts_with(&kind.prefix()));
        }
        assert_eq!(Kind::parse_key("/apisix/routs/1"), None);
    }
}
