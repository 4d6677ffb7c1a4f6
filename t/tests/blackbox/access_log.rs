#![allow(clippy::unwrap_used)]
//! The access log: a line per request in the configured format, written
//! off the request path; logrotate's rename plus `SIGUSR1` moves the real
//! binary's access and error logs to new files.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::cluster::{free_port, Node};
use harness::serde_json::json;
use harness::{send, upstream, Gateway, Upstream, KEY};

/// Waits until the file at `path` has `n` lines (the writer flushes at
/// least every second); its lines.
async fn lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} lines, want {n}: {text}",
            path.display(),
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_line_per_request_in_the_configured_format() {
    let gw = Gateway::start_with(
        "nginx_config:\n  http:\n    access_log: logs/custom.log\n    access_log_format_escape: json\n    access_log_format: '{\"addr\":\"$remote_addr\",\"req\":\"$request\",\"status\":$status,\"route\":\"$route_id\",\"ua\":\"$http_user_agent\",\"up\":\"$upstream_addr\",\"up_status\":\"$upstream_status\",\"uri\":\"$upstream_uri\",\"bytes\":$body_bytes_sent,\"user\":\"$remote_user\"}'\n",
    )
    .await;
    let up = Upstream::start("u").await;
    gw.put(
        "routes/r",
        json!({"uri": "/r/*", "upstream": upstream(&[(&up.node(), 1)]),
               "plugins": {"proxy-rewrite": {"regex_uri": ["^/r/(.*)", "/v2/$1"]}}}),
    )
    .await;
    gw.put(
        "routes/deny",
        json!({"uri": "/deny", "upstream": upstream(&[(&up.node(), 1)]),
               "plugins": {"ip-restriction": {"blacklist": ["127.0.0.1"]}}}),
    )
    .await;
    let ua = |v: &str| vec![("user-agent", v.to_string())];
    let r = send(
        gw.data,
        "GET",
        "/r/a?x=1",
        &ua("tester \"quoted\""),
        String::new(),
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    let body_len = r.body.len();
    let mut auth = ua("t2");
    auth.push(("authorization", "Basic Ym9iOnB3".to_string()));
    assert_eq!(
        send(gw.data, "GET", "/nothing", &auth, String::new(), None)
            .await
            .status,
        404
    );
    assert_eq!(
        send(gw.data, "GET", "/deny", &ua("t3"), String::new(), None)
            .await
            .status,
        403
    );

    let path = gw.dir.path().join("logs/custom.log");
    let got = lines(&path, 3).await;
    assert_eq!(got.len(), 3, "{got:?}");
    let parsed: Vec<harness::serde_json::Value> = got
        .iter()
        .map(|l| harness::serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let routed = &parsed[0];
    assert_eq!(routed["addr"], "127.0.0.1");
    assert_eq!(routed["req"], "GET /r/a?x=1 HTTP/1.1");
    assert_eq!(routed["status"], 200);
    assert_eq!(routed["route"], "r");
    assert_eq!(routed["ua"], "tester \"quoted\"");
    assert_eq!(routed["up"], up.node());
    assert_eq!(routed["up_status"], "200");
    assert_eq!(routed["uri"], "/v2/a?x=1");
    assert_eq!(routed["bytes"], body_len);
    assert_eq!(routed["user"], "-");
    let unrouted = &parsed[1];
    assert_eq!(unrouted["status"], 404);
    assert_eq!(unrouted["route"], "-");
    assert_eq!(unrouted["up"], "-");
    assert_eq!(unrouted["user"], "bob");
    let refused = &parsed[2];
    assert_eq!(refused["status"], 403);
    assert_eq!(refused["route"], "deny");
    assert_eq!(refused["up"], "-");
    gw.stop().await;
}

#[tokio::test]
async fn default_format_and_switch_off() {
    // Test gateways keep their access log off unless told; this one is on
    // with every other key at its default.
    let gw = Gateway::start_with("nginx_config:\n  http:\n    enable_access_log: true\n").await;
    assert_eq!(gw.get("/nothing").await.status, 404);
    let got = lines(&gw.dir.path().join("logs/access.log"), 1).await;
    // APISIX's default format, nginx's escaping.
    let line = &got[0];
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(line.contains("\"GET /nothing HTTP/1.1\" 404 "), "{line}");
    assert!(line.ends_with(" - - - \"http://--\""), "{line}");
    gw.stop().await;

    let off = Gateway::start_with("nginx_config:\n  http:\n    enable_access_log: false\n").await;
    assert_eq!(off.get("/nothing").await.status, 404);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(!off.dir.path().join("logs/access.log").exists());
    off.stop().await;
}

#[tokio::test]
async fn sigusr1_reopens_the_logs_after_a_rename() {
    let (data, admin) = (free_port(), free_port());
    let yaml = format!(
        "apisix:\n  node_listen:\n    - ip: 127.0.0.1\n      port: {data}\n  ssl:\n    enable: false\n\
         deployment:\n  role: traditional\n  admin:\n    admin_key:\n      - name: admin\n        key: {KEY}\n        role: admin\n\
         \x20   admin_listen:\n      ip: 127.0.0.1\n      port: {admin}\n\
         nginx_config:\n  error_log: logs/error.log\n  error_log_level: info\n"
    );
    let node = Node::start_with_config(tempfile::tempdir().unwrap(), &yaml, data, admin);
    let logs = node.dir.path().join("logs");
    assert_eq!(node.get("/one", &[]).await.status, 404);
    let first = lines(&logs.join("access.log"), 1).await;
    assert!(first[0].contains("GET /one"), "{first:?}");
    let errors = std::fs::read_to_string(logs.join("error.log")).unwrap();
    assert!(errors.contains("access log"), "{errors}");

    std::fs::rename(logs.join("access.log"), logs.join("access.log.1")).unwrap();
    std::fs::rename(logs.join("error.log"), logs.join("error.log.1")).unwrap();
    let pid = node.pid().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-USR1", &pid])
        .status()
        .unwrap()
        .success());
    // The reopen is logged to the new error log.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(logs.join("error.log"))
        .unwrap_or_default()
        .contains("access log reopened")
    {
        assert!(
            Instant::now() < deadline,
            "no reopen logged: {}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(node.get("/two", &[]).await.status, 404);
    let second = lines(&logs.join("access.log"), 1).await;
    assert_eq!(second.len(), 1, "{second:?}");
    assert!(second[0].contains("GET /two"), "{second:?}");
    let old = std::fs::read_to_string(logs.join("access.log.1")).unwrap();
    assert!(!old.contains("GET /two"), "{old}");
}
