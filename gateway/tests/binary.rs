//! The real `ferrogate` binary, started as an operator would: APISIX's own
//! config files, key generation, restarts, `kill -9`, bad config, SIGTERM.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ferrogate");
const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/apisix-examples");

// Ports below the ephemeral range, each handed out once per process: a port
// taken by binding port 0 and released could go to another test's gateway
// (tests run in parallel) before this one binds it.
#[path = "../../t/src/ports.rs"]
mod ports;
use ports::free_port;

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
fn http(
    port: u16,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let key = key
        .map(|k| format!("X-API-KEY: {k}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{key}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.get(9..12)?.parse().ok()?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// A tiny upstream answering `200 hello` to everything.
fn upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
                );
            });
        }
    });
    addr
}

struct Proc {
    child: Child,
    dir: PathBuf,
}

impl Proc {
    fn start(dir: &Path) -> Proc {
        let child = Command::new(BIN)
            .arg("--config")
            .arg(dir.join("conf/config.yaml"))
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("gateway.log")).unwrap())
            .spawn()
            .unwrap();
        Proc {
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gateway.log")).unwrap_or_default()
    }

    fn wait_ready(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("gateway exited with {status}: {}", self.log());
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("gateway did not come up: {}", self.log());
    }

    fn signal(&self, sig: &str) {
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Admin API's route list, as text.
fn route_list(admin: u16) -> String {
    http(
        admin,
        "GET",
        "/apisix/admin/routes",
        Some("k3y-k3y-k3y"),
        "",
    )
    .unwrap()
    .1
}

/// Creates route `id` for `uri` to the one node `node` (201 expected).
fn put_route(admin: u16, id: &str, uri: &str, node: &str) {
    let body = format!("{{\"uri\":\"{uri}\",\"upstream\":{{\"nodes\":{{\"{node}\":1}}}}}}");
    let path = format!("/apisix/admin/routes/{id}");
    assert_eq!(
        http(admin, "PUT", &path, Some("k3y-k3y-k3y"), &body)
            .unwrap()
            .0,
        201
    );
}

fn write_config(dir: &Path, text: &str) {
    std::fs::create_dir_all(dir.join("conf")).unwrap();
    std::fs::write(dir.join("conf/config.yaml"), text).unwrap();
}

#[test]
fn apisix_shipped_config_generates_a_private_key() {
    let dir = tempfile::tempdir().unwrap();
    let (data, admin) = (free_port(), free_port());
    // APISIX's file as shipped, plus where to listen (the defaults 9080/9180
    // may be taken on a test machine), on this node's own store: the shared
    // etcd store is exercised with a real etcd in t/ (etcd tests).
    let shipped = std::fs::read_to_string(Path::new(EXAMPLES).join("config.yaml")).unwrap();
    let text = shipped
        .replace("config_provider: etcd", "config_provider: embedded")
        .replace(
            "  admin:\n",
            &format!("  admin:\n    admin_listen:\n      ip: 127.0.0.1\n      port: {admin}\n"),
        )
        + &format!("apisix:\n  node_listen: {data}\n");
    write_config(dir.path(), &text);
    let mut p = Proc::start(dir.path());
    p.wait_ready(admin);
    let key_path = dir.path().join("data/admin_key");
    let key = std::fs::read_to_string(&key_path)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(key.len(), 32);
    assert_eq!(
        std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        p.log().contains("data/admin_key"),
        "the log says where the key is"
    );
    assert!(!p.log().contains(&key), "the key itself is never logged");
    assert_eq!(
        http(admin, "GET", "/apisix/admin/routes", None, "")
            .unwrap()
            .0,
        401
    );
    assert_eq!(
        http(admin, "GET", "/apisix/admin/routes", Some(&key), "")
            .unwrap()
            .0,
        200
    );
    assert_eq!(http(data, "GET", "/x", None, "").unwrap().0, 404);
}

#[test]
fn apisix_example_config_with_every_key_starts() {
    let dir = tempfile::tempdir().unwrap();
    let (data, admin, tls, metrics) = (free_port(), free_port(), free_port(), free_port());
    let example = std::fs::read_to_string(Path::new(EXAMPLES).join("config.yaml.example")).unwrap();
    let text = example
        .replacen("config_provider: etcd", "config_provider: embedded", 1)
        .replacen("    - 9080", &format!("    - {data}"), 1)
        .replacen(
            "      - port: 9443",
            &format!("      - ip: 127.0.0.1\n        port: {tls}"),
            1,
        )
        .replacen(
            "      ip: 0.0.0.0                 # Set listening IP.",
            "      ip: 127.0.0.1",
            1,
        )
        .replacen("      port: 9180 ", &format!("      port: {admin} "), 1)
        .replacen("      port: 9091 ", &format!("      port: {metrics} "), 1)
        // The unused keys are listed at info level.
        .replacen("error_log_level:  warn", "error_log_level: info", 1);
    write_config(dir.path(), &text);
    let mut p = Proc::start(dir.path());
    p.wait_ready(admin);
    assert_eq!(http(data, "GET", "/x", None, "").unwrap().0, 404);
    assert!(
        TcpStream::connect(("127.0.0.1", tls)).is_ok(),
        "HTTPS listens"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", metrics)).is_ok(),
        "the Prometheus export server listens"
    );
    // The example sends the gateway's log to logs/error.log.
    let error_log = std::fs::read_to_string(dir.path().join("logs/error.log")).unwrap_or_default();
    assert!(
        error_log.contains("not used by this ferrogate version"),
        "unused keys are listed once: {error_log}"
    );
    // And every request to logs/access.log, within a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(dir.path().join("logs/access.log"))
        .unwrap_or_default()
        .contains("\"GET /x HTTP/1.1\" 404")
    {
        assert!(Instant::now() < deadline, "no access log line");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A prefix holding [`basic_config`] on two free ports.
fn basic_gateway_dir() -> (tempfile::TempDir, u16, u16) {
    let dir = tempfile::tempdir().unwrap();
    let (data, admin) = (free_port(), free_port());
    write_config(dir.path(), &basic_config(data, admin));
    (dir, data, admin)
}

/// Waits (bounded) for the process to exit and checks it exited 0.
fn assert_clean_exit(p: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}: {}", p.log());
            return;
        }
        assert!(Instant::now() < deadline, "did not exit: {}", p.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn basic_config(data: u16, admin: u16) -> String {
    format!(
        "apisix:\n  node_listen: {data}\ndeployment:\n  admin:\n    admin_key:\n      - name: admin\n        key: k3y-k3y-k3y\n        role: admin\n    admin_listen:\n      ip: 127.0.0.1\n      port: {admin}\n"
    )
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let (dir, data, admin) = basic_gateway_dir();
    let up = upstream();
    let mut p = Proc::start(dir.path());
    p.wait_ready(admin);
    for i in 0..20 {
        let body = format!("{{\"uri\":\"/r{i}\",\"upstream\":{{\"nodes\":{{\"{up}\":1}}}}}}");
        let (st, _) = http(
            admin,
            "PUT",
            &format!("/apisix/admin/routes/{i}"),
            Some("k3y-k3y-k3y"),
            &body,
        )
        .unwrap();
        assert_eq!(st, 201);
    }
    p.signal("KILL");
    let _ = p.child.wait();
    drop(p);
    let mut p = Proc::start(dir.path());
    p.wait_ready(admin);
    // The killed process never closed its database: the writes came back
    // from the journal, not from the database file.
    let log = p.log();
    assert!(
        log.contains("journaled writes applied") && log.contains("writes=20"),
        "{log}"
    );
    for i in 0..20 {
        assert_eq!(
            http(data, "GET", &format!("/r{i}"), None, "").unwrap(),
            (200, "hello".to_string())
        );
    }
    let list = route_list(admin);
    assert!(list.contains("\"total\":20"), "{list}");
    // A clean stop writes what waits for a checkpoint to the database file:
    // the next start has nothing to apply from the journal.
    let body = format!("{{\"uri\":\"/r20\",\"upstream\":{{\"nodes\":{{\"{up}\":1}}}}}}");
    let (st, _) = http(
        admin,
        "PUT",
        "/apisix/admin/routes/20",
        Some("k3y-k3y-k3y"),
        &body,
    )
    .unwrap();
    assert_eq!(st, 201);
    p.signal("TERM");
    assert_clean_exit(&mut p);
    drop(p);
    let mut p = Proc::start(dir.path());
    p.wait_ready(admin);
    let log = p.log();
    assert!(!log.contains("journaled writes applied"), "{log}");
    assert!(route_list(admin).contains("\"total\":21"));
}

#[test]
fn sigterm_exits_cleanly() {
    let (dir, _data, admin) = basic_gateway_dir();
    let mut p = Proc::start(dir.path());
    p.wait_ready(admin);
    p.signal("TERM");
    assert_clean_exit(&mut p);
}

#[test]
fn bad_config_is_a_clear_error() {
    for (text, key) in [
        ("apisix:\n  node_listen: nope\n", "apisix.node_listen"),
        (
            "deployment:\n  admin:\n    admin_key:\n      - name: admin\n        key: edd1c9f034335f136f87ad84b625c8f1\n        role: admin\n",
            "public default key",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_config(dir.path(), text);
        let out = Command::new(BIN)
            .arg("--config")
            .arg(dir.path().join("conf/config.yaml"))
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "stderr should mention {key}: {err}");
    }
}

#[test]
fn standalone_yaml_mode_serves_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let data = free_port();
    let up = upstream();
    write_config(
        dir.path(),
        &format!("apisix:\n  node_listen: {data}\ndeployment:\n  role: data_plane\n  role_data_plane:\n    config_provider: yaml\n"),
    );
    let rules = |uri: &str| {
        format!("routes:\n  -\n    uri: {uri}\n    upstream:\n      nodes:\n        \"{up}\": 1\n      type: roundrobin\n#END\n")
    };
    std::fs::write(dir.path().join("conf/apisix.yaml"), rules("/hello")).unwrap();
    let mut p = Proc::start(dir.path());
    p.wait_ready(data);
    assert_eq!(
        http(data, "GET", "/hello", None, "").unwrap(),
        (200, "hello".to_string())
    );
    std::fs::write(dir.path().join("conf/apisix.yaml"), rules("/bye")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while http(data, "GET", "/bye", None, "").unwrap().0 != 200 {
        assert!(Instant::now() < deadline, "file change not picked up");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(http(data, "GET", "/hello", None, "").unwrap().0, 404);
}

#[test]
fn sigterm_lets_requests_in_flight_finish() {
    let (dir, data, admin) = basic_gateway_dir();
    // An upstream that takes a second to answer.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let up = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                std::thread::sleep(Duration::from_millis(1000));
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow");
            });
        }
    });
    let mut p = Proc::start(dir.path());
    p.wait_ready(admin);
    let body = format!("{{\"uri\":\"/slow\",\"upstream\":{{\"nodes\":{{\"{up}\":1}}}}}}");
    assert_eq!(
        http(
            admin,
            "PUT",
            "/apisix/admin/routes/s",
            Some("k3y-k3y-k3y"),
            &body
        )
        .unwrap()
        .0,
        201
    );
    let client = std::thread::spawn(move || http(data, "GET", "/slow", None, ""));
    std::thread::sleep(Duration::from_millis(300));
    p.signal("TERM");
    assert_eq!(
        client.join().unwrap(),
        Some((200, "slow".to_string())),
        "in-flight request finished"
    );
    assert_clean_exit(&mut p);
    // New connections are refused once shutting down.
    assert!(TcpStream::connect(("127.0.0.1", data)).is_err());
}

