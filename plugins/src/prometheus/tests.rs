use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::json;

use super::*;
use crate::ctx::RouteInfo;
use crate::testing;

fn metrics(attr: serde_json::Value) -> Arc<Metrics> {
    Arc::new(Metrics::new(Settings::from_attr(Some(&attr)).expect("settings")).expect("metrics"))
}

fn exposition(m: &Metrics) -> String {
    m.refresh();
    String::from_utf8(m.cached().expect("rendered").to_vec()).expect("utf8")
}

/// The sample lines of `name` (no `# HELP`/`# TYPE`).
fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .collect()
}

fn routed_ctx(status: u16) -> Ctx {
    let mut ctx = testing::ctx("10.0.0.1");
    ctx.route_id = Some("r1".into());
    ctx.service_id = Some("s1".into());
    ctx.route = Some(Arc::new(RouteInfo {
        name: Some("orders".into()),
        service_name: Some("shop".into()),
        uris: vec!["/a".into(), "/orders/*".into()].into_boxed_slice(),
        hosts: vec!["*.example.com".into()].into_boxed_slice(),
    }));
    ctx.matched_uri = 1;
    ctx.host = Some("api.example.com".into());
    ctx.status = StatusCode::from_u16(status).ok();
    ctx.upstream.addr = Some("127.0.0.1:1980".parse().expect("authority"));
    ctx.upstream.started = Some(Instant::now() - Duration::from_millis(3));
    ctx.upstream.header_time = Some(Instant::now());
    ctx.started = Instant::now() - Duration::from_millis(4);
    ctx.request_length = 100;
    ctx.header_bytes_sent = 50;
    ctx.body_bytes_sent = 7;
    ctx
}

#[test]
fn counts_status_latency_and_bandwidth_with_apisix_labels() {
    let m = metrics(json!({}));
    let p = Prometheus::new(m.clone(), &json!({}), None);
    for _ in 0..3 {
        p.log(&routed_ctx(200));
    }
    p.log(&routed_ctx(502));
    let text = exposition(&m);
    let status = samples(&text, "apisix_http_status");
    assert_eq!(status.len(), 2, "{text}");
    let ok = status
        .iter()
        .find(|l| l.contains("code=\"200\""))
        .expect("200 series");
    for label in [
        "route=\"r1\"",
        "service=\"s1\"",
        "matched_uri=\"/orders/*\"",
        "matched_host=\"*.example.com\"",
        "consumer=\"\"",
        "node=\"127.0.0.1\"",
        "request_type=\"traditional_http\"",
        "response_source=\"upstream\"",
    ] {
        assert!(ok.contains(label), "{label} in {ok}");
    }
    assert!(ok.ends_with(" 3"), "{ok}");
    // One request histogram series per type, each counting all four.
    let counts = samples(&text, "apisix_http_latency_count");
    assert_eq!(counts.len(), 3, "{text}");
    assert!(counts.iter().all(|l| l.ends_with(" 4")), "{counts:?}");
    // 4 ms: above the 2 ms bucket, within the 5 ms one.
    let request_le = |le: &str| {
        samples(&text, "apisix_http_latency_bucket")
            .into_iter()
            .find(|l| l.contains("type=\"request\"") && l.contains(&format!("le=\"{le}\"")))
            .expect("bucket")
            .to_string()
    };
    assert!(request_le("2").ends_with(" 0"), "{}", request_le("2"));
    assert!(request_le("5").ends_with(" 4"), "{}", request_le("5"));
    let bw = samples(&text, "apisix_bandwidth");
    let ingress = bw
        .iter()
        .find(|l| l.contains("type=\"ingress\""))
        .expect("ingress");
    let egress = bw
        .iter()
        .find(|l| l.contains("type=\"egress\""))
        .expect("egress");
    assert!(ingress.ends_with(" 400"), "{ingress}");
    assert!(egress.ends_with(" 228"), "{egress}");
    assert_eq!(p.series.len(), 2);
}

#[test]
fn prefer_name_uses_route_and_service_names() {
    let m = metrics(json!({}));
    let p = Prometheus::new(m.clone(), &json!({"prefer_name": true}), None);
    p.log(&routed_ctx(200));
    let text = exposition(&m);
    let line = samples(&text, "apisix_http_status")[0];
    assert!(line.contains("route=\"orders\""), "{line}");
    assert!(line.contains("service=\"shop\""), "{line}");
}

