#![allow(clippy::unwrap_used)]
//! Prometheus metrics from the real `ferrogate` binary: exact counts,
//! latency histograms and bandwidth after known requests, the connection
//! gauges, health-check gauges, and `public-api` serving the exposition on
//! the data plane when the export server is off.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use harness::cluster::{free_port, Node};
use harness::serde_json::json;
use harness::{raw, refused_addr, send, upstream, Upstream, KEY};

/// One sample: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut map = BTreeMap::new();
        // Values here hold no `",` sequences: split on them.
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once("=\"").unwrap();
            map.insert(k.to_string(), v.trim_end_matches('"').to_string());
        }
        out.push((name.to_string(), map, value));
    }
    out
}

/// Samples of `name` whose labels include every `want` pair.
fn find<'a>(samples: &'a [Sample], name: &str, want: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|(n, labels, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    let found = find(samples, name, want);
    assert_eq!(found.len(), 1, "{name} {want:?}: {found:?}");
    found[0].2
}

fn config(data: u16, admin: u16, prometheus: &str) -> String {
    format!(
        "apisix:\n  node_listen:\n    - ip: 127.0.0.1\n      port: {data}\n  ssl:\n    enable: false\n\
         deployment:\n  role: traditional\n  admin:\n    admin_key:\n      - name: admin\n        key: {KEY}\n        role: admin\n\
         \x20   admin_listen:\n      ip: 127.0.0.1\n      port: {admin}\n\
         plugin_attr:\n  prometheus:\n    refresh_interval: 0.2\n{prometheus}"
    )
}

fn node_with(prometheus: &str) -> Node {
    let (data, admin) = (free_port(), free_port());
    Node::start_with_config(
        tempfile_dir(),
        &config(data, admin, prometheus),
        data,
        admin,
    )
}

fn tempfile_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

async fn put(node: &Node, path: &str, body: harness::serde_json::Value) {
    let r = node.admin("PUT", path, Some(body)).await;
    assert!(r.status.is_success(), "{path}: {} {}", r.status, r.text());
}

async fn scrape(addr: SocketAddr) -> (u16, String, Vec<Sample>) {
    let r = send(
        addr,
        "GET",
        "/apisix/prometheus/metrics",
        &[],
        String::new(),
        None,
    )
    .await;
    let ct = r.header("content-type").unwrap_or_default().to_string();
    let text = r.text();
    let samples = if r.status == 200 {
        parse(&text)
    } else {
        Vec::new()
    };
    (r.status.as_u16(), ct, samples)
}

