//! Controlling a running gateway from the command line, as APISIX's CLI
//! does (`apisix reload`, `apisix quit`, `apisix stop`): the running
//! process records its PID in `<data dir>/ferrogate.pid`, and the control
//! commands signal that PID.
//!
//! | command | signal | effect |
//! |---|---|---|
//! | `reload` | HUP | re-read `conf/config.yaml`; apply what can change while running |
//! | `quit` | QUIT | graceful stop within `worker_shutdown_timeout` |
//! | `stop` | TERM | the same graceful stop (requests in flight still finish) |
//!
//! A PID file left behind by a process that is gone (after `kill -9`, say)
//! is reported as "not running"; the file is removed on a clean stop.

use std::path::{Path, PathBuf};

use rustix::process::{kill_process, test_kill_process, Pid, Signal};

/// File name of the PID file inside the data directory.
pub const PID_FILE: &str = "ferrogate.pid";

/// What a control command asks of the running gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Reload,
    Quit,
    Stop,
}

impl Command {
    fn signal(self) -> Signal {
        match self {
            Command::Reload => Signal::HUP,
            Command::Quit => Signal::QUIT,
            Command::Stop => Signal::TERM,
        }
    }
}

/// Why a control command could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("ferrogate is not running (no PID file at {0})")]
    NoPidFile(PathBuf),
    #[error("PID file {0} is unreadable or does not hold a PID")]
    BadPidFile(PathBuf),
    #[error("ferrogate is not running (PID {0} from {1} is gone)")]
    Gone(i32, PathBuf),
    #[error("cannot signal PID {0}: {1}")]
    Signal(i32, std::io::Error),
}

/// The running gateway's PID file: written at start, removed on drop.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Records this process's PID in `data_dir` (created private if
    /// missing). Call it once the listeners are bound: a second instance
    /// that fails to start must not replace the first one's file.
    pub fn create(data_dir: &Path) -> anyhow::Result<Self> {
        crate::keys::ensure_private_dir(data_dir)?;
        let path = data_dir.join(PID_FILE);
        std::fs::write(&path, format!("{}\n", std::process::id()))
            .map_err(|e| anyhow::anyhow!("cannot write the PID file {}: {e}", path.display()))?;
        Ok(PidFile { path })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends `command` to the gateway whose data directory is `data_dir`;
/// returns its PID.
pub fn send(data_dir: &Path, command: Command) -> Result<i32, ControlError> {
    let path = data_dir.join(PID_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ControlError::NoPidFile(path.clone()),
        _ => ControlError::BadPidFile(path.clone()),
    })?;
    let raw: i32 = text
        .trim()
        .parse()
        .map_err(|_| ControlError::BadPidFile(path.clone()))?;
    let pid = Pid::from_raw(raw)
        .filter(|p| !p.is_init())
        .ok_or_else(|| ControlError::BadPidFile(path.clone()))?;
    test_kill_process(pid).map_err(|_| ControlError::Gone(raw, path.clone()))?;
    kill_process(pid, command.signal()).map_err(|e| ControlError::Signal(raw, e.into()))?;
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_bad_and_stale_pid_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            send(dir.path(), Command::Reload),
            Err(ControlError::NoPidFile(_))
        ));
        std::fs::write(dir.path().join(PID_FILE), "not a pid").unwrap();
        assert!(matches!(
            send(dir.path(), Command::Reload),
            Err(ControlError::BadPidFile(_))
        ));
        std::fs::write(dir.path().join(PID_FILE), "1").unwrap();
        assert!(matches!(
            send(dir.path(), Command::Reload),
            Err(ControlError::BadPidFile(_))
        ));
        // PIDs above the kernel's maximum (4194304) never exist.
        std::fs::write(dir.path().join(PID_FILE), "2147483000").unwrap();
        assert!(matches!(
            send(dir.path(), Command::Reload),
            Err(ControlError::Gone(..))
        ));
    }

    #[test]
    fn pid_file_is_written_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let file = PidFile::create(&data).unwrap();
        let text = std::fs::read_to_string(data.join(PID_FILE)).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        drop(file);
        assert!(!data.join(PID_FILE).exists());
    }
}