#[test]
fn plugin_answers_are_from_apisix_and_have_no_upstream_latency() {
    let m = metrics(json!({}));
    let p = Prometheus::new(m.clone(), &json!({}), None);
    let mut ctx = routed_ctx(401);
    ctx.upstream = Default::default();
    p.log(&ctx);
    let text = exposition(&m);
    let line = samples(&text, "apisix_http_status")[0];
    assert!(line.contains("response_source=\"apisix\""), "{line}");
    assert!(line.contains("node=\"\""), "{line}");
    // No upstream latency series until a request reaches one, as APISIX.
    assert!(!samples(&text, "apisix_http_latency_count")
        .iter()
        .any(|l| l.contains("type=\"upstream\"")));
}

#[test]
fn disabled_labels_are_blank() {
    let m = metrics(json!({}));
    let meta = json!({"disabled_labels": {"http_status": ["matched_uri", "node"],
        "bandwidth": ["route"]}});
    assert!(metadata_schema().validate(&meta).is_ok());
    let p = Prometheus::new(m.clone(), &json!({}), Some(&meta));
    p.log(&routed_ctx(200));
    let text = exposition(&m);
    let line = samples(&text, "apisix_http_status")[0];
    assert!(line.contains("matched_uri=\"\""), "{line}");
    assert!(line.contains("node=\"\""), "{line}");
    assert!(line.contains("route=\"r1\""), "{line}");
    for l in samples(&text, "apisix_bandwidth") {
        assert!(l.contains("route=\"\""), "{l}");
    }
}

#[test]
fn extra_labels_read_variables() {
    let m = metrics(json!({"metrics": {
        "http_status": {"extra_labels": [{"upstream_addr": "$upstream_addr"}]},
        "bandwidth": {"extra_labels": [{"route_ref": "$route_id"}]}
    }}));
    let p = Prometheus::new(m.clone(), &json!({}), None);
    p.log(&routed_ctx(200));
    p.log(&routed_ctx(200));
    let text = exposition(&m);
    let line = samples(&text, "apisix_http_status")[0];
    assert!(line.contains("upstream_addr=\"127.0.0.1:1980\""), "{line}");
    assert!(line.ends_with(" 2"), "{line}");
    for l in samples(&text, "apisix_bandwidth") {
        assert!(l.contains("route_ref=\"r1\""), "{l}");
    }
}

#[test]
fn metric_prefix_and_buckets() {
    let m = metrics(json!({"metric_prefix": "gw_", "default_buckets": [3, 30]}));
    let p = Prometheus::new(m.clone(), &json!({}), None);
    p.log(&routed_ctx(200));
    let text = exposition(&m);
    assert!(text.contains("gw_http_status{"), "{text}");
    assert!(!text.contains("apisix_http_status"), "{text}");
    let buckets = samples(&text, "gw_http_latency_bucket");
    // 3, 30 and +Inf for each of the three types.
    assert_eq!(buckets.len(), 9, "{buckets:?}");
}

#[test]
fn schemas() {
    assert!(schema().validate(&json!({"prefer_name": true})).is_ok());
    assert!(schema().validate(&json!({"prefer_name": "yes"})).is_err());
    let err = metadata_schema()
        .validate(&json!({"disabled_labels": {"http_status": ["code"]}}))
        .expect_err("code is structural");
    assert!(err.contains("disabled_labels"), "{err}");
    assert!(metadata_schema()
        .validate(&json!({"disabled_labels": {"nope": []}}))
        .is_err());
}

#[test]
fn many_label_combinations_still_count() {
    let m = metrics(json!({}));
    let p = Prometheus::new(m.clone(), &json!({}), None);
    for i in 0..(series::MAX_CACHED + 10) {
        let mut ctx = routed_ctx(200);
        ctx.route_id = Some(format!("r{i}").into());
        p.log(&ctx);
        p.log(&ctx);
    }
    assert_eq!(p.series.len(), series::MAX_CACHED);
    let text = exposition(&m);
    let status = samples(&text, "apisix_http_status");
    assert_eq!(status.len(), series::MAX_CACHED + 10);
    assert!(status.iter().all(|l| l.ends_with(" 2")));
}

#[test]
#[ignore]
fn log_cost() {
    let m = metrics(json!({}));
    let p = Prometheus::new(m.clone(), &json!({}), None);
    let ctx = routed_ctx(200);
    for _ in 0..1000 {
        p.log(&ctx);
    }
    let n = 1_000_000;
    let t = Instant::now();
    for _ in 0..n {
        p.log(&ctx);
    }
    eprintln!(
        "log: {:?} per call, {} series",
        t.elapsed() / n,
        p.series.len()
    );
}

#[test]
fn node_ips_from_authorities() {
    assert_eq!(authority_ip("10.0.0.1:8080"), "10.0.0.1");
    assert_eq!(authority_ip("[::1]:80"), "::1");
    assert_eq!(authority_ip("[2001:db8::1]:443"), "2001:db8::1");
    assert_eq!(authority_ip("example.com"), "example.com");
    assert_eq!(authority_ip("[::1]"), "::1");
}