#[test]
fn sighup_reloads_admin_keys_and_limits() {
    let (dir, data, admin) = basic_gateway_dir();
    let up = upstream();
    let mut p = Proc::start(dir.path());
    p.wait_ready(admin);
    put_route(admin, "r", "/r", &up.to_string());
    assert_eq!(
        http(data, "POST", "/r", None, &"x".repeat(2000)).unwrap().0,
        200
    );
    let reloaded = basic_config(data, admin).replace("k3y-k3y-k3y", "n3w-k3y")
        + "nginx_config:\n  http:\n    client_max_body_size: 1k\n";
    write_config(dir.path(), &reloaded);
    p.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while http(admin, "GET", "/apisix/admin/routes", Some("n3w-k3y"), "")
        .unwrap()
        .0
        != 200
    {
        assert!(
            Instant::now() < deadline,
            "new key never accepted: {}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        http(
            admin,
            "GET",
            "/apisix/admin/routes",
            Some("k3y-k3y-k3y"),
            ""
        )
        .unwrap()
        .0,
        401
    );
    assert_eq!(
        http(data, "POST", "/r", None, &"x".repeat(2000)).unwrap().0,
        413
    );
    // A broken file keeps what runs.
    write_config(dir.path(), "apisix:\n  node_listen: nope\n");
    p.signal("HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        http(admin, "GET", "/apisix/admin/routes", Some("n3w-k3y"), "")
            .unwrap()
            .0,
        200
    );
    assert!(p.child.try_wait().unwrap().is_none(), "still running");
}

