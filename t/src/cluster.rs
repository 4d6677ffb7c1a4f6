//! Several gateways on one etcd: a real `etcd` server and real `ferrogate`
//! processes on loopback ports, each in its own temporary directory.
//!
//! etcd comes from the distribution's `etcd-server` package (`etcdctl` from
//! `etcd-client`). Without it the tests that need it fail when `CI` is set
//! and are skipped with a loud message otherwise.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{send, Resp, KEY};

pub use crate::ports::free_port;

fn wait_for_port(port: u16, child: &mut Child, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited with {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "{what} did not come up: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// Whether `program` runs here; `false` means skip `test` (never on CI,
/// where a missing program is a failure naming `packages`).
pub fn program_available(test: &str, program: &str, packages: &str) -> bool {
    let found = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("{test} needs {program} (apt-get install {packages})");
        }
        eprintln!("SKIPPED {test}: no {program} on this machine (apt-get install {packages})");
    }
    found
}

/// Whether the etcd server can run here; `false` means skip (never on CI).
pub fn etcd_available(test: &str) -> bool {
    program_available(test, "etcd", "etcd-server etcd-client")
}

/// One etcd member, its data in a temporary directory.
pub struct Etcd {
    child: Option<Child>,
    pub port: u16,
    peer: u16,
    dir: tempfile::TempDir,
    /// Clients speak TLS: the server's certificate (`cert.pem`, also
    /// the CA clients trust) and key are in `dir`.
    tls: bool,
    /// `user:password` once authentication is on.
    user: Option<String>,
}

impl Etcd {
    pub fn start() -> Etcd {
        Self::start_with(None)
    }

