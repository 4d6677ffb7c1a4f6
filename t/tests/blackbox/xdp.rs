#![allow(clippy::unwrap_used)]
//! The in-kernel deny list, end to end, as root: a client namespace with an
//! allowed and a denied address (IPv4 and IPv6) talks to the real binary in
//! a gateway namespace whose global rule denies one of them, with XDP
//! attached to the gateway's interface. The denied source's connection
//! attempts time out (dropped before the handshake) while the allowed one is
//! served; another port of the same host still answers the denied source;
//! an Admin API change lets it in without a restart; the drop counters
//! rise; the program is gone from the interface once the gateway stops.
//! Then the same gateway without the rights (as `nobody`): it logs that the
//! in-kernel list is off and user space denies the source with 403.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{ns, python, run, server, unsupported, Netns};

const KEY: &str = "xdp-test-admin-key-0123456789";

/// GET `path` from `src` to `host`:`port` inside `ns`: `STATUS BODY`,
/// `timeout` when nothing answers within `secs`, or the error.
fn get_from(ns: &str, src: &str, host: &str, port: u16, path: &str, secs: f64) -> String {
    python(
        ns,
        &format!(
            "import http.client\n\
             try:\n\
             \x20   c = http.client.HTTPConnection('{host}', {port}, timeout={secs}, source_address=('{src}', 0))\n\
             \x20   c.request('GET', '{path}'); r = c.getresponse(); print(r.status, r.read().decode())\n\
             except TimeoutError:\n\
             \x20   print('timeout')\n\
             except Exception as e:\n\
             \x20   print('error', e)\n"
        ),
    )
}

/// An Admin API PUT inside `ns`: `STATUS`.
fn admin_put(ns: &str, admin: u16, path: &str, body: &str) -> String {
    python(
        ns,
        &format!(
            "import urllib.request, urllib.error\n\
             req = urllib.request.Request('http://127.0.0.1:{admin}/apisix/admin/{path}', data={body:?}.encode(), method='PUT', headers={{'X-API-KEY': '{KEY}'}})\n\
             try:\n\
             \x20   print(urllib.request.urlopen(req, timeout=5).status)\n\
             except urllib.error.HTTPError as e:\n\
             \x20   print(e.code, e.read().decode())\n\
             except Exception as e:\n\
             \x20   print('error', e)\n"
        ),
    )
}

