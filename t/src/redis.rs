//! Real Redis for the limit plugins' `redis` and `redis-cluster` policies:
//! `redis-server` processes on loopback ports, data in temporary
//! directories, nothing persisted.
//!
//! Redis comes from the distribution's `redis-server` package (`redis-cli`
//! with it). Without it the tests that need it fail when `CI` is set and are
//! skipped with a loud message otherwise.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::free_port;

/// Whether Redis can run here; `false` means skip (never on CI).
pub fn redis_available(test: &str) -> bool {
    crate::cluster::program_available(test, "redis-server", "redis-server")
}

fn spawn(port: u16, dir: &Path, extra: &[&str]) -> Child {
    try_spawn(port, dir, extra).unwrap_or_else(|e| panic!("{e}"))
}

/// Starts a server on `port`; `Err` with its log when it exits first.
fn try_spawn(port: u16, dir: &Path, extra: &[&str]) -> Result<Child, String> {
    let log = std::fs::File::create(dir.join(format!("redis-{port}.log"))).unwrap();
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdout(log)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "redis-server exited with {status}: {}",
                std::fs::read_to_string(dir.join(format!("redis-{port}.log"))).unwrap_or_default()
            ));
        }
        if cli_at(port, &["PING"]).trim() == "PONG" {
            return Ok(child);
        }
        assert!(Instant::now() < deadline, "redis on {port} did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TLS-only server (plain port off), up once it accepts TCP on `port`.
fn spawn_tls(dir: &Path, args: &[String], port: u16) -> Child {
    let mut child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("redis-server (TLS) exited with {status}");
        }
        assert!(
            Instant::now() < deadline,
            "redis (TLS) on {port} did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// `redis-cli -p port args...`, its output.
pub fn cli_at(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// One Redis server.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// Extra server arguments (TLS), kept for a restart.
    args: Vec<String>,
}

impl Redis {
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = spawn(port, dir.path(), &[]);
        Redis {
            child: Some(child),
            port,
            dir,
            args: Vec::new(),
        }
    }

    /// A server that speaks only TLS on `port`, with a self-signed
    /// certificate (made by the `openssl` command) and no client
    /// certificates asked for.
    pub fn start_tls() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let made = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(made.success(), "openssl could not make a certificate");
        let port = free_port();
        let args: Vec<String> = vec![
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            cert.display().to_string(),
            "--tls-key-file".into(),
            key.display().to_string(),
            "--tls-ca-cert-file".into(),
            cert.display().to_string(),
            "--tls-auth-clients".into(),
            "no".into(),
        ];
        let child = spawn_tls(dir.path(), &args, port);
        Redis {
            child: Some(child),
            port,
            dir,
            args,
        }
    }

    /// `redis-cli` against this server.
    pub fn cli(&self, args: &[&str]) -> String {
        cli_at(self.port, args)
    }

    /// Every key (`KEYS *`).
    pub fn keys(&self) -> Vec<String> {
        self.cli(&["--raw", "KEYS", "*"])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Kills the server (its data goes with it).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again, empty, on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.child = Some(if self.args.is_empty() {
            spawn(self.port, self.dir.path(), &[])
        } else {
            spawn_tls(self.dir.path(), &self.args, self.port)
        });
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis Cluster of three masters (no replicas), slots spread over them.
pub struct RedisCluster {
    children: Vec<Child>,
    pub ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

/// A free port whose cluster bus port (+10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= 55_535 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut ports = Vec::new();
        let mut children = Vec::new();
        for i in 0..3 {
            let node_dir = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            // A cluster node also listens on its port + 10000 (the cluster
            // bus), which another test may hold: try other ports then.
            let mut attempt = 0;
            let (port, child) = loop {
                let port = cluster_port();
                let args = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ];
                match try_spawn(port, &node_dir, &args) {
                    Ok(child) => break (port, child),
                    Err(e) if attempt < 5 => {
                        attempt += 1;
                        let _ = std::fs::remove_file(node_dir.join("nodes.conf"));
                        eprintln!(
                            "redis cluster node on {port} did not start, trying another port: {e}"
                        );
                    }
                    Err(e) => panic!("{e}"),
                }
            };
            children.push(child);
            ports.push(port);
        }
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for p in &ports {
            create.arg(format!("127.0.0.1:{p}"));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ports
            .iter()
            .all(|p| cli_at(*p, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(Instant::now() < deadline, "the cluster did not become ok");
            std::thread::sleep(Duration::from_millis(50));
        }
        RedisCluster {
            children,
            ports,
            _dir: dir,
        }
    }

    /// `"127.0.0.1:port"` of every node, as `redis_cluster_nodes` takes them.
    pub fn nodes(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// Every key on every node.
    pub fn keys(&self) -> Vec<String> {
        self.ports
            .iter()
            .flat_map(|p| {
                cli_at(*p, &["--raw", "KEYS", "*"])
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
