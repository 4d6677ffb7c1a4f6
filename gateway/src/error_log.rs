//! Where the gateway's own log goes: stderr, or the file
//! `nginx_config.error_log` names (relative to the prefix), reopened on
//! `SIGUSR1` as nginx reopens its error log for logrotate.
//!
//! The writer is process-wide: the log is set up before anything else runs
//! and every thread writes through it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

struct Target {
    file: File,
    path: PathBuf,
}

static TARGET: Mutex<Option<Target>> = Mutex::new(None);

fn open_file(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// Sends the log to `path` from now on.
pub fn open(path: &Path) -> io::Result<()> {
    let file = open_file(path)?;
    let mut target = TARGET.lock().unwrap_or_else(|p| p.into_inner());
    *target = Some(Target {
        file,
        path: path.to_path_buf(),
    });
    Ok(())
}

/// Reopens the log file, if there is one (after a rename).
pub fn reopen() -> io::Result<()> {
    let mut target = TARGET.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(t) = target.as_mut() {
        t.file = open_file(&t.path)?;
    }
    Ok(())
}

/// At most one line a second for a message clients can cause at will (a
/// shed connection, a failed TLS handshake): the log is written from the
/// serving threads, and a flood of them would cost those threads and the
/// disk what the flood costs the client nothing.
pub struct Throttle {
    /// Seconds since the Unix epoch of the last line let through.
    last: AtomicU64,
    /// Lines held back since.
    held: AtomicU64,
}

impl Throttle {
    pub const fn new() -> Self {
        Throttle {
            last: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back before this one)` when this line may go out.
    pub fn allow(&self) -> Option<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last.load(Ordering::Relaxed);
        if now != last
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new()
    }
}

/// One write to the log (tracing's `MakeWriter` makes one per event).
pub struct Writer;

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut target = TARGET.lock().unwrap_or_else(|p| p.into_inner());
        match target.as_mut() {
            Some(t) => t.file.write(buf),
            None => io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut target = TARGET.lock().unwrap_or_else(|p| p.into_inner());
        match target.as_mut() {
            Some(t) => t.file.flush(),
            None => io::stderr().flush(),
        }
    }
}

/// `nginx_config.error_log` and `error_log_level` of the config file at
/// `path`, read before the rest of it (the log is set up first); `None`s
/// when the file or the keys are missing.
pub fn settings(path: &Path) -> (Option<PathBuf>, Option<String>) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return (None, None);
    };
    let Ok(doc) = crate::yaml::parse(&text) else {
        return (None, None);
    };
    let nginx = doc.get("nginx_config");
    let file = nginx
        .and_then(|n| n.get("error_log"))
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty() && *s != "stderr" && *s != "/dev/stderr")
        .map(|s| {
            let p = PathBuf::from(s);
            if p.is_absolute() {
                p
            } else {
                crate::config::prefix_of(path).join(p)
            }
        });
    let level = nginx
        .and_then(|n| n.get("error_log_level"))
        .and_then(|v| v.as_str())
        .map(|l| match l {
            // nginx's levels, as tracing names them.
            "debug" => "debug",
            "info" | "notice" => "info",
            "warn" => "warn",
            _ => "error",
        })
        .map(str::to_string);
    (file, level)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_lets_one_line_a_second_through() {
        let t = Throttle::new();
        assert_eq!(t.allow(), Some(0));
        let held = (0..100).filter(|_| t.allow().is_none()).count();
        // A second boundary may fall inside the loop once.
        assert!(held >= 99, "{held}");
    }

    #[test]
    fn reads_error_log_settings() {
        let dir = tempfile::tempdir().expect("dir");
        let conf = dir.path().join("conf");
        std::fs::create_dir_all(&conf).expect("mkdir");
        let path = conf.join("config.yaml");
        std::fs::write(
            &path,
            "nginx_config:\n  error_log: logs/error.log\n  error_log_level: notice\n",
        )
        .expect("write");
        let (file, level) = settings(&path);
        assert_eq!(file, Some(dir.path().join("logs/error.log")));
        assert_eq!(level.as_deref(), Some("info"));
        std::fs::write(&path, "apisix: {}\n").expect("write");
        assert_eq!(settings(&path), (None, None));
    }
}
