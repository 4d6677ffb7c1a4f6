//! The kinds of objects the Admin API manages, with APISIX's names and the
//! facts that differ between them: which methods a kind refuses, what its
//! id is, which other objects refer to it and what deleting it takes along.
//!
//! Everything kind-specific is in [`Kind::info`] and, for validation, in
//! [`crate::validate`]; `ops` and `api` have no per-kind branches beyond
//! these tables.

/// One Admin API collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Ssls,
    Upstreams,
    Services,
    PluginConfigs,
    ConsumerGroups,
    Consumers,
    Credentials,
    PluginMetadata,
    GlobalRules,
    Routes,
}

/// Where an object's id comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdSource {
    /// `id` in the body or the URL (routes, services, ...).
    Id,
    /// `username` in the body or the URL (consumers).
    Username,
    /// The plugin name in the URL (plugin_metadata).
    PluginName,
}

/// An object of another kind that refers to this one by `field`; deleting
/// a referenced object is refused (unless forced) with `message`.
pub struct Reference {
    pub from: Kind,
    pub field: &'static str,
    /// `{user}` is the referring object's id, `{label}` its kind's label.
    pub message: &'static str,
}

/// Per-kind facts.
pub struct KindInfo {
    /// The collection name in URLs and keys (`routes`).
    pub collection: &'static str,
    /// The singular APISIX uses in messages (`missing route id`).
    pub label: &'static str,
    pub id: IdSource,
    pub post: bool,
    pub patch: bool,
    pub referenced_by: &'static [Reference],
}

const NO_REFS: &[Reference] = &[];

impl Kind {
    /// Every kind, referenced kinds before the kinds that refer to them (the
    /// order a whole configuration is loaded in).
    pub const ALL: [Kind; 10] = [
        Kind::Ssls,
        Kind::Upstreams,
        Kind::Services,
        Kind::PluginConfigs,
        Kind::ConsumerGroups,
        Kind::Consumers,
        Kind::Credentials,
        Kind::PluginMetadata,
        Kind::GlobalRules,
        Kind::Routes,
    ];

