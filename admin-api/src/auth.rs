//! Who may use the Admin API: `allow_admin` by peer address, then the key.
//!
//! Keys come from `deployment.admin.admin_key` (`name`, `key`, `role`). The
//! key is read, as APISIX reads it, from the `api_key` query argument, the
//! `X-API-KEY` header or the `X-API-KEY` cookie, and compared in constant
//! time. `viewer` keys may only read. Keys are never logged.

use std::net::IpAddr;

use http::{HeaderMap, Method};
use subtle::ConstantTimeEq;

use plugins::cidr::IpSet;

use crate::error::AdminError;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Viewer,
}

/// One configured key.
#[derive(Clone)]
pub struct AdminKey {
    pub name: String,
    pub key: String,
    pub role: Role,
}

impl std::fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminKey")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// The Admin API's access policy.
#[derive(Debug, Clone)]
pub struct AuthPolicy {
    pub keys: Vec<AdminKey>,
    /// `deployment.admin.admin_key_required`; default true.
    pub key_required: bool,
    /// `deployment.admin.allow_admin`; `None` lets every address in.
    pub allow: Option<IpSet>,
}

impl AuthPolicy {
    /// Checks the peer address, then the key. `peer` is `None` when the
    /// transport has no address (then only an unrestricted policy admits).
    pub fn check(
        &self,
        peer: Option<IpAddr>,
        method: &Method,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<(), AdminError> {
        self.check_peer(peer)?;
        self.check_key(method, query, headers)
    }

    /// `allow_admin`: 403 for peers outside it.
    pub fn check_peer(&self, peer: Option<IpAddr>) -> Result<(), AdminError> {
        if let Some(allow) = &self.allow {
            if !peer.is_some_and(|ip| allow.contains(ip)) {
                return Err(AdminError::new(
                    http::StatusCode::FORBIDDEN,
                    "403 Forbidden",
                ));
            }
        }
        Ok(())
    }

    /// The admin key and its role.
    pub fn check_key(
        &self,
        method: &Method,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<(), AdminError> {
        if !self.key_required {
            return Ok(());
        }
        let presented = presented_key(query, headers)
            .ok_or_else(|| AdminError::unauthorized("missing apikey"))?;
        // Compare against every key so timing does not tell which matched.
        let mut matched: Option<Role> = None;
        for k in &self.keys {
            if !k.key.is_empty() && bool::from(k.key.as_bytes().ct_eq(presented.as_bytes())) {
                matched = matched.or(Some(k.role));
            }
        }
        match matched {
            None => Err(AdminError::unauthorized("wrong apikey")),
            Some(Role::Viewer) if method != Method::GET => {
                Err(AdminError::unauthorized("invalid method for role viewer"))
            }
            Some(_) => Ok(()),
        }
    }
}

fn presented_key(query: Option<&str>, headers: &HeaderMap) -> Option<String> {
    if let Some(q) = query {
        for pair in q.split('&') {
            if let Some(v) = pair.strip_prefix("api_key=") {
                return Some(percent_decode(v));
            }
        }
    }
    if let Some(v) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.to_string());
    }
    for cookie in headers.get_all(http::header::COOKIE) {
        let Ok(text) = cookie.to_str() else { continue };
        for part in text.split(';') {
            if let Some((name, value)) = part.trim().split_once('=') {
                if name.eq_ignore_ascii_case("x-api-key") {
                    return Some(value.to_string());
                }
            }
        }
    }
    None
}

pub use plugins::vars::percent_decode;

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> AuthPolicy {
        AuthPolicy {
            keys: vec![
                AdminKey {
                    name: "admin".into(),
                    key: "secret-admin".into(),
                    role: Role::Admin,
                },
                AdminKey {
                    name: "viewer".into(),
                    key: "secret-viewer".into(),
                    role: Role::Viewer,
                },
            ],
            key_required: true,
            allow: Some(IpSet::from_entries(&["127.0.0.0/24"]).unwrap()),
        }
    }

    fn headers(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", key.parse().unwrap());
        h
    }

    const LOCAL: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    #[test]
    fn key_sources_and_roles() {
        let p = policy();
        assert!(p
            .check(LOCAL, &Method::PUT, None, &headers("secret-admin"))
            .is_ok());
        assert!(p
            .check(
                LOCAL,
                &Method::GET,
                Some("a=1&api_key=secret-admin"),
                &HeaderMap::new()
            )
            .is_ok());
        let mut cookie = HeaderMap::new();
        cookie.insert("cookie", "x=1; X-API-KEY=secret-admin".parse().unwrap());
        assert!(p.check(LOCAL, &Method::GET, None, &cookie).is_ok());
        assert!(p
            .check(LOCAL, &Method::GET, None, &headers("secret-viewer"))
            .is_ok());
        let err = p
            .check(LOCAL, &Method::PUT, None, &headers("secret-viewer"))
            .unwrap_err();
        assert_eq!(err.body["description"], "invalid method for role viewer");
    }

    #[test]
    fn missing_wrong_and_partial_keys() {
        let p = policy();
        let missing = p
            .check(LOCAL, &Method::GET, None, &HeaderMap::new())
            .unwrap_err();
        assert_eq!(missing.status, 401);
        assert_eq!(missing.body["description"], "missing apikey");
        for bad in ["secret-admi", "secret-admin0", ""] {
            let err = p
                .check(LOCAL, &Method::GET, None, &headers(bad))
                .unwrap_err();
            assert_eq!(err.body["description"], "wrong apikey", "{bad:?}");
        }
    }

    #[test]
    fn allow_admin_is_checked_first() {
        let p = policy();
        let outside = Some("127.0.1.9".parse().unwrap());
        assert_eq!(
            p.check(outside, &Method::GET, None, &headers("secret-admin"))
                .unwrap_err()
                .status,
            403
        );
        assert_eq!(
            p.check(None, &Method::GET, None, &headers("secret-admin"))
                .unwrap_err()
                .status,
            403
        );
    }

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%2Fb+c%zz%4"), "a/b c%zz%4");
    }
}