/// APISIX's CLI verbs: `test` checks the file, `reload` and `quit` signal
/// the running gateway through its PID file, which a clean stop removes.
#[test]
fn cli_reload_and_quit_reach_the_running_gateway() {
    let (dir, data, admin) = basic_gateway_dir();
    let config = dir.path().join("conf/config.yaml");
    let cli = |verb: &str| {
        Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .arg(verb)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let out = cli("test");
    assert!(out.status.success(), "{out:?}");
    let out = cli("reload");
    assert!(!out.status.success(), "nothing to reload yet");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not running"),
        "{out:?}"
    );

    let mut p = Proc::start(dir.path());
    p.wait_ready(admin);
    let pid_file = dir.path().join("data/ferrogate.pid");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        p.child.id().to_string()
    );
    // A new key through `reload`.
    write_config(
        dir.path(),
        &basic_config(data, admin).replace("k3y-k3y-k3y", "r3l0ad3d"),
    );
    let out = cli("reload");
    assert!(out.status.success(), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while http(admin, "GET", "/apisix/admin/routes", Some("r3l0ad3d"), "")
        .unwrap()
        .0
        != 200
    {
        assert!(Instant::now() < deadline, "reload not applied: {}", p.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = cli("quit");
    assert!(out.status.success(), "{out:?}");
    assert_clean_exit(&mut p);
    assert!(!pid_file.exists(), "PID file removed on a clean stop");
}

/// Idle kept-alive client connections do not hold up a graceful stop: they
/// are closed at once, and the process exits long before the 240 s grace.
#[test]
fn sigterm_closes_idle_keepalive_connections() {
    let (dir, data, admin) = basic_gateway_dir();
    let up = upstream();
    let mut p = Proc::start(dir.path());
    p.wait_ready(admin);
    put_route(admin, "r", "/r", &up.to_string());
    let mut idle = TcpStream::connect(("127.0.0.1", data)).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    idle.write_all(b"GET /r HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = idle.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let t = Instant::now();
    p.signal("TERM");
    assert_clean_exit(&mut p);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        matches!(idle.read(&mut buf), Ok(0) | Err(_)),
        "idle connection closed"
    );
}

/// `kill -9` in the middle of a storm of Admin API writes, three times over:
/// after each restart every acknowledged write is there, and every stored
/// route is whole (it serves, and reads back as the JSON that was sent).
#[test]
fn kill_9_during_a_write_storm_loses_no_acknowledged_write() {
    use std::sync::{Arc, Mutex};
    let (dir, data, admin) = basic_gateway_dir();
    let up = upstream();
    let acknowledged: Arc<Mutex<Vec<String>>> = Arc::default();
    for cycle in 0..3 {
        let mut p = Proc::start(dir.path());
        p.wait_ready(admin);
        // Everything acknowledged so far survived the last kill.
        let acked = acknowledged.lock().unwrap().clone();
        for id in &acked {
            let (st, body) = http(
                admin,
                "GET",
                &format!("/apisix/admin/routes/{id}"),
                Some("k3y-k3y-k3y"),
                "",
            )
            .unwrap();
            assert_eq!(st, 200, "acknowledged route {id} lost after kill -9");
            assert!(body.contains(&format!("\"uri\":\"/{id}\"")), "{body}");
            assert_eq!(
                http(data, "GET", &format!("/{id}"), None, "").unwrap(),
                (200, "hello".to_string())
            );
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let acknowledged = acknowledged.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut i = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let id = format!("c{cycle}w{w}n{i}");
                        let body = format!(
                            "{{\"uri\":\"/{id}\",\"desc\":\"{}\",\"upstream\":{{\"nodes\":{{\"{up}\":1}}}}}}",
                            "d".repeat(200)
                        );
                        match http(
                            admin,
                            "PUT",
                            &format!("/apisix/admin/routes/{id}"),
                            Some("k3y-k3y-k3y"),
                            &body,
                        ) {
                            Some((201, _)) => acknowledged.lock().unwrap().push(id),
                            Some((st, b)) if !stop.load(std::sync::atomic::Ordering::Relaxed) => {
                                panic!("PUT {id}: {st} {b}")
                            }
                            _ => return,
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300 + 150 * cycle));
        p.signal("KILL");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        let _ = p.child.wait();
    }
    let total = acknowledged.lock().unwrap().len();
    assert!(total > 20, "only {total} writes were made");
    let mut p = Proc::start(dir.path());
    p.wait_ready(admin);
    let list = route_list(admin);
    let stored: usize = list
        .split("\"total\":")
        .nth(1)
        .and_then(|t| t.split([',', '}']).next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    // Writes in flight at the kill may or may not have landed; none of the
    // acknowledged ones may be missing.
    assert!(stored >= total, "{stored} stored < {total} acknowledged");
    drop(p);
}

/// After `kill -9` the PID file stays behind, unlocked: control commands
/// call it stale instead of signalling whatever process has that number
/// now, and the next start takes the file over.
#[test]
fn stale_pid_file_after_kill_9_is_not_signalled() {
    let (dir, _data, admin) = basic_gateway_dir();
    let mut p = Proc::start(dir.path());
    p.wait_ready(admin);
    p.signal("KILL");
    let _ = p.child.wait();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(dir.path().join("conf/config.yaml"))
        .arg("reload")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stale PID file"),
        "{out:?}"
    );
    drop(p);
    let mut p = Proc::start(dir.path());
    p.wait_ready(admin);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("data/ferrogate.pid"))
            .unwrap()
            .trim(),
        p.child.id().to_string()
    );
}