    pub fn info(self) -> &'static KindInfo {
        match self {
            // Upstreams refer to client certificates by `tls.client_cert_id`;
            // APISIX does not guard their deletion, nor does ferrogate.
            Kind::Ssls => &KindInfo {
                collection: "ssls",
                label: "ssl",
                id: IdSource::Id,
                post: true,
                patch: true,
                referenced_by: NO_REFS,
            },
            Kind::Routes => &KindInfo {
                collection: "routes",
                label: "route",
                id: IdSource::Id,
                post: true,
                patch: true,
                referenced_by: NO_REFS,
            },
            Kind::Services => &KindInfo {
                collection: "services",
                label: "service",
                id: IdSource::Id,
                post: true,
                patch: true,
                referenced_by: &[Reference {
                    from: Kind::Routes,
                    field: "service_id",
                    message: "can not delete this service directly, {label} [{user}] is still using it now",
                }],
            },
            Kind::Upstreams => &KindInfo {
                collection: "upstreams",
                label: "upstream",
                id: IdSource::Id,
                post: true,
                patch: true,
                referenced_by: &[
                    Reference {
                        from: Kind::Routes,
                        field: "upstream_id",
                        message: "can not delete this upstream, {label} [{user}] is still using it now",
                    },
                    Reference {
                        from: Kind::Services,
                        field: "upstream_id",
                        message: "can not delete this upstream, {label} [{user}] is still using it now",
                    },
                ],
            },
            Kind::GlobalRules => &KindInfo {
                collection: "global_rules",
                label: "global rule",
                id: IdSource::Id,
                post: false,
                patch: true,
                referenced_by: NO_REFS,
            },
            Kind::Consumers => &KindInfo {
                collection: "consumers",
                label: "consumer",
                id: IdSource::Username,
                post: false,
                patch: false,
                referenced_by: NO_REFS,
            },
            Kind::Credentials => &KindInfo {
                collection: "credentials",
                label: "credential",
                id: IdSource::Id,
                post: false,
                patch: false,
                referenced_by: NO_REFS,
            },
            Kind::ConsumerGroups => &KindInfo {
                collection: "consumer_groups",
                label: "consumer group",
                id: IdSource::Id,
                post: false,
                patch: true,
                referenced_by: &[Reference {
                    from: Kind::Consumers,
                    field: "group_id",
                    message: "can not delete this consumer group, {label} [{user}] is still using it now",
                }],
            },
            Kind::PluginConfigs => &KindInfo {
                collection: "plugin_configs",
                label: "plugin config",
                id: IdSource::Id,
                post: false,
                patch: true,
                referenced_by: &[Reference {
                    from: Kind::Routes,
                    field: "plugin_config_id",
                    message: "can not delete this plugin config, {label} [{user}] is still using it now",
                }],
            },
            Kind::PluginMetadata => &KindInfo {
                collection: "plugin_metadata",
                label: "plugin_metadata",
                id: IdSource::PluginName,
                post: false,
                patch: false,
                referenced_by: NO_REFS,
            },
        }
    }

    /// The collection name in URLs and keys (`routes`).
    pub fn collection(self) -> &'static str {
        self.info().collection
    }

    /// The singular name APISIX uses in messages (`missing route id`).
    pub fn label(self) -> &'static str {
        self.info().label
    }

    /// The kind served at `/apisix/admin/{name}` (credentials are nested
    /// under consumers and have no collection of their own).
    pub fn from_collection(name: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| *k != Kind::Credentials && k.collection() == name)
    }

    /// `/apisix/routes/` — the store prefix of this collection. Credentials
    /// live under their consumer: `/apisix/consumers/`.
    pub fn prefix(self) -> String {
        match self {
            Kind::Credentials => "/apisix/consumers/".to_string(),
            k => format!("/apisix/{}/", k.collection()),
        }
    }

    /// `/apisix/routes/1` — the store key of one object. A credential's id
    /// is `{username}/credentials/{id}`.
    pub fn key(self, id: &str) -> String {
        match self {
            Kind::Credentials => format!("/apisix/consumers/{id}"),
            k => format!("/apisix/{}/{}", k.collection(), id),
        }
    }

    /// Parses a store key back into kind and id.
    pub fn parse_key(key: &str) -> Option<(Kind, &str)> {
        let rest = key.strip_prefix("/apisix/")?;
        let (collection, id) = rest.split_once('/')?;
        if id.is_empty() {
            return None;
        }
        let kind = Kind::from_collection(collection)?;
        if kind == Kind::Consumers {
            if let Some((_, cred)) = id.split_once("/credentials/") {
                return (!cred.is_empty() && !cred.contains('/'))
                    .then_some((Kind::Credentials, id));
            }
        }
        (!id.contains('/')).then_some((kind, id))
    }

    /// Whether APISIX allows POST (generated ids) on this collection.
    pub fn allows_post(self) -> bool {
        self.info().post
    }
}

/// Splits a credential id `{username}/credentials/{id}`.
pub fn credential_parts(id: &str) -> Option<(&str, &str)> {
    id.split_once("/credentials/")
}

/// Resource types APISIX has that ferrogate does not serve yet; they answer
/// an empty list rather than "Unsupported resource type" so that APISIX
/// tooling that lists them keeps working.
pub const KNOWN_UNSERVED: &[&str] = &["protos", "stream_routes", "secrets"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for kind in Kind::ALL {
            let id = if kind == Kind::Credentials {
                "jack/credentials/a-1"
            } else {
                "a-1"
            };
            let key = kind.key(id);
            assert_eq!(Kind::parse_key(&key), Some((kind, id)));
            assert!(key.starts_with(&kind.prefix()));
        }
        assert_eq!(Kind::parse_key("/apisix/routs/1"), None);
        assert_eq!(Kind::parse_key("/apisix/routes/1/x"), None);
        assert_eq!(Kind::parse_key("/apisix/consumers/jack/credentials/"), None);
        assert_eq!(Kind::from_collection("credentials"), None);
    }
}
