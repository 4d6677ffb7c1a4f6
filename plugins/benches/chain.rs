//! Plugin-chain overhead: requests through chains of 0, 1, 5 and 10 no-op
//! plugins (one hook each, in access), through ip-restriction with 10,000
//! deny CIDRs, and through the key-auth chain, into a trivial inner service.

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{Request, Response};
use plugins::chain::{Chain, Entry, GlobalRules, PluginSet};
use plugins::consumer::ConsumerIndex;
use plugins::{full_body, ClientIp, Ctx, Flow, Phases, Plugin, ResponseBody};
use serde_json::json;
use tower::ServiceExt;

struct Noop;

impl Plugin for Noop {
    fn phases(&self) -> Phases {
        Phases::ACCESS
    }
    fn access(&self, _ctx: &mut Ctx, _req: &mut http::request::Parts) -> Flow {
        Flow::Continue
    }
}

/// A plugin with only a `log` hook that does nothing: the cost of the
/// log phase itself (the body wrapped, the context kept until it ends).
struct NoopLog;

impl Plugin for NoopLog {
    fn phases(&self) -> Phases {
        Phases::LOG
    }
    fn log(&self, _ctx: &Ctx) {}
}

#[derive(Clone)]
struct Inner;

impl tower::Service<Request<()>> for Inner {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<ResponseBody>, Infallible>>;
    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Request<()>) -> Self::Future {
        std::future::ready(Ok(Response::new(full_body("ok"))))
    }
}

fn request(headers: &[(&str, &str)]) -> Request<()> {
    let mut req = Request::builder().uri("/bench");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut req = req.body(()).expect("request");
    req.extensions_mut()
        .insert(ClientIp("127.0.0.1".parse().expect("ip")));
    req
}

fn chain(set: PluginSet, consumers: ConsumerIndex) -> Chain<Inner> {
    Chain {
        globals: Arc::new(GlobalRules::default()),
        route: Arc::new(set),
        consumers: Arc::new(consumers),
        inner: Inner,
    }
}

fn noops(n: usize) -> PluginSet {
    PluginSet::new(
        (0..n)
            .map(|i| Entry::new("noop", i as i32, Arc::new(Noop)))
            .collect(),
    )
}

fn run(c: &mut Criterion, name: &str, svc: Chain<Inner>, headers: &[(&str, &str)]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    // The request is built outside the timed part: only the chain counts.
    c.bench_function(name, |b| {
        b.iter_batched(
            || request(headers),
            |req| {
                rt.block_on(svc.clone().oneshot(black_box(req)))
                    .map(|r| r.status())
            },
            BatchSize::SmallInput,
        )
    });
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    c.bench_function("chain/inner_only", |b| {
        b.iter_batched(
            || request(&[]),
            |req| {
                rt.block_on(Inner.oneshot(black_box(req)))
                    .map(|r| r.status())
            },
            BatchSize::SmallInput,
        )
    });
    for n in [0, 1, 5, 10] {
        run(
            c,
            &format!("chain/noop_{n}"),
            chain(noops(n), ConsumerIndex::default()),
            &[],
        );
    }
    let deny: Vec<String> = (0..10_000)
        .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
        .collect();
    let ipr = plugins::testing::compile(&json!({"ip-restriction": {"blacklist": deny}}))
        .expect("valid conf");
    run(
        c,
        "chain/ip_restriction_10k_deny",
        chain(ipr, ConsumerIndex::default()),
        &[],
    );

    // The auth chain: 1,000 key-auth consumers; the request's key is found
    // by one hash lookup and compared in constant time.
    let names: Vec<(String, String)> = (0..1_000)
        .map(|i| (format!("user{i}"), format!("key-{i:04}-0123456789abcdef")))
        .collect();
    let entries: Vec<(&'static str, &str, serde_json::Value)> = names
        .iter()
        .map(|(user, key)| ("key-auth", user.as_str(), json!({"key": key})))
        .collect();
    let consumers = || plugins::consumer::index_for_tests(&entries).expect("valid consumers");
    let key = names[500].1.as_str();
    let key_auth = plugins::testing::compile(&json!({"key-auth": {}})).expect("valid conf");
    run(
        c,
        "chain/key_auth_1k_consumers",
        chain(key_auth, consumers()),
        &[("apikey", key)],
    );
    let full = plugins::testing::compile(&json!({
        "ip-restriction": {"whitelist": ["127.0.0.0/8"]},
        "key-auth": {},
        "consumer-restriction": {"whitelist": ["user500"]},
    }))
    .expect("valid conf");
    run(
        c,
        "chain/ip_key_auth_consumer_restriction",
        chain(full, consumers()),
        &[("apikey", key)],
    );

    // The traffic plugins a typical public route has: a rate limit, a
    // rewrite for the upstream, CORS for browsers, and a request id. The
    // limit is high enough never to reject.
    let traffic = plugins::testing::compile(&json!({
        "limit-count": {"count": 1_000_000_000, "time_window": 60, "key": "remote_addr"},
        "proxy-rewrite": {"uri": "/v2$uri", "headers": {"set": {"X-Via": "gw"}}},
        "cors": {"allow_origins": "https://a.test,https://b.test"},
    }))
    .expect("valid conf");
    run(
        c,
        "chain/limit_count_proxy_rewrite_cors",
        chain(traffic, ConsumerIndex::default()),
        &[("origin", "https://a.test")],
    );
    let with_id = plugins::testing::compile(&json!({
        "limit-count": {"count": 1_000_000_000, "time_window": 60, "key": "remote_addr"},
        "proxy-rewrite": {"uri": "/v2$uri", "headers": {"set": {"X-Via": "gw"}}},
        "cors": {"allow_origins": "https://a.test,https://b.test"},
        "request-id": {},
        "limit-req": {"rate": 1_000_000_000, "burst": 0, "key": "remote_addr", "nodelay": true},
    }))
    .expect("valid conf");
    run(
        c,
        "chain/traffic_five_plugins",
        chain(with_id, ConsumerIndex::default()),
        &[("origin", "https://a.test")],
    );

    run(
        c,
        "chain/noop_log",
        chain(
            PluginSet::new(vec![Entry::new("noop", 0, Arc::new(NoopLog))]),
            ConsumerIndex::default(),
        ),
        &[],
    );

    // Metrics: the series is found in the plugin's list and only atomics
    // are touched; the log hook also makes the chain wrap the body.
    let prometheus = plugins::testing::compile(&json!({"prometheus": {}})).expect("valid conf");
    run(
        c,
        "chain/prometheus",
        chain(prometheus, ConsumerIndex::default()),
        &[],
    );
}

criterion_group!(chain_benches, benches);
criterion_main!(chain_benches);