/// Scrapes until `pred` holds (the exposition is refreshed every 0.2 s).
async fn scrape_until(addr: SocketAddr, pred: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, samples) = scrape(addr).await;
        if status == 200 && pred(&samples) {
            return samples;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never settled: {samples:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn requests_are_counted_exactly() {
    let export = free_port();
    let node = node_with(&format!(
        "    export_addr:\n      ip: 127.0.0.1\n      port: {export}\n"
    ));
    let export = SocketAddr::from(([127, 0, 0, 1], export));
    let up = Upstream::start("u").await;
    put(
        &node,
        "routes/m",
        json!({"uri": "/m", "name": "metered", "upstream": upstream(&[(&up.node(), 1)]),
               "plugins": {"prometheus": {}}}),
    )
    .await;
    put(
        &node,
        "routes/plain",
        json!({"uri": "/plain", "upstream": upstream(&[(&up.node(), 1)])}),
    )
    .await;
    put(
        &node,
        "routes/deny",
        json!({"uris": ["/other", "/deny/*"], "upstream": upstream(&[(&up.node(), 1)]),
               "plugins": {"prometheus": {"prefer_name": true},
                           "ip-restriction": {"blacklist": ["127.0.0.0/8"]}}}),
    )
    .await;
    node.wait_status("/m", 200, Duration::from_secs(5)).await;
    node.wait_status("/deny/x", 403, Duration::from_secs(5))
        .await;

    // Known bytes: each of these is exactly its request_length.
    let get = b"GET /m HTTP/1.1\r\nHost: metrics.test\r\nConnection: close\r\n\r\n";
    let post = b"POST /m?status=500 HTTP/1.1\r\nHost: metrics.test\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
    for _ in 0..4 {
        let (resp, _) = raw(node.data, get, Duration::from_secs(5)).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }
    let (resp, _) = raw(node.data, post, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 500"), "{resp}");
    for _ in 0..3 {
        assert_eq!(node.get("/plain", &[]).await.status, 200);
        assert_eq!(node.get("/deny/x", &[]).await.status, 403);
    }

    // 4 requests here plus the readiness probe.
    let s = scrape_until(export, |s| {
        find(s, "apisix_http_status", &[("route", "m"), ("code", "200")])
            .first()
            .is_some_and(|x| x.2 >= 5.0)
            && find(s, "apisix_http_status", &[("code", "403")])
                .first()
                .is_some_and(|x| x.2 >= 4.0)
    })
    .await;
    let ok = find(&s, "apisix_http_status", &[("route", "m"), ("code", "200")]);
    assert_eq!(ok.len(), 1, "{ok:?}");
    let labels = &ok[0].1;
    assert_eq!(ok[0].2, 5.0);
    for (k, v) in [
        ("matched_uri", "/m"),
        ("matched_host", ""),
        ("service", ""),
        ("consumer", ""),
        ("node", "127.0.0.1"),
        ("request_type", "traditional_http"),
        ("response_source", "upstream"),
    ] {
        assert_eq!(
            labels.get(k).map(String::as_str),
            Some(v),
            "{k}: {labels:?}"
        );
    }
    assert_eq!(
        value(&s, "apisix_http_status", &[("route", "m"), ("code", "500")]),
        1.0
    );
    // No plugin, no series.
    assert!(find(&s, "apisix_http_status", &[("route", "plain")]).is_empty());
    // prefer_name without a name keeps the id; the plugin's own answer
    // has no node and comes from the gateway; the prefix pattern matched.
    let denied = find(&s, "apisix_http_status", &[("code", "403")]);
    assert_eq!(denied.len(), 1, "{denied:?}");
    let (_, labels, count) = denied[0];
    assert_eq!(*count, 4.0);
    assert_eq!(labels["route"], "deny");
    assert_eq!(labels["matched_uri"], "/deny/*");
    assert_eq!(labels["node"], "");
    assert_eq!(labels["response_source"], "apisix");

    // Six requests on route m in each latency histogram but `upstream`
    // for the denied route, which never reached one.
    for kind in ["request", "upstream", "apisix"] {
        let want = [("route", "m"), ("type", kind)];
        assert_eq!(value(&s, "apisix_http_latency_count", &want), 6.0, "{kind}");
        let inf = [("route", "m"), ("type", kind), ("le", "+Inf")];
        assert_eq!(value(&s, "apisix_http_latency_bucket", &inf), 6.0, "{kind}");
        // Loopback requests take well under a minute.
        let top = [("route", "m"), ("type", kind), ("le", "60000")];
        assert_eq!(value(&s, "apisix_http_latency_bucket", &top), 6.0, "{kind}");
    }
    assert!(find(
        &s,
        "apisix_http_latency_count",
        &[("route", "deny"), ("type", "upstream")]
    )
    .is_empty());
    assert_eq!(
        value(
            &s,
            "apisix_http_latency_count",
            &[("route", "deny"), ("type", "request")]
        ),
        4.0
    );

    // Ingress: the bytes of the four raw GETs and the POST exactly, plus the
    // readiness probe (whatever it sent: compare the difference).
    let ingress = value(
        &s,
        "apisix_bandwidth",
        &[("route", "m"), ("type", "ingress")],
    );
    let known = (4 * get.len() + post.len()) as f64;
    assert!(ingress > known, "{ingress} vs {known}");
    let egress = value(
        &s,
        "apisix_bandwidth",
        &[("route", "m"), ("type", "egress")],
    );
    assert!(egress > 0.0);

    // One more GET adds exactly its own length.
    let (resp, _) = raw(node.data, get, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let body_len = resp.split("\r\n\r\n").nth(1).unwrap_or_default().len() as f64;
    let s2 = scrape_until(export, |s| {
        find(s, "apisix_http_status", &[("route", "m"), ("code", "200")])
            .first()
            .is_some_and(|x| x.2 >= 6.0)
    })
    .await;
    let ingress2 = value(
        &s2,
        "apisix_bandwidth",
        &[("route", "m"), ("type", "ingress")],
    );
    assert_eq!(ingress2 - ingress, get.len() as f64);
    let egress2 = value(
        &s2,
        "apisix_bandwidth",
        &[("route", "m"), ("type", "egress")],
    );
    assert!(
        egress2 - egress > body_len,
        "{egress2} - {egress} vs body {body_len}"
    );

    // nginx's connection gauges and the node.
    for state in [
        "active", "accepted", "handled", "reading", "writing", "waiting",
    ] {
        find(
            &s2,
            "apisix_nginx_http_current_connections",
            &[("state", state)],
        )
        .first()
        .unwrap_or_else(|| panic!("state {state} missing"));
    }
    let accepted = value(
        &s2,
        "apisix_nginx_http_current_connections",
        &[("state", "accepted")],
    );
    assert!(accepted >= 13.0, "accepted {accepted}");
    let total = value(&s2, "apisix_http_requests_total", &[]);
    assert!(total >= 13.0, "requests {total}");
    let info = find(&s2, "apisix_node_info", &[]);
    assert!(
        info.first()
            .is_some_and(|(_, l, _)| l.contains_key("hostname")),
        "{info:?}"
    );

    // The exposition is only on the export server.
    let (status, ct, _) = scrape(export).await;
    assert_eq!((status, ct.as_str()), (200, "text/plain"));
    let r = node.get("/apisix/prometheus/metrics", &[]).await;
    assert_eq!(r.status, 404);
    let r = send(export, "GET", "/other", &[], String::new(), None).await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn upstream_health_is_exported() {
    let export = free_port();
    let node = node_with(&format!(
        "    export_addr:\n      ip: 127.0.0.1\n      port: {export}\n"
    ));
    let export = SocketAddr::from(([127, 0, 0, 1], export));
    let up = Upstream::start("u").await;
    let dead = refused_addr();
    let mut nodes = upstream(&[(&up.node(), 1), (&dead.to_string(), 1)]);
    nodes["checks"] = json!({"active": {"timeout": 1,
        "healthy": {"interval": 1, "successes": 1},
        "unhealthy": {"interval": 1, "tcp_failures": 1}}});
    put(&node, "upstreams/hc", nodes).await;
    put(
        &node,
        "routes/hc",
        json!({"uri": "/hc", "upstream_id": "hc", "plugins": {"prometheus": {}}}),
    )
    .await;
    node.wait_status("/hc", 200, Duration::from_secs(5)).await;
    let port = |a: SocketAddr| a.port().to_string();
    let up_port = port(up.addr);
    let dead_port = port(dead);
    let s = scrape_until(export, |s| {
        find(
            s,
            "apisix_upstream_status",
            &[("name", "/apisix/upstreams/hc"), ("port", &dead_port)],
        )
        .first()
        .is_some_and(|x| x.2 == 0.0)
    })
    .await;
    assert_eq!(
        value(
            &s,
            "apisix_upstream_status",
            &[
                ("name", "/apisix/upstreams/hc"),
                ("ip", "127.0.0.1"),
                ("port", &up_port)
            ]
        ),
        1.0
    );
}

#[tokio::test]
async fn public_api_serves_metrics_when_the_export_server_is_off() {
    let export = free_port();
    let node = node_with(&format!(
        "    enable_export_server: false\n    export_addr:\n      ip: 127.0.0.1\n      port: {export}\n"
    ));
    put(
        &node,
        "routes/metrics",
        json!({"uri": "/apisix/prometheus/metrics", "plugins": {"public-api": {}}}),
    )
    .await;
    put(
        &node,
        "routes/other",
        json!({"uri": "/api/other", "plugins": {"public-api": {"uri": "/apisix/nothing"}}}),
    )
    .await;
    node.wait_status("/apisix/prometheus/metrics", 200, Duration::from_secs(5))
        .await;
    let r = node.get("/apisix/prometheus/metrics", &[]).await;
    assert_eq!(r.header("content-type"), Some("text/plain"));
    let s = parse(&r.text());
    assert!(
        !find(&s, "apisix_node_info", &[]).is_empty(),
        "{}",
        r.text()
    );
    assert_eq!(node.get("/api/other", &[]).await.status, 404);
    // Nothing listens on the export port.
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", export))
        .await
        .is_err());
}
