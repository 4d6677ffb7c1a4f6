//! Any bytes as an Admin API body: parsing, validation of every object kind
//! and the PUT / PATCH paths against a memory store must never panic, and a
//! rejected write must leave the store unchanged.

#![no_main]

use admin_api::ops;
use admin_api::store::{MemoryStore, Store};
use admin_api::Kind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let store = MemoryStore::new();
    let _ = ops::put(
        &store,
        Kind::Upstreams,
        Some("u"),
        Some(serde_json::json!({"nodes": {"127.0.0.1:80": 1}})),
    );
    for kind in Kind::ALL {
        let before = store.revision().unwrap_or(0);
        let put = ops::put(&store, kind, Some("1"), Some(value.clone()));
        if put.is_err() {
            assert_eq!(
                store.revision().unwrap_or(0),
                before,
                "a rejected PUT wrote something"
            );
        }
        let _ = ops::post(&store, kind, Some(value.clone()));
        let _ = ops::patch(&store, kind, Some("1"), None, Some(value.clone()));
        let _ = ops::patch(
            &store,
            kind,
            Some("1"),
            Some("plugins/ip-restriction"),
            Some(value.clone()),
        );
    }
});
