#![allow(clippy::unwrap_used)]
//! Transparent proxying, end to end, as root: a client namespace connects
//! to addresses the gateway does not own (203.0.113.10:80 and
//! [2001:db8:99::10]:80); the gateway namespace diverts those connections
//! with the nftables and policy-routing commands `ferrogate tproxy-setup`
//! prints to the real binary's transparent listener, whose routes match
//! on `$server_addr`/`$server_port` and proxy to a server namespace.
//! Namespaces get unique names and are removed afterwards; processes are
//! ended by their PID. Skipped, saying why, when not root or without `ip`
//! and `nft`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{fetch, ns, run, server, unsupported, Netns};

#[test]
fn transparent_listener_serves_diverted_connections() {
    if let Some(why) = unsupported() {
        eprintln!("SKIPPED transparent_listener_serves_diverted_connections: {why}");
        return;
    }
    let tag = std::process::id();
    let (c, g, s) = (
        format!("fgc{tag}"),
        format!("fgg{tag}"),
        format!("fgs{tag}"),
    );
    let mut env = Netns::create(vec![c.clone(), g.clone(), s.clone()]);
    // client c0 <-> g0 gateway g1 <-> s0 server
    run(&[
        "ip", "link", "add", "c0", "netns", &c, "type", "veth", "peer", "name", "g0", "netns", &g,
    ]);
    run(&[
        "ip", "link", "add", "g1", "netns", &g, "type", "veth", "peer", "name", "s0", "netns", &s,
    ]);
    for (n, dev, v4, v6) in [
        (&c, "c0", "192.0.2.1/24", "2001:db8:1::1/64"),
        (&g, "g0", "192.0.2.2/24", "2001:db8:1::2/64"),
        (&g, "g1", "198.51.100.2/24", "2001:db8:2::2/64"),
        (&s, "s0", "198.51.100.1/24", "2001:db8:2::1/64"),
    ] {
        ns(n, &["ip", "addr", "add", v4, "dev", dev]);
        ns(n, &["ip", "-6", "addr", "add", v6, "dev", dev, "nodad"]);
        ns(n, &["ip", "link", "set", dev, "up"]);
    }
    ns(&c, &["ip", "route", "add", "default", "via", "192.0.2.2"]);
    ns(
        &c,
        &[
            "ip",
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8:1::2",
        ],
    );
    // The server answers clients' addresses through the gateway (the
    // return path of `tproxy.source: client`).
    ns(
        &s,
        &["ip", "route", "add", "default", "via", "198.51.100.2"],
    );
    ns(
        &s,
        &[
            "ip",
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8:2::2",
        ],
    );
    // What tproxy-setup prints, run in the gateway's namespace.
    let (port, plain) = (15001, 15002);
    let printed = Command::new(harness::cluster::binary())
        .args([
            "tproxy-setup",
            "--port",
            &port.to_string(),
            "--interface",
            "g0",
        ])
        .output()
        .unwrap();
    assert!(printed.status.success());
    for line in String::from_utf8_lossy(&printed.stdout).lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        run(&["ip", "netns", "exec", &g, "sh", "-c", line]);
    }
    env.children.push(server(&s, "198.51.100.1", 8080));
    env.children.push(server(&s, "2001:db8:2::1", 8080));
    // The gateway: standalone routes matching the original destination.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("conf")).unwrap();
    std::fs::write(
        dir.path().join("conf/config.yaml"),
        format!(
            "apisix:\n  node_listen:\n    - {{ip: \"::\", port: {port}, transparent: true}}\n    - {{ip: 127.0.0.1, port: {plain}}}\n  ssl:\n    enable: false\n\
             deployment:\n  role: data_plane\n  role_data_plane:\n    config_provider: yaml\n\
             nginx_config:\n  http:\n    enable_access_log: false\n\
             plugin_attr:\n  prometheus:\n    enable_export_server: false\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("conf/apisix.yaml"),
        "routes:\n\
         \x20 - id: v4\n    uri: /hello\n    vars: [[\"server_addr\", \"==\", \"203.0.113.10\"], [\"server_port\", \"==\", \"80\"]]\n\
         \x20   upstream: {type: roundrobin, nodes: {\"198.51.100.1:8080\": 1}}\n\
         \x20 - id: v6\n    uri: /hello\n    vars: [[\"server_addr\", \"==\", \"2001:db8:99::10\"]]\n\
         \x20   upstream: {type: roundrobin, nodes: {\"[2001:db8:2::1]:8080\": 1}}\n\
         \x20 - id: original\n    uri: /original\n    upstream: {discovery_type: original_dst}\n\
         \x20 - id: as-client\n    uri: /as-client\n\
         \x20   upstream: {nodes: {\"198.51.100.1:8080\": 1}, tproxy: {source: client}}\n\
         \x20 - id: invisible\n    uri: /invisible\n\
         \x20   upstream: {discovery_type: original_dst, tproxy: {source: client}}\n\
         #END\n",
    )
    .unwrap();
    let gateway = Command::new("ip")
        .args(["netns", "exec", &g])
        .arg(harness::cluster::binary())
        .arg("--config")
        .arg(dir.path().join("conf/config.yaml"))
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("gateway.log")).unwrap())
        .spawn()
        .unwrap();
    env.children.push(gateway);

    // Both families reach the server through the gateway, by the address
    // the client dialled; another original destination matches no route.
    let deadline = Instant::now() + Duration::from_secs(15);
    let v4 = loop {
        let got = fetch(&c, "http://203.0.113.10/hello?a=1");
        if got.starts_with("200") || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(v4, "200 server saw /hello?a=1 from 198.51.100.2");
    assert_eq!(
        fetch(&c, "http://[2001:db8:99::10]/hello"),
        "200 server saw /hello from 2001:db8:2::2"
    );
    let other = fetch(&c, "http://203.0.113.77/hello");
    assert!(other.starts_with("404"), "{other}");

    // original_dst: the request goes where the client was connecting to.
    assert_eq!(
        fetch(&c, "http://198.51.100.1:8080/original"),
        "200 server saw /original from 198.51.100.2"
    );
    assert_eq!(
        fetch(&c, "http://[2001:db8:2::1]:8080/original"),
        "200 server saw /original from 2001:db8:2::2"
    );
    // A destination with nothing listening: the gateway's own 502.
    let closed = fetch(&c, "http://198.51.100.1:8081/original");
    assert!(closed.starts_with("502"), "{closed}");
    // On a plain listener the destination is the gateway itself: refused
    // rather than looped.
    let looped = fetch(&g, &format!("http://127.0.0.1:{plain}/original"));
    assert!(looped.starts_with("502"), "{looped}");

    // tproxy.source: client: the server sees the client's own address,
    // also through a fully invisible hop (original_dst + client source).
    assert_eq!(
        fetch(&c, "http://203.0.113.10/as-client"),
        "200 server saw /as-client from 192.0.2.1"
    );
    assert_eq!(
        fetch(&c, "http://[2001:db8:2::1]:8080/invisible"),
        "200 server saw /invisible from 2001:db8:1::1"
    );
    assert_eq!(
        fetch(&c, "http://198.51.100.1:8080/invisible?twice"),
        "200 server saw /invisible?twice from 192.0.2.1"
    );
}