    /// An etcd serving clients over TLS with `cert_pem`/`key_pem` (PEM).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Etcd {
        Self::start_with(Some((cert_pem, key_pem)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        if let Some((cert, key)) = tls {
            std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
            std::fs::write(dir.path().join("key.pem"), key).unwrap();
        }
        let mut etcd = Etcd {
            child: None,
            port: free_port(),
            peer: free_port(),
            dir,
            tls: tls.is_some(),
            user: None,
        };
        etcd.run();
        etcd
    }

    /// The certificate clients trust, for a TLS etcd.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// Turns authentication on with a `root` user of password `password`.
    pub fn enable_auth(&mut self, password: &str) {
        self.ctl(&[
            "user",
            "add",
            &format!("root:{password}"),
            "--interactive=false",
        ]);
        self.ctl(&["user", "grant-role", "root", "root"]);
        self.ctl(&["auth", "enable"]);
        self.user = Some(format!("root:{password}"));
    }

    fn run(&mut self) {
        let scheme = if self.tls { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.port);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let log = self.dir.path().join("etcd.log");
        let mut command = Command::new("etcd");
        if self.tls {
            command
                .arg("--cert-file")
                .arg(self.dir.path().join("cert.pem"))
                .arg("--key-file")
                .arg(self.dir.path().join("key.pem"));
        }
        let mut child = command
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .args(["--log-level", "error", "--logger", "zap"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("etcd starts");
        wait_for_port(self.port, &mut child, "etcd", &log);
        self.child = Some(child);
        // Ready for requests, not just listening.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.try_ctl(&["endpoint", "health"]).0 {
            assert!(Instant::now() < deadline, "etcd is not healthy");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Stops etcd (SIGKILL), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// Replaces it with an empty etcd on the same ports (a restore from an
    /// old backup looks the same to clients: revisions go back).
    pub fn replace_with_empty(&mut self) {
        self.stop();
        std::fs::remove_dir_all(self.dir.path().join("data")).unwrap();
        self.run();
    }

    fn try_ctl(&self, args: &[&str]) -> (bool, String) {
        let mut command = Command::new("etcdctl");
        command
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()));
        if self.tls {
            command.arg("--cacert").arg(self.ca_path());
        }
        if let Some(user) = &self.user {
            command.arg(format!("--user={user}"));
        }
        let out = command
            .args(args)
            .output()
            .expect("etcdctl runs (apt-get install etcd-client)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// Runs `etcdctl`, which must succeed; its output.
    pub fn ctl(&self, args: &[&str]) -> String {
        let (ok, text) = self.try_ctl(args);
        assert!(ok, "etcdctl {args:?}: {text}");
        text
    }

    /// The value at `key`, or `None`.
    pub fn value(&self, key: &str) -> Option<String> {
        let out = self.ctl(&["get", key, "--print-value-only"]);
        let out = out.trim_end_matches('\n');
        (!out.is_empty()).then(|| out.to_string())
    }

    /// Compacts every revision up to the current one, physically.
    pub fn compact(&self) {
        let status = self.ctl(&["endpoint", "status", "-w", "json"]);
        let parsed: Value = serde_json::from_str(&status).unwrap();
        let revision = parsed[0]["Status"]["header"]["revision"].as_u64().unwrap();
        self.ctl(&["compact", &revision.to_string(), "--physical"]);
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `ferrogate` binary this test run built (`target/<profile>/ferrogate`,
/// beside the `deps/` directory the test binary runs from).
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("ferrogate");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --profile tests` first (cargo test --profile tests --workspace builds it)",
        bin.display()
    );
    bin
}

/// Runs ferrogate on the config text `yaml`, expecting it to refuse to
/// start; what it printed on stderr.
pub fn failed_start(yaml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("conf")).unwrap();
    std::fs::write(dir.path().join("conf/config.yaml"), yaml).unwrap();
    let out = Command::new(binary())
        .arg("--config")
        .arg(dir.path().join("conf/config.yaml"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "started: {stderr}");
    stderr
}

/// A ferrogate process on etcd, with its own ports and data directory.
pub struct Node {
    child: Option<Child>,
    pub data: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Node {
    /// A traditional node (Admin API and data plane) on the etcd at
    /// `endpoint`; `etcd_extra` adds lines inside `deployment.etcd`,
    /// `ssl_extra` inside `apisix.ssl` (both four-space indented).
    pub fn start(endpoint: &str, etcd_extra: &str, ssl_extra: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let (data, admin) = (free_port(), free_port());
        let yaml = format!(
            "apisix:\n  node_listen:\n    - ip: 127.0.0.1\n      port: {data}\n  ssl:\n    enable: false\n{ssl_extra}\
             deployment:\n  role: traditional\n  role_traditional:\n    config_provider: etcd\n\
             \x20 admin:\n    admin_key:\n      - name: admin\n        key: {KEY}\n        role: admin\n\
             \x20   admin_listen:\n      ip: 127.0.0.1\n      port: {admin}\n\
             \x20 etcd:\n    host:\n      - {endpoint}\n    timeout: 3\n{etcd_extra}"
        );
        Self::start_with_config(dir, &yaml, data, admin)
    }

    /// Starts a node from the config text `yaml` in `dir`.
    pub fn start_with_config(dir: tempfile::TempDir, yaml: &str, data: u16, admin: u16) -> Node {
        std::fs::create_dir_all(dir.path().join("conf")).unwrap();
        std::fs::write(dir.path().join("conf/config.yaml"), yaml).unwrap();
        let mut node = Node {
            child: None,
            data: SocketAddr::from(([127, 0, 0, 1], data)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            dir,
        };
        node.run();
        node
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("gateway.log")
    }

    /// What the node logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn run(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut child = Command::new(binary())
            .arg("--config")
            .arg(self.dir.path().join("conf/config.yaml"))
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_for_port(self.data.port(), &mut child, "ferrogate", &self.log_path());
        self.child = Some(child);
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the process (SIGKILL: no chance to save anything).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again with the same config and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.run();
    }

    /// One Admin API call with the admin key; `path` below `/apisix/admin/`.
    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let headers = [("x-api-key", KEY.to_string())];
        send(
            self.admin,
            method,
            &format!("/apisix/admin/{path}"),
            &headers,
            body.map(|b| b.to_string()).unwrap_or_default(),
            None,
        )
        .await
    }

    /// A data-plane GET with extra headers.
    pub async fn get(&self, path: &str, headers: &[(&str, String)]) -> Resp {
        send(self.data, "GET", path, headers, String::new(), None).await
    }

    /// Polls `path` until it answers `status`; the time it took. Panics
    /// after `limit`.
    pub async fn wait_status(&self, path: &str, status: u16, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let r = self.get(path, &[]).await;
            if r.status.as_u16() == status {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "{path} on {} still answers {} after {limit:?}; log:\n{}",
                self.data,
                r.status,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}
