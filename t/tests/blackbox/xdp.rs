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

/// A TCP connection attempt from `src` to [`dst`]:`port` inside `ns` whose
/// packets carry an IPv6 Destination Options header (8 bytes of padding)
/// before TCP: `connected`, `timeout` or the error.
fn connect_with_dest_options(ns: &str, src: &str, dst: &str, port: u16) -> String {
    python(
        ns,
        &format!(
            "import socket\n\
             s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n\
             s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))\n\
             s.bind(('{src}', 0)); s.settimeout(1.5)\n\
             try:\n\
             \x20   s.connect(('{dst}', {port})); print('connected')\n\
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

/// Client and gateway namespaces joined by a veth pair (`c0` with
/// 192.0.2.1, .66, 2001:db8:1::1, ::66; `g0` with 192.0.2.2, 2001:db8:1::2),
/// an upstream on the gateway's 127.0.0.1:8080, another service on
/// 192.0.2.2:8000, and the gateway's config (data on port 15080, Admin API
/// on 15180, metrics on 15091; XDP on g0 when `xdp`).
struct Setup {
    env: Netns,
    c: String,
    g: String,
    dir: tempfile::TempDir,
}

const DATA: u16 = 15080;
const ADMIN: u16 = 15180;
const EXPORT: u16 = 15091;

fn setup(label: &str, xdp: bool) -> Setup {
    let tag = std::process::id();
    let (c, g) = (format!("fx{label}c{tag}"), format!("fx{label}g{tag}"));
    let mut env = Netns::create(vec![c.clone(), g.clone()]);
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

    let (data, admin, export) = (DATA, ADMIN, EXPORT);
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
             \x20 ip-restriction:\n    xdp:\n      enable: {xdp}\n      interfaces: [g0]\n"
        ),
    )
    .unwrap();
    Setup { env, c, g, dir }
}

#[test]
fn global_blacklist_is_enforced_in_the_kernel() {
    if let Some(why) = unsupported() {
        eprintln!("SKIPPED global_blacklist_is_enforced_in_the_kernel: {why}");
        return;
    }
    let Setup {
        env: _env,
        c,
        g,
        dir,
    } = setup("t", true);
    let (data, admin, export) = (DATA, ADMIN, EXPORT);
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
    // An extension header before TCP does not carry the source past it.
    assert_eq!(
        connect_with_dest_options(&c, "2001:db8:1::66", "2001:db8:1::2", data),
        "timeout"
    );
    assert_eq!(
        connect_with_dest_options(&c, "2001:db8:1::1", "2001:db8:1::2", data),
        "connected"
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

/// Process CPU time (user + system) of `pid`, in milliseconds.
fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on Linux.
    ticks * 10
}

/// A flood of connection attempts from 192.0.2.66 to the data plane, at
/// `rate` per second for `secs`, each asking for `/hello` once connected and
/// given up after 0.3 s: the same attempts whether or not anything answers.
/// Prints `attempts answered`.
const FLOOD: &str = r#"
import socket, select, time, sys
rate, secs, port = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
req = b'GET /hello HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n'
ep = select.epoll(); pending = {}; made = answered = 0
start = time.time(); end = start + secs
def close(fd):
    s = pending.pop(fd)[0]
    ep.unregister(fd); s.close()
while time.time() < end:
    now = time.time()
    while made < (now - start) * rate:
        s = socket.socket(); s.setblocking(False); s.bind(('192.0.2.66', 0))
        s.connect_ex(('192.0.2.2', port))
        ep.register(s.fileno(), select.EPOLLOUT)
        pending[s.fileno()] = [s, now, False]; made += 1
    for fd, ev in ep.poll(0.005):
        entry = pending.get(fd)
        if entry is None: continue
        s, t, sent = entry
        if ev & (select.EPOLLERR | select.EPOLLHUP) and not ev & select.EPOLLIN:
            close(fd); continue
        if not sent:
            try: s.send(req)
            except OSError: close(fd); continue
            entry[2] = True; ep.modify(fd, select.EPOLLIN); continue
        try: data = s.recv(65536)
        except OSError: data = b''
        if data.startswith(b'HTTP/1.1 '): answered += 1
        close(fd)
    for fd in [fd for fd, e in pending.items() if now - e[1] > 0.3]:
        close(fd)
print(made, answered)
"#;

/// What a flood of connection attempts from a denied source costs the
/// gateway process, with the deny list in the kernel and in user space
/// only. Prints the figures; run with
/// `cargo test --profile tests -p ferrogate-tests --test blackbox xdp_flood -- --ignored --nocapture`
/// (root).
#[test]
#[ignore = "benchmark: prints figures, asserts nothing about speed"]
fn xdp_flood_cost() {
    if let Some(why) = unsupported() {
        eprintln!("SKIPPED xdp_flood_cost: {why}");
        return;
    }
    let (rate, secs) = (5000, 4);
    for xdp in [true, false] {
        let Setup {
            env: _env,
            c,
            g,
            dir,
        } = setup(if xdp { "k" } else { "u" }, xdp);
        let mut gateway = start_gateway(&g, dir.path(), None);
        let rule = r#"{"plugins": {"ip-restriction": {"blacklist": ["192.0.2.66"]}}}"#;
        wait_for("Admin API up", || {
            let got = admin_put(&g, ADMIN, "global_rules/1", rule);
            got.starts_with("20").then_some(got)
        });
        let route = r#"{"uri": "/hello", "upstream": {"nodes": {"127.0.0.1:8080": 1}}}"#;
        assert!(admin_put(&g, ADMIN, "routes/1", route).starts_with("20"));
        let before = cpu_ms(gateway.id());
        let out = Command::new("ip")
            .args(["netns", "exec", &c, "python3", "-c", FLOOD])
            .args([rate.to_string(), secs.to_string(), DATA.to_string()])
            .output()
            .unwrap();
        let spent = cpu_ms(gateway.id()) - before;
        let flood = String::from_utf8_lossy(&out.stdout);
        let mut counts = flood
            .split_whitespace()
            .map(|n| n.parse::<u64>().unwrap_or(0));
        let (made, answered) = (counts.next().unwrap_or(0), counts.next().unwrap_or(0));
        std::thread::sleep(Duration::from_millis(1200));
        let metrics = python(
            &g,
            &format!("import urllib.request\nprint(urllib.request.urlopen('http://127.0.0.1:{EXPORT}/apisix/prometheus/metrics', timeout=5).read().decode())"),
        );
        let drops: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("apisix_xdp_dropped_packets_total"))
            .collect();
        println!(
            "deny list {}: {made} attempts in {secs} s, {answered} answered (403); gateway CPU {spent} ms ({:.1} µs per attempt); {}",
            if xdp { "in the kernel (XDP)" } else { "in user space" },
            spent as f64 * 1000.0 / made.max(1) as f64,
            drops.join(", ")
        );
        stop(&mut gateway);
    }
}