fn wait_for(what: &str, mut probe: impl FnMut() -> Option<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(done) = probe() {
            return done;
        }
        assert!(Instant::now() < deadline, "{what}: not within 15 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn xdp_attached(g: &str) -> bool {
    let out = Command::new("ip")
        .args(["-n", g, "link", "show", "g0"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("xdp")
}

/// Starts the gateway in `g` (as `user` when given), its log in `log`.
fn start_gateway(g: &str, dir: &std::path::Path, user: Option<&str>) -> Child {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", g]);
    if let Some(uid) = user {
        cmd.args(["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups"]);
    }
    cmd.arg(harness::cluster::binary())
        .arg("--config")
        .arg(dir.join("conf/config.yaml"))
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("gateway.log")).unwrap())
        .spawn()
        .unwrap()
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn global_blacklist_is_enforced_in_the_kernel() {
    if let Some(why) = unsupported() {
        eprintln!("SKIPPED global_blacklist_is_enforced_in_the_kernel: {why}");
        return;
    }
    let tag = std::process::id();
    let (c, g) = (format!("fxc{tag}"), format!("fxg{tag}"));
    let mut env = Netns {
        names: vec![c.clone(), g.clone()],
        children: Vec::new(),
    };
    for n in &env.names {
        run(&["ip", "netns", "add", n]);
        ns(n, &["ip", "link", "set", "lo", "up"]);
    }
    run(&[
        "ip", "link", "add", "c0", "netns", &c, "type", "veth", "peer", "name", "g0", "netns", &g,
    ]);
    for (n, dev, addrs) in [
        (
            &c,
            "c0",
            &[
                "192.0.2.1/24",
                "192.0.2.66/24",
                "2001:db8:1::1/64",
                "2001:db8:1::66/64",
            ][..],
        ),
        (&g, "g0", &["192.0.2.2/24", "2001:db8:1::2/64"][..]),
    ] {
        for a in addrs {
            if a.contains(':') {
                ns(n, &["ip", "-6", "addr", "add", a, "dev", dev, "nodad"]);
            } else {
                ns(n, &["ip", "addr", "add", a, "dev", dev]);
            }
        }
        ns(n, &["ip", "link", "set", dev, "up"]);
    }
    env.children.push(server(&g, "127.0.0.1", 8080));
    // Another service of the gateway's host, on a port XDP does not guard.
    env.children.push(server(&g, "192.0.2.2", 8000));

    let (data, admin, export) = (15080, 15180, 15091);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("conf")).unwrap();
    std::fs::write(
        dir.path().join("conf/config.yaml"),
        format!(
            "apisix:\n  node_listen:\n    - {{ip: \"::\", port: {data}}}\n  ssl:\n    enable: false\n\
             deployment:\n  role: traditional\n  admin:\n    admin_key:\n      - {{name: admin, key: {KEY}, role: admin}}\n\
             \x20   admin_listen: {{ip: 127.0.0.1, port: {admin}}}\n\
             nginx_config:\n  http:\n    enable_access_log: false\n\
             plugin_attr:\n  prometheus:\n    refresh_interval: 1\n    export_addr: {{ip: 127.0.0.1, port: {export}}}\n\
             \x20 ip-restriction:\n    xdp:\n      enable: true\n      interfaces: [g0]\n"
        ),
    )
    .unwrap();
    let mut gateway = start_gateway(&g, dir.path(), None);
    let rule =
        r#"{"plugins": {"ip-restriction": {"blacklist": ["192.0.2.66", "2001:db8:1::66/128"]}}}"#;
    wait_for("Admin API up", || {
        let got = admin_put(&g, admin, "global_rules/1", rule);
        got.starts_with("20").then_some(got)
    });
    let route = r#"{"uri": "/hello", "upstream": {"nodes": {"127.0.0.1:8080": 1}}}"#;
    assert!(admin_put(&g, admin, "routes/1", route).starts_with("20"));
    assert!(xdp_attached(&g), "program attached to g0");

    let allowed = wait_for("allowed client served", || {
        let got = get_from(&c, "192.0.2.1", "192.0.2.2", data, "/hello", 2.0);
        got.starts_with("200").then_some(got)
    });
    assert_eq!(allowed, "200 server saw /hello from 127.0.0.1");
    assert!(get_from(&c, "2001:db8:1::1", "2001:db8:1::2", data, "/hello", 2.0).starts_with("200"));
    // Dropped before the handshake: no 403, no reset, nothing at all.
    assert_eq!(
        get_from(&c, "192.0.2.66", "192.0.2.2", data, "/hello", 1.5),
        "timeout"
    );
    assert_eq!(
        get_from(&c, "2001:db8:1::66", "2001:db8:1::2", data, "/hello", 1.5),
        "timeout"
    );
    // The rest of the host is not cut off.
    assert_eq!(
        get_from(&c, "192.0.2.66", "192.0.2.2", 8000, "/other", 2.0),
        "200 server saw /other from 192.0.2.66"
    );
    // Drop counters, per family, in the metrics.
    let count = |metrics: &str, family: &str| -> u64 {
        let prefix = format!("apisix_xdp_dropped_packets_total{{family=\"{family}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    // The exposition is rebuilt every refresh_interval (1 s here).
    wait_for("drop counters in the metrics", || {
        let metrics = python(
            &g,
            &format!("import urllib.request\nprint(urllib.request.urlopen('http://127.0.0.1:{export}/apisix/prometheus/metrics', timeout=5).read().decode())"),
        );
        (count(&metrics, "ipv4") >= 1 && count(&metrics, "ipv6") >= 1).then_some(metrics)
    });

    // An Admin API change lets the source in, without a restart.
    let other = r#"{"plugins": {"ip-restriction": {"blacklist": ["192.0.2.99"]}}}"#;
    assert!(admin_put(&g, admin, "global_rules/1", other).starts_with("20"));
    let let_in = wait_for("denied source let in", || {
        let got = get_from(&c, "192.0.2.66", "192.0.2.2", data, "/hello", 1.0);
        got.starts_with("200").then_some(got)
    });
    assert_eq!(let_in, "200 server saw /hello from 127.0.0.1");
    // And denied again: by user space at once, then by the kernel.
    assert!(admin_put(&g, admin, "global_rules/1", rule).starts_with("20"));
    wait_for("denied again in the kernel", || {
        let got = get_from(&c, "192.0.2.66", "192.0.2.2", data, "/hello", 1.0);
        (got == "timeout").then_some(got)
    });

    // Stopped: the program is detached and its counts are in the log.
    stop(&mut gateway);
    assert!(
        !xdp_attached(&g),
        "program detached after the gateway stopped"
    );
    let log = std::fs::read_to_string(dir.path().join("gateway.log")).unwrap();
    assert!(log.contains("in-kernel deny list (XDP) attached"), "{log}");
    assert!(log.contains("in-kernel deny list detached"), "{log}");

    // Without the rights: the list stays in user space, enforced the same.
    let has_setpriv = Command::new("sh")
        .args(["-c", "command -v setpriv"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_setpriv {
        eprintln!("SKIPPED the fallback half: needs `setpriv`");
        return;
    }
    run(&["chmod", "-R", "a+rwX", &dir.path().display().to_string()]);
    let mut fallback = start_gateway(&g, dir.path(), Some("65534"));
    let denied = wait_for("user-space denial", || {
        let got = get_from(&c, "192.0.2.66", "192.0.2.2", data, "/hello", 1.0);
        got.starts_with("403").then_some(got)
    });
    assert!(
        denied.contains("Your IP address is not allowed"),
        "{denied}"
    );
    assert!(get_from(&c, "192.0.2.1", "192.0.2.2", data, "/hello", 2.0).starts_with("200"));
    assert!(!xdp_attached(&g));
    stop(&mut fallback);
    let log = std::fs::read_to_string(dir.path().join("gateway.log")).unwrap();
    assert!(
        log.contains(
            "in-kernel deny list (XDP) is off; ip-restriction keeps enforcing it in user space"
        ),
        "{log}"
    );
}