/// The running gateway has transparent huge pages off (see `main.rs`), so
/// a touched byte costs a 4 KiB page, not 2 MiB.
#[test]
fn transparent_huge_pages_are_off() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return; // the operator's choice wins; nothing to check
    }
    let (dir, _data, admin) = basic_gateway_dir();
    let mut p = Proc::start(dir.path());
    p.wait_ready(admin);
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.child.id())).unwrap();
    // Kernels before 5.0 do not report the flag.
    if let Some(line) = status.lines().find(|l| l.starts_with("THP_enabled:")) {
        assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
    }
    p.signal("TERM");
    assert_clean_exit(&mut p);
}

/// Resident pages of the gateway's own executable mapping, and its size,
/// in KiB (from /proc/PID/smaps).
fn code_rss_kib(pid: u32) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let exe = exe.to_string_lossy();
    let mut in_code = false;
    let (mut rss, mut size) = (0, 0);
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first().is_some_and(|f| f.contains('-')) && fields.len() >= 5 {
            in_code = fields.get(1) == Some(&"r-xp") && line.ends_with(exe.as_ref());
            continue;
        }
        if in_code {
            match fields.first() {
                Some(&"Size:") => size += fields[1].parse::<u64>().unwrap(),
                Some(&"Rss:") => rss += fields[1].parse::<u64>().unwrap(),
                _ => {}
            }
        }
    }
    (rss, size)
}

