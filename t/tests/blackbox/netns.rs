#![allow(clippy::unwrap_used)]
//! Network namespaces for the kernel-feature tests (TProxy, XDP): created
//! with unique names, removed on drop with the processes started in them.

use std::process::{Child, Command, Stdio};

/// The namespaces of one test, removed on drop.
pub struct Netns {
    pub names: Vec<String>,
    pub children: Vec<Child>,
}

impl Netns {
    /// Creates the namespaces `names`, each with its loopback up.
    pub fn create(names: Vec<String>) -> Netns {
        let env = Netns {
            names,
            children: Vec::new(),
        };
        for n in &env.names {
            run(&["ip", "netns", "add", n]);
            ns(n, &["ip", "link", "set", "lo", "up"]);
        }
        env
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

pub fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn ns(name: &str, args: &[&str]) {
    let mut all = vec!["ip", "netns", "exec", name];
    all.extend_from_slice(args);
    run(&all);
}

/// Why this machine cannot run the test, if it cannot.
pub fn unsupported() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("needs root (network namespaces, nftables)".into());
    }
    for tool in ["ip", "nft"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !found {
            return Some(format!("needs `{tool}`"));
        }
    }
    None
}

/// A small HTTP server in `ns` on `addr`: answers `server saw PATH from
/// PEER-ADDRESS`.
pub fn server(ns: &str, host: &str, port: u16) -> Child {
    let script = format!(
        "import http.server, socket\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def do_GET(self):\n\
         \x20       body = ('server saw ' + self.path + ' from ' + self.client_address[0]).encode()\n\
         \x20       self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers(); self.wfile.write(body)\n\
         \x20   def log_message(self, *a): pass\n\
         class S(http.server.HTTPServer):\n\
         \x20   address_family = socket.AF_INET6 if ':' in '{host}' else socket.AF_INET\n\
         S(('{host}', {port}), H).serve_forever()\n"
    );
    Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// GETs `url` from inside `ns`; the status and body, or the error.
pub fn fetch(ns: &str, url: &str) -> String {
    let script = format!(
        "import urllib.request, urllib.error\n\
         try:\n\
         \x20   r = urllib.request.urlopen('{url}', timeout=5); print(r.status, r.read().decode())\n\
         except urllib.error.HTTPError as e:\n\
         \x20   print(e.code, e.read().decode())\n"
    );
    python(ns, &script)
}

/// Runs a Python script inside `ns`; its output, trimmed (stderr after
/// stdout).
pub fn python(ns: &str, script: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", script])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}
