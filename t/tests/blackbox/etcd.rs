//! Many gateways, one configuration: real etcd, three real ferrogate
//! processes, real HTTP.

use std::time::{Duration, Instant};

use harness::cluster::{etcd_available, failed_start, free_port, Etcd, Node};
use harness::serde_json::{json, Value};
use harness::{Upstream, KEY};

fn route(uri: &str, upstream: &Upstream) -> Value {
    json!({"uri": uri, "upstream": {"type": "roundrobin", "nodes": {upstream.node(): 1}}})
}

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_one_config() {
    if !etcd_available("three_nodes_share_one_config") {
        return;
    }
    let etcd = Etcd::start();
    let up = Upstream::start("shared").await;
    let nodes: Vec<Node> = (0..3)
        .map(|_| Node::start(&etcd.endpoint(), "", ""))
        .collect();
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    // Written through A, served by every node within a second.
    let r = a.admin("PUT", "routes/1", Some(route("/one", &up))).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["key"], "/apisix/routes/1");
    let mut slowest = Duration::ZERO;
    for n in &nodes {
        slowest = slowest.max(n.wait_status("/one", 200, SECOND).await);
    }
    eprintln!("A -> all: served everywhere after {slowest:?}");
    // What etcd holds is APISIX's layout and value.
    let stored: Value = serde_json::from_str(&etcd.value("/apisix/routes/1").unwrap()).unwrap();
    assert_eq!(stored["uri"], "/one");
    assert_eq!(stored["id"], "1");

    // And the other way: B writes, A and C serve.
    let r = b.admin("PUT", "routes/2", Some(route("/two", &up))).await;
    assert_eq!(r.status, 201, "{}", r.text());
    for n in [a, c] {
        n.wait_status("/two", 200, SECOND).await;
    }
    // Every node's Admin API reads what any node wrote.
    let r = c.admin("GET", "routes/1", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["value"]["uri"], "/one");
    assert_eq!(c.admin("GET", "routes", None).await.json()["total"], 2);

    // A route written straight into etcd, as an APISIX node or etcdctl would.
    let direct = route("/direct", &up).to_string();
    etcd.ctl(&["put", "/apisix/routes/direct", &direct]);
    for n in &nodes {
        n.wait_status("/direct", 200, SECOND).await;
    }
    // APISIX's own bookkeeping keys are not objects, and a broken value is
    // skipped (and named in the log) while the rest keeps working.
    etcd.ctl(&["put", "/apisix/routes/", "init_dir"]);
    etcd.ctl(&["put", "/apisix/gen_id", "7"]);
    etcd.ctl(&["put", "/apisix/plugins", r#"[{"name":"key-auth"}]"#]);
    etcd.ctl(&["put", "/apisix/routes/broken", r#"{"uri": 5}"#]);
    etcd.ctl(&["put", "/apisix/routes/garbage", "{not json"]);
    let after = route("/after-broken", &up).to_string();
    etcd.ctl(&["put", "/apisix/routes/after", &after]);
    for n in &nodes {
        n.wait_status("/after-broken", 200, SECOND).await;
        assert_eq!(n.get("/one", &[]).await.status, 200);
        let log = n.log();
        assert!(log.contains("/apisix/routes/broken"), "{log}");
        assert!(log.contains("/apisix/routes/garbage"), "{log}");
    }

    // POST: an APISIX-style generated id, served everywhere.
    let r = a.admin("POST", "routes", Some(route("/posted", &up))).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["value"]["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 20, "{id}");
    for n in &nodes {
        n.wait_status("/posted", 200, SECOND).await;
    }

    // PATCH through one node after another node's change merges into it.
    let r = b
        .admin("PATCH", "routes/1", Some(json!({"uri": "/one-patched"})))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    for n in &nodes {
        n.wait_status("/one-patched", 200, SECOND).await;
        n.wait_status("/one", 404, SECOND).await;
    }

    // Delete through C: gone everywhere, in etcd too.
    let r = c.admin("DELETE", "routes/2", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    for n in &nodes {
        n.wait_status("/two", 404, SECOND).await;
    }
    assert_eq!(etcd.value("/apisix/routes/2"), None);
    // A consumer and its credentials go together.
    let consumer = json!({"username": "jack"});
    assert_eq!(
        a.admin("PUT", "consumers", Some(consumer)).await.status,
        201
    );
    let cred = json!({"plugins": {"key-auth": {"key": "jack-key"}}});
    let r = a
        .admin("PUT", "consumers/jack/credentials/c1", Some(cred))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(etcd
        .value("/apisix/consumers/jack/credentials/c1")
        .is_some());
    // One no node serves (it does not parse): the delete takes it too, or it
    // would come back with the next consumer of that name.
    etcd.ctl(&["put", "/apisix/consumers/jack/credentials/c2", "{broken"]);
    assert_eq!(b.admin("DELETE", "consumers/jack", None).await.status, 200);
    assert_eq!(etcd.value("/apisix/consumers/jack/credentials/c1"), None);
    assert_eq!(etcd.value("/apisix/consumers/jack/credentials/c2"), None);
}

/// Sends GETs to every node until `stop`; the failures.
async fn load(
    nodes: Vec<std::net::SocketAddr>,
    path: &'static str,
    for_how_long: Duration,
) -> (usize, usize) {
    let end = Instant::now() + for_how_long;
    let mut sent = 0;
    let mut failed = 0;
    while Instant::now() < end {
        for addr in &nodes {
            let r = harness::send(*addr, "GET", path, &[], String::new(), None).await;
            sent += 1;
            if r.status != 200 {
                failed += 1;
            }
        }
    }
    (sent, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_keeps_serving_and_resyncs() {
    if !etcd_available("etcd_outage_keeps_serving_and_resyncs") {
        return;
    }
    let mut etcd = Etcd::start();
    let up = Upstream::start("outage").await;
    let mut nodes: Vec<Node> = (0..3)
        .map(|_| Node::start(&etcd.endpoint(), "", ""))
        .collect();
    let r = nodes[0]
        .admin("PUT", "routes/r", Some(route("/r", &up)))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    for n in &nodes {
        n.wait_status("/r", 200, SECOND).await;
    }

    // etcd goes away in the middle of traffic: not one request fails.
    let addrs: Vec<_> = nodes.iter().map(|n| n.data).collect();
    let traffic = tokio::spawn(load(addrs, "/r", Duration::from_secs(3)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    etcd.stop();
    let (sent, failed) = traffic.await.unwrap();
    assert!(sent > 100, "{sent}");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed while etcd was down"
    );
    eprintln!("etcd down: {sent} requests, {failed} failed");

    // Writes answer 503 in APISIX's shape; reads answer from what the node has.
    let r = nodes[0]
        .admin("PUT", "routes/w", Some(route("/w", &up)))
        .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.json()["error_msg"].is_string(), "{}", r.text());
    let r = nodes[1].admin("GET", "routes/r", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["value"]["uri"], "/r");

    // A node restarted during the outage serves its last configuration.
    nodes[2].restart();
    nodes[2].wait_status("/r", 200, SECOND).await;
    assert!(
        nodes[2].log().contains("serving the local copy"),
        "{}",
        nodes[2].log()
    );

    // etcd comes back: writes work again and every node follows, with no
    // restart.
    etcd.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = nodes[0]
            .admin("PUT", "routes/w", Some(route("/w", &up)))
            .await;
        if r.status.is_success() {
            break;
        }
        assert!(Instant::now() < deadline, "writes still fail: {}", r.text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for n in &nodes {
        n.wait_status("/w", 200, Duration::from_secs(10)).await;
    }
    // A change made straight in etcd reaches them too.
    etcd.ctl(&["del", "/apisix/routes/r"]);
    for n in &nodes {
        n.wait_status("/r", 404, SECOND).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_makes_a_lagging_node_relist() {
    if !etcd_available("compaction_makes_a_lagging_node_relist") {
        return;
    }
    let etcd = Etcd::start();
    let up = Upstream::start("compact").await;
    let a = Node::start(&etcd.endpoint(), "", "");
    let mut c = Node::start(&etcd.endpoint(), "", "");
    assert_eq!(
        a.admin("PUT", "routes/old", Some(route("/old", &up)))
            .await
            .status,
        201
    );
    c.wait_status("/old", 200, SECOND).await;

    // C is down while the configuration moves on and etcd forgets the
    // history C would need to catch up.
    c.kill();
    assert_eq!(a.admin("DELETE", "routes/old", None).await.status, 200);
    for i in 0..20 {
        let r = a
            .admin(
                "PUT",
                &format!("routes/n{i}"),
                Some(route(&format!("/new/{i}"), &up)),
            )
            .await;
        assert_eq!(r.status, 201);
    }
    etcd.compact();

    c.restart();
    c.wait_status("/new/19", 200, Duration::from_secs(5)).await;
    c.wait_status("/old", 404, SECOND).await;
    assert_eq!(c.admin("GET", "routes", None).await.json()["total"], 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_that_went_back_in_time_is_followed() {
    if !etcd_available("an_etcd_that_went_back_in_time_is_followed") {
        return;
    }
    let mut etcd = Etcd::start();
    let up = Upstream::start("rewound").await;
    let nodes: Vec<Node> = (0..2)
        .map(|_| Node::start(&etcd.endpoint(), "", ""))
        .collect();
    for i in 0..5 {
        let r = nodes[0]
            .admin(
                "PUT",
                &format!("routes/{i}"),
                Some(route(&format!("/old/{i}"), &up)),
            )
            .await;
        assert_eq!(r.status, 201);
    }
    nodes[1].wait_status("/old/4", 200, SECOND).await;
    // The same address now answers with another history, at a lower
    // revision than the nodes have seen: they load it whole.
    etcd.replace_with_empty();
    etcd.ctl(&["put", "/apisix/routes/new", &route("/new", &up).to_string()]);
    for n in &nodes {
        n.wait_status("/new", 200, Duration::from_secs(10)).await;
        n.wait_status("/old/0", 404, SECOND).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_prefix_and_apisix_encrypted_fields() {
    if !etcd_available("custom_prefix_and_apisix_encrypted_fields") {
        return;
    }
    let etcd = Etcd::start();
    let up = Upstream::start("prefixed").await;
    let node = Node::start(&etcd.endpoint(), "    prefix: /ferro-t\n", "");

    // A consumer as APISIX writes it with the default keyring: key-auth's
    // `key` encrypted ("auth-two").
    etcd.ctl(&[
        "put",
        "/ferro-t/consumers/jack",
        r#"{"username":"jack","plugins":{"key-auth":{"key":"Miw9nx9VcNLvGX0g835QIQ=="}}}"#,
    ]);
    let mut private = route("/private", &up);
    private["plugins"] = json!({"key-auth": {}});
    etcd.ctl(&["put", "/ferro-t/routes/1", &private.to_string()]);
    // Under another prefix: not this cluster's.
    etcd.ctl(&["put", "/apisix/routes/9", &route("/other", &up).to_string()]);

    node.wait_status("/private", 401, SECOND).await;
    let ok = node.get("/private", &[("apikey", "auth-two".into())]).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let wrong = node
        .get("/private", &[("apikey", "Miw9nx9VcNLvGX0g835QIQ==".into())])
        .await;
    assert_eq!(wrong.status, 401);
    assert_eq!(node.get("/other", &[]).await.status, 404);

    // Writes land under the prefix, keys shown as etcd has them, secrets
    // encrypted as APISIX would.
    let r = node
        .admin("PUT", "routes/2", Some(route("/two", &up)))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["key"], "/ferro-t/routes/2");
    assert!(etcd.value("/ferro-t/routes/2").is_some());
    assert_eq!(etcd.value("/apisix/routes/2"), None);
    let consumer = json!({"username": "rose", "plugins": {"key-auth": {"key": "bar"}}});
    let put = node.admin("PUT", "consumers", Some(consumer)).await;
    assert_eq!(put.status, 201);
    // The answer shows what was stored, as APISIX's does.
    assert_eq!(
        put.json()["value"]["plugins"]["key-auth"]["key"],
        "+kOEVUuRc5rC5ZwvvAMLwg=="
    );
    let stored: Value =
        serde_json::from_str(&etcd.value("/ferro-t/consumers/rose").unwrap()).unwrap();
    assert_eq!(
        stored["plugins"]["key-auth"]["key"],
        "+kOEVUuRc5rC5ZwvvAMLwg=="
    );
    // The Admin API reads it back decrypted, and the key works.
    let r = node.admin("GET", "consumers/rose", None).await;
    assert_eq!(r.json()["value"]["plugins"]["key-auth"]["key"], "bar");
    node.wait_status("/two", 200, SECOND).await;
    let ok = node.get("/private", &[("apikey", "bar".into())]).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apisix_shipped_config_joins_an_etcd() {
    if !etcd_available("apisix_shipped_config_joins_an_etcd") {
        return;
    }
    let etcd = Etcd::start();
    let up = Upstream::start("shipped").await;
    etcd.ctl(&["put", "/apisix/routes/1", &route("/hello", &up).to_string()]);
    // APISIX's config.yaml as shipped (config_provider: etcd), told where
    // etcd and the listeners are.
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../conf/apisix-examples/config.yaml"
    ))
    .unwrap();
    let (data, admin) = (free_port(), free_port());
    let yaml = shipped.replace(
        "  admin:\n",
        &format!("  etcd:\n    host:\n      - {}\n  admin:\n    admin_listen:\n      ip: 127.0.0.1\n      port: {admin}\n", etcd.endpoint()),
    ) + &format!("apisix:\n  node_listen: {data}\n  ssl:\n    enable: false\n");
    let node = Node::start_with_config(tempfile::tempdir().unwrap(), &yaml, data, admin);
    node.wait_status("/hello", 200, SECOND).await;
}

#[test]
fn no_etcd_and_no_local_copy_is_a_clear_start_error() {
    let (data, admin, dead) = (free_port(), free_port(), free_port());
    let yaml = format!(
        "apisix:\n  node_listen: {data}\n  ssl:\n    enable: false\n\
         deployment:\n  role_traditional:\n    config_provider: etcd\n  admin:\n    admin_key:\n      - name: admin\n        key: {KEY}\n        role: admin\n    admin_listen:\n      ip: 127.0.0.1\n      port: {admin}\n\
         \x20 etcd:\n    host: http://127.0.0.1:{dead}\n    startup_retry: 1\n    timeout: 2\n"
    );
    let err = failed_start(&yaml);
    assert!(err.contains("deployment.etcd"), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{dead}")), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_a_user() {
    if !etcd_available("etcd_over_tls_with_a_user") {
        return;
    }
    // etcd also calls itself on 127.0.0.1, so the certificate names both.
    let ck =
        rcgen::generate_simple_self_signed(vec!["etcd.test".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let mut etcd = Etcd::start_tls(&ck.cert.pem(), &ck.signing_key.serialize_pem());
    etcd.enable_auth("s3cret-pw");
    let up = Upstream::start("tls-etcd").await;
    etcd.ctl(&[
        "put",
        "/apisix/routes/1",
        &route("/secure", &up).to_string(),
    ]);
    // The certificate names etcd.test, not 127.0.0.1: `sni` says which
    // name to verify; the CA comes from ssl_trusted_certificate.
    let extra = "    user: root\n    password: s3cret-pw\n    tls:\n      sni: etcd.test\n";
    let trust = format!(
        "    ssl_trusted_certificate: {}\n",
        etcd.ca_path().display()
    );
    let node = Node::start(&etcd.endpoint(), extra, &trust);
    node.wait_status("/secure", 200, SECOND).await;
    let r = node
        .admin("PUT", "routes/2", Some(route("/written", &up)))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(etcd.value("/apisix/routes/2").is_some());

    // A wrong password: no configuration, and the error says why.
    let bad = extra.replace("s3cret-pw", "wrong");
    let (data, admin) = (free_port(), free_port());
    let yaml = format!(
        "apisix:\n  node_listen: {data}\n  ssl:\n    enable: false\n{trust}deployment:\n  role_traditional:\n    config_provider: etcd\n  admin:\n    admin_key:\n      - name: admin\n        key: {KEY}\n        role: admin\n    admin_listen:\n      ip: 127.0.0.1\n      port: {admin}\n  etcd:\n    host: [{}]\n    startup_retry: 1\n{bad}",
        etcd.endpoint()
    );
    let err = failed_start(&yaml);
    assert!(err.contains("authentication failed"), "{err}");
}