/// Start-up runs code all over the binary; once it is over the gateway
/// gives those pages back (and again after Admin API changes settle), so
/// that only the code serving requests stays resident.
#[test]
fn start_up_code_is_not_kept_resident() {
    let (dir, data, admin) = basic_gateway_dir();
    let up = upstream();
    let mut p = Proc::start(dir.path());
    p.wait_ready(admin);
    put_route(admin, "1", "/r", &up.to_string());
    let get = || http(data, "GET", "/r", None, "").map(|(status, _)| status);
    for _ in 0..20 {
        assert_eq!(get(), Some(200));
    }
    // Changes are looked for every 2 s; released after one quiet period.
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(get(), Some(200));
    let (rss, size) = code_rss_kib(p.child.id());
    assert!(size > 0, "no executable mapping of the binary found");
    assert!(
        rss * 100 < size * 40,
        "{rss} KiB of the {size} KiB of code still resident"
    );
    p.signal("TERM");
    assert_clean_exit(&mut p);
}

/// KiB of the process's anonymous memory (heap, stacks) that is resident.
fn anon_rss_kib(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut anon = false;
    let mut rss = 0;
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first().is_some_and(|f| f.contains('-')) && fields.len() >= 5 {
            anon = fields.len() == 5 || fields[5] == "[heap]";
            continue;
        }
        if anon && fields.first() == Some(&"Rss:") {
            rss += fields[1].parse::<u64>().unwrap();
        }
    }
    rss
}

/// An upstream that reads each request head and answers only once `open`
/// is set, so that every request sent before is in flight at once.
fn gated_upstream(open: Arc<AtomicBool>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let open = open.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.ends_with(b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                while !open.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
                );
            });
        }
    });
    addr
}

