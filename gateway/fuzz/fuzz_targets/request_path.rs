//! Any bytes as the parts of a request the gateway looks at before the
//! upstream: target, Host, forwarded-for header and head limits, then the
//! router (exact, prefix, host, vars). Nothing may panic.

#![no_main]

use std::borrow::Cow;
use std::sync::Arc;

use admin_api::expr::{self, Vars};
use gateway::router::{
    normalize_host, normalize_path, Candidate, HostSet, Matcher, MethodSet, RequestView, Router,
    RouterBuilder,
};
use libfuzzer_sys::fuzz_target;

struct Bytes<'a>(&'a str);
impl Vars for Bytes<'_> {
    fn var(&self, _: &str) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(self.0))
    }
}

fn router() -> Router<u32> {
    let mut b = RouterBuilder::default();
    let vars = expr::compile(&serde_json::json!([
        ["arg_a", "~~", "^[0-9]+$"],
        ["http_x", "ipmatch", ["10.0.0.0/8"]]
    ]))
    .ok();
    let m = |hosts: &[&str], vars| {
        Arc::new(Matcher {
            methods: MethodSet::from_names(&["GET", "POST"]),
            hosts: HostSet::new(hosts),
            remote_addrs: None,
            vars,
        })
    };
    b.add(
        &["/a/b"],
        Candidate {
            priority: 0,
            order: 1,
            matcher: m(&[], None),
            target: 1,
        },
    );
    b.add(
        &["/a/*"],
        Candidate {
            priority: 1,
            order: 2,
            matcher: m(&["*.example.com"], None),
            target: 2,
        },
    );
    b.add(
        &["/*"],
        Candidate {
            priority: 0,
            order: 3,
            matcher: m(&[], vars),
            target: 3,
        },
    );
    b.build()
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let (target, host, extra) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    static ROUTER: std::sync::OnceLock<Router<u32>> = std::sync::OnceLock::new();
    let r = ROUTER.get_or_init(router);
    if let Some(path) = normalize_path(target) {
        let host = normalize_host(host);
        let view = RequestView {
            method: &http::Method::GET,
            path: &path,
            host: Some(&host),
            client_ip: extra.parse().ok(),
            vars: &Bytes(extra),
        };
        let _ = r.find(&view);
    }
    if let Ok(uri) = target.parse::<http::Uri>() {
        let mut headers = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_str(extra) {
            headers.insert(http::header::TRANSFER_ENCODING, v.clone());
            headers.insert(http::header::HOST, v);
        }
        let _ = gateway::limits::check_head(
            &http::Method::POST,
            &uri,
            http::Version::HTTP_11,
            &headers,
        );
        let _ = gateway::server::client_ip("10.0.0.1".parse().unwrap(), &headers, None);
    }
});