#[test]
fn without_the_capability_the_start_fails_naming_it() {
    if let Some(why) = unsupported() {
        eprintln!("SKIPPED without_the_capability_the_start_fails_naming_it: {why}");
        return;
    }
    let has_setpriv = Command::new("sh")
        .args(["-c", "command -v setpriv"])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !has_setpriv {
        eprintln!("SKIPPED without_the_capability_the_start_fails_naming_it: needs `setpriv`");
        return;
    }
    // Run as `nobody`: no capabilities at all.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("conf")).unwrap();
    std::fs::write(
        dir.path().join("conf/config.yaml"),
        "apisix:\n  node_listen:\n    - {ip: 127.0.0.1, port: 0, transparent: true}\n  ssl:\n    enable: false\n\
         deployment:\n  role: data_plane\n  role_data_plane:\n    config_provider: yaml\n\
         nginx_config:\n  http:\n    enable_access_log: false\n\
         plugin_attr:\n  prometheus:\n    enable_export_server: false\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("conf/apisix.yaml"), "routes: []\n#END\n").unwrap();
    run(&["chmod", "-R", "a+rwX", &dir.path().display().to_string()]);
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(harness::cluster::binary())
        .arg("--config")
        .arg(dir.path().join("conf/config.yaml"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("127.0.0.1:0"), "{text}");
    assert!(text.contains("data plane"), "{text}");
    assert!(text.contains("CAP_NET_ADMIN"), "{text}");
}