/// Memory a burst of requests used is given back once their connections
/// are gone (no per-connection state outlives its connection, and the
/// allocator's emptied pages do not stay resident while the gateway is
/// quiet).
#[test]
fn memory_of_a_burst_of_connections_is_given_back() {
    let (dir, data, admin) = basic_gateway_dir();
    let open = Arc::new(AtomicBool::new(false));
    let up = gated_upstream(open.clone());
    let mut p = Proc::start(dir.path());
    p.wait_ready(admin);
    put_route(admin, "1", "/r", &up.to_string());
    open.store(true, Ordering::Release);
    assert_eq!(http(data, "GET", "/r", None, "").map(|r| r.0), Some(200));
    open.store(false, Ordering::Release);
    std::thread::sleep(Duration::from_millis(2500));
    let before = anon_rss_kib(p.child.id());

    // 300 requests in flight at once, each with a 3 KB header.
    let filler = "x".repeat(3000);
    let mut clients: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(("127.0.0.1", data)).unwrap())
        .collect();
    for c in &mut clients {
        write!(
            c,
            "GET /r HTTP/1.1\r\nHost: test\r\nX-Filler: {filler}\r\n\r\n"
        )
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(1500));
    let during = anon_rss_kib(p.child.id());
    open.store(true, Ordering::Release);
    for c in &mut clients {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"hello") {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed before the answer");
            got.extend_from_slice(&buf[..n]);
        }
    }
    drop(clients);
    std::thread::sleep(Duration::from_millis(3000));
    let after = anon_rss_kib(p.child.id());
    assert!(
        during > before + 2048,
        "300 requests in flight should hold memory: {before} -> {during} KiB"
    );
    assert!(
        (after - before.min(after)) * 2 < during - before,
        "resident anonymous memory {before} KiB before, {during} KiB during, {after} KiB after"
    );
    p.signal("TERM");
    assert_clean_exit(&mut p);
}

/// `worker_processes: 3`: three worker threads, each accepting on its own
/// socket of the data-plane port; every connection is served, whichever
/// worker the kernel hands it to, and the gateway still stops cleanly.
#[test]
fn worker_processes_run_their_own_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let (data, admin) = (free_port(), free_port());
    let config = format!(
        "{}nginx_config:\n  worker_processes: 3\n",
        basic_config(data, admin)
    );
    write_config(dir.path(), &config);
    let up = upstream();
    let mut p = Proc::start(dir.path());
    p.wait_ready(admin);
    put_route(admin, "1", "/w", &up.to_string());
    let tasks = std::fs::read_dir(format!("/proc/{}/task", p.child.id())).unwrap();
    let workers = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("ferrogate-work"))
        .count();
    assert_eq!(workers, 3);
    for _ in 0..60 {
        assert_eq!(
            http(data, "GET", "/w", None, "").unwrap(),
            (200, "hello".to_string())
        );
    }
    // Each worker's listening socket is its own: the port has three.
    let listening = std::fs::read_to_string("/proc/net/tcp").unwrap()
        + &std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
    let port_hex = format!(":{data:04X}");
    let sockets = listening
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|a| a.ends_with(&port_hex))
        })
        .filter(|l| l.split_whitespace().nth(3) == Some("0A"))
        .count();
    assert_eq!(sockets, 3, "listening sockets on port {data}");
    p.signal("TERM");
    assert_clean_exit(&mut p);
}

/// Two gateways with workers on the same data port: the second fails to
/// start with a bind error, as with one worker, rather than sharing the
/// port through the first one's `SO_REUSEPORT` sockets.
#[test]
fn a_second_gateway_on_a_taken_port_fails_to_start() {
    let first = tempfile::tempdir().unwrap();
    let (data, admin) = (free_port(), free_port());
    let workers = "nginx_config:\n  worker_processes: 2\n";
    write_config(
        first.path(),
        &format!("{}{workers}", basic_config(data, admin)),
    );
    let mut p = Proc::start(first.path());
    p.wait_ready(admin);
    let second = tempfile::tempdir().unwrap();
    write_config(
        second.path(),
        &format!("{}{workers}", basic_config(data, free_port())),
    );
    let out = Command::new(BIN)
        .arg("--config")
        .arg(second.path().join("conf/config.yaml"))
        .current_dir(second.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&data.to_string()), "{err}");
    p.signal("TERM");
    assert_clean_exit(&mut p);
}
