//! Router lookups at 1, 1k and 10k routes, snapshot builds at 10k routes,
//! and the cost of applying one change to a 10k-route configuration.

use std::borrow::Cow;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::Method;
use serde_json::json;

use admin_api::store::{Event, MemoryStore};
use gateway::proxy::ProxyOptions;
use gateway::router::{Candidate, HostSet, Matcher, MethodSet, RequestView, Router, RouterBuilder};
use gateway::snapshot::Compiler;
use plugins::expr::Vars;

struct NoVars;
impl Vars for NoVars {
    fn var(&self, _: &str) -> Option<Cow<'_, str>> {
        None
    }
}

fn router(n: usize) -> Router<usize> {
    let mut b = RouterBuilder::default();
    let any = Arc::new(Matcher {
        methods: MethodSet::from_names(&["GET"]),
        hosts: HostSet::default(),
        remote_addrs: None,
        vars: None,
    });
    for i in 0..n {
        // Half exact routes, half prefixes of varying depth.
        let uri = if i % 2 == 0 {
            format!("/r/{i}")
        } else {
            format!("/p/{i}/*")
        };
        b.add(
            &[uri],
            Candidate {
                priority: 0,
                order: i as u64,
                matcher: any.clone(),
                target: i,
            },
        );
    }
    b.add(
        &["/*"],
        Candidate {
            priority: 0,
            order: u64::MAX,
            matcher: any,
            target: usize::MAX,
        },
    );
    b.build()
}

fn lookups(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_match");
    for n in [1usize, 1_000, 10_000] {
        let r = router(n);
        let exact = format!("/r/{}", (n - 1) / 2 * 2);
        let prefix = format!("/p/{}/a/b", if n > 1 { (n - 1) | 1 } else { 1 });
        for (name, path) in [
            ("exact", exact.as_str()),
            ("prefix", prefix.as_str()),
            ("fallback", "/zzz/none"),
        ] {
            group.bench_with_input(BenchmarkId::new(name, n), &r, |b, r| {
                b.iter(|| {
                    let view = RequestView {
                        method: &Method::GET,
                        path: black_box(path),
                        host: None,
                        client_ip: None,
                        vars: &NoVars,
                    };
                    r.find(&view).copied()
                })
            });
        }
    }
    group.finish();
}

fn store_with_routes(n: usize) -> MemoryStore {
    let store = MemoryStore::new();
    for i in 0..n {
        let route = json!({"id": i.to_string(), "uri": format!("/r/{i}"), "upstream": {"type": "roundrobin", "nodes": {"127.0.0.1:1980": 1, "127.0.0.1:1981": 1}}, "plugins": {"ip-restriction": {"whitelist": ["127.0.0.0/8"]}}});
        store
            .put_now(&format!("/apisix/routes/{i}"), &route, None)
            .expect("memory store");
    }
    store
}

fn snapshots(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _guard = rt.enter();
    let store = store_with_routes(10_000);
    let mut group = c.benchmark_group("snapshot_10k_routes");
    group.sample_size(10);
    group.bench_function("full_build", |b| {
        b.iter(|| {
            let mut compiler = Compiler::new(ProxyOptions::default());
            compiler.load(&store).map(|s| s.routes)
        })
    });
    let mut compiler = Compiler::new(ProxyOptions::default());
    compiler.load(&store).expect("load");
    let mut i = 0u64;
    group.bench_function("apply_one_route_change", |b| {
        b.iter(|| {
            i += 1;
            let route = json!({"uri": format!("/changed/{i}"), "upstream": {"nodes": {"127.0.0.1:1980": 1}}});
            let entry = admin_api::store::Entry { key: "/apisix/routes/5".into(), value: route, created_index: 6, modified_index: 10 + i };
            compiler.apply(&Event::Put(entry)).routes
        })
    });
    group.finish();
}

criterion_group!(benches, lookups, snapshots);
criterion_main!(benches);
