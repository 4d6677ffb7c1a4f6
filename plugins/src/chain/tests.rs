//! Phase order, early answers, consumer merging and `_meta` against test
//! plugins that record what ran.

use std::sync::Mutex;

use super::*;
use crate::consumer::{Consumer, Credential};
use crate::testing::{echo, request, send};

/// A plugin that records `name:phase` into a shared log and, optionally,
/// answers in one phase.
struct Probe {
    name: &'static str,
    phases: Phases,
    log: Arc<Mutex<Vec<String>>>,
    answer_in: Option<(Phases, u16)>,
    identify: Option<Arc<Credential>>,
}

impl Probe {
    fn note(&self, phase: &str) {
        self.log
            .lock()
            .unwrap()
            .push(format!("{}:{phase}", self.name));
    }

    fn flow(&self, phase: Phases) -> Flow {
        match self.answer_in {
            Some((p, status)) if p == phase => Flow::status(StatusCode::from_u16(status).unwrap()),
            _ => Flow::Continue,
        }
    }
}

impl Plugin for Probe {
    fn phases(&self) -> Phases {
        self.phases
    }
    fn rewrite(&self, ctx: &mut Ctx, _req: &mut request::Parts) -> Flow {
        self.note("rewrite");
        if let Some(c) = &self.identify {
            ctx.credential = Some(c.clone());
        }
        self.flow(Phases::REWRITE)
    }
    fn access(&self, _ctx: &mut Ctx, _req: &mut request::Parts) -> Flow {
        self.note("access");
        self.flow(Phases::ACCESS)
    }
    fn before_proxy(&self, _ctx: &mut Ctx, _req: &mut request::Parts) -> Flow {
        self.note("before_proxy");
        self.flow(Phases::BEFORE_PROXY)
    }
    fn header_filter(&self, ctx: &mut Ctx, resp: &mut http::response::Parts) {
        self.note(&format!(
            "header_filter({})",
            ctx.status.map_or(0, |s| s.as_u16())
        ));
        resp.headers
            .append("x-seen-by", HeaderValue::from_static("probe"));
    }
    fn body_filter(&self, _ctx: &mut Ctx, chunk: &mut Bytes, end: bool) {
        if end {
            self.note("body_filter(end)");
            *chunk = Bytes::from(format!("{}|tail", String::from_utf8_lossy(chunk)));
        }
    }
    fn log(&self, ctx: &Ctx) {
        self.note(&format!("log({})", ctx.status.map_or(0, |s| s.as_u16())));
    }
}

const ALL: Phases = Phases::ALL;

fn probe(
    name: &'static str,
    priority: i32,
    phases: Phases,
    log: &Arc<Mutex<Vec<String>>>,
) -> Entry {
    Entry::new(
        name,
        priority,
        Arc::new(Probe {
            name,
            phases,
            log: log.clone(),
            answer_in: None,
            identify: None,
        }),
    )
}

fn chain_of(
    globals: Vec<PluginSet>,
    route: PluginSet,
) -> Chain<
    impl Service<
            Request<()>,
            Response = Response<ResponseBody>,
            Error = Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
> {
    crate::testing::chain(globals, route, ConsumerIndex::default())
}

#[tokio::test]
async fn phases_run_in_apisix_order_across_plugins() {
    let log = Arc::new(Mutex::new(Vec::new()));
    // "auth" (rewrite, 2500) must run before "ipr" (access, 3000).
    let route = PluginSet::new(vec![
        probe("ipr", 3000, Phases::ACCESS, &log),
        probe("auth", 2500, Phases::REWRITE, &log),
        probe("all", 100, ALL, &log),
    ]);
    let global = PluginSet::new(vec![probe("global", 1, ALL, &log)]);
    let answer = send(
        chain_of(vec![global], route),
        request("127.0.0.1", "/", &[]),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.body.ends_with("|tail"), "{}", answer.body);
    assert_eq!(
        *log.lock().unwrap(),
        vec![
            "global:rewrite",
            "global:access",
            "auth:rewrite",
            "all:rewrite",
            "ipr:access",
            "all:access",
            "global:before_proxy",
            "all:before_proxy",
            "global:header_filter(200)",
            "all:header_filter(200)",
            "global:body_filter(end)",
            "all:body_filter(end)",
            "global:log(200)",
            "all:log(200)",
        ]
    );
}

