//! Plugin-chain overhead: a request through ip-restriction into a trivial
//! inner service, against the inner service alone.

use std::convert::Infallible;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use plugins::registry::build_chain;
use plugins::{full_body, ClientIp, HttpService};
use serde_json::json;
use tower::ServiceExt;

fn inner() -> HttpService<()> {
    HttpService::new(tower::service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(full_body("ok")))
    }))
}

fn request() -> Request<()> {
    let mut req = Request::new(());
    req.extensions_mut()
        .insert(ClientIp("127.0.0.1".parse().expect("ip")));
    req
}

fn chain(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let bare = inner();
    let deny: Vec<String> = (0..10_000)
        .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
        .collect();
    let plugin =
        plugins::compile("ip-restriction", &json!({"blacklist": deny})).expect("valid conf");
    let wrapped = build_chain(&[plugin], inner());
    c.bench_function("chain/bare", |b| {
        b.iter(|| {
            rt.block_on(bare.clone().oneshot(black_box(request())))
                .map(|r| r.status())
        })
    });
    c.bench_function("chain/ip_restriction_10k_deny", |b| {
        b.iter(|| {
            rt.block_on(wrapped.clone().oneshot(black_box(request())))
                .map(|r| r.status())
        })
    });
}

criterion_group!(benches, chain);
criterion_main!(benches);