#[tokio::test]
async fn an_early_answer_still_passes_the_response_phases() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut auth = probe("auth", 2500, Phases::REWRITE, &log);
    auth.plugin = Arc::new(Probe {
        name: "auth",
        phases: Phases::REWRITE,
        log: log.clone(),
        answer_in: Some((Phases::REWRITE, 401)),
        identify: None,
    });
    let route = PluginSet::new(vec![
        probe("ipr", 3000, Phases::ACCESS, &log),
        auth,
        probe("cors", 4000, Phases::HEADER_FILTER | Phases::LOG, &log),
    ]);
    let answer = send(chain_of(vec![], route), request("127.0.0.1", "/", &[])).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.headers.get("x-seen-by").unwrap(), "probe");
    assert_eq!(
        *log.lock().unwrap(),
        vec!["auth:rewrite", "cors:header_filter(401)", "cors:log(401)"]
    );
}

#[tokio::test]
async fn consumer_plugins_join_after_authentication() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let consumer_plugins = PluginSet::new(vec![
        probe("extra", 1500, Phases::REWRITE | Phases::ACCESS, &log),
        // Replaces the route's own "limit".
        probe("limit", 1002, Phases::ACCESS, &log),
    ]);
    let credential = Arc::new(Credential {
        consumer: Arc::new(Consumer {
            username: "jack".into(),
            custom_id: None,
            group_id: None,
            plugins: Arc::new(consumer_plugins),
        }),
        id: None,
        data: Arc::new(()),
    });
    let auth = Entry::new(
        "auth",
        2500,
        Arc::new(Probe {
            name: "auth",
            phases: Phases::REWRITE,
            log: log.clone(),
            answer_in: None,
            identify: Some(credential),
        }),
    );
    let mut route_limit = probe("limit", 1002, Phases::ACCESS, &log);
    route_limit.plugin = Arc::new(Probe {
        name: "route-limit",
        phases: Phases::ACCESS,
        log: log.clone(),
        answer_in: None,
        identify: None,
    });
    let route = PluginSet::new(vec![
        auth,
        route_limit,
        probe("late", 10, Phases::REWRITE, &log),
    ]);
    send(chain_of(vec![], route), request("127.0.0.1", "/", &[])).await;
    assert_eq!(
        *log.lock().unwrap(),
        vec![
            "auth:rewrite",
            "late:rewrite",
            "extra:rewrite",
            "extra:access",
            "limit:access",
        ]
    );
}

#[tokio::test]
async fn meta_filter_and_error_response() {
    let set = crate::testing::compile(&serde_json::json!({
        "ip-restriction": {
            "blacklist": ["127.0.0.1"],
            "_meta": {
                "filter": [["arg_strict", "==", "1"]],
                "error_response": {"message": "nope"}
            }
        }
    }))
    .unwrap();
    let svc = chain_of(vec![], set);
    let open = send(svc.clone(), request("127.0.0.1", "/x", &[])).await;
    assert_eq!(open.status, StatusCode::OK);
    let shut = send(svc, request("127.0.0.1", "/x?strict=1", &[])).await;
    assert_eq!(shut.status, StatusCode::FORBIDDEN);
    assert_eq!(shut.json(), serde_json::json!({"message": "nope"}));
}

#[tokio::test]
async fn disabled_plugins_do_not_run_and_priority_can_be_overridden() {
    let set = crate::testing::compile(&serde_json::json!({
        "ip-restriction": {"blacklist": ["127.0.0.1"], "_meta": {"disable": true}}
    }))
    .unwrap();
    assert!(set.is_empty());
    let set = crate::testing::compile(&serde_json::json!({
        "ip-restriction": {"blacklist": ["127.0.0.1"], "_meta": {"priority": 7}}
    }))
    .unwrap();
    assert_eq!(set.entries()[0].priority, 7);
}

#[tokio::test]
async fn a_set_without_hooks_leaves_the_body_alone() {
    let set = PluginSet::new(Vec::new());
    let chain = Chain {
        globals: Arc::new(GlobalRules::default()),
        route: Arc::new(set),
        consumers: Arc::new(ConsumerIndex::default()),
        inner: echo(),
    };
    let answer = send(chain, request("127.0.0.1", "/plain", &[])).await;
    assert_eq!(answer.json()["uri"], "/plain");
}
