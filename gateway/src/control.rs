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
//! The running gateway holds an exclusive advisory lock (`flock`) on its
//! PID file, so a file left behind by a process that is gone (after
//! `kill -9`, say) is recognised as stale even if its PID has since been
//! given to another process, and is never signalled; the file is removed on
//! a clean stop.

use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};
use rustix::process::{kill_process, Pid, Signal};

use crate::error::Error;

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
    #[error("ferrogate is not running (stale PID file {0})")]
    Stale(PathBuf),
    #[error("cannot signal PID {0}: {1}")]
    Signal(i32, std::io::Error),
}

/// The running gateway's PID file: written and locked at start, removed
/// on drop.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    /// Held open: the lock lives as long as the file descriptor.
    _locked: std::fs::File,
}

impl PidFile {
    /// Records this process's PID in `data_dir` (created private if
    /// missing). Call it once the listeners are bound: a second instance
    /// that fails to start must not replace the first one's file.
    ///
    /// Fails with [`Error::AlreadyRunning`] when another process holds the
    /// file's lock, [`Error::PidFile`] when it cannot be written, and
    /// [`Error::DataDir`] when the directory cannot be made.
    pub fn create(data_dir: &Path) -> Result<Self, Error> {
        use std::io::Write;
        crate::keys::ensure_private_dir(data_dir)?;
        let path = data_dir.join(PID_FILE);
        let fail = |error: std::io::Error| Error::PidFile {
            path: path.clone(),
            error,
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(fail)?;
        flock(&file, FlockOperation::NonBlockingLockExclusive).map_err(|_| {
            Error::AlreadyRunning {
                data_dir: data_dir.to_path_buf(),
            }
        })?;
        file.set_len(0).map_err(fail)?;
        writeln!(file, "{}", std::process::id()).map_err(fail)?;
        Ok(PidFile {
            path,
            _locked: file,
        })
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
    let file = std::fs::File::open(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ControlError::NoPidFile(path.clone()),
        _ => ControlError::BadPidFile(path.clone()),
    })?;
    // If the lock can be had, nobody holds it: the writer is gone.
    if flock(&file, FlockOperation::NonBlockingLockShared).is_ok() {
        return Err(ControlError::Stale(path));
    }
    let text = std::io::read_to_string(file).map_err(|_| ControlError::BadPidFile(path.clone()))?;
    let raw: i32 = text
        .trim()
        .parse()
        .map_err(|_| ControlError::BadPidFile(path.clone()))?;
    // 0 and negative numbers would signal process groups, 1 is init.
    if raw <= 1 {
        return Err(ControlError::BadPidFile(path));
    }
    let pid = Pid::from_raw(raw).ok_or_else(|| ControlError::BadPidFile(path.clone()))?;
    kill_process(pid, command.signal()).map_err(|e| ControlError::Signal(raw, e.into()))?;
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_stale_and_bad_pid_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            send(dir.path(), Command::Reload),
            Err(ControlError::NoPidFile(_))
        ));
        // Nobody holds the lock: stale, whatever number it names (here our
        // own PID, which must not be signalled).
        std::fs::write(dir.path().join(PID_FILE), std::process::id().to_string()).unwrap();
        assert!(matches!(
            send(dir.path(), Command::Reload),
            Err(ControlError::Stale(_))
        ));
    }

    #[test]
    fn a_locked_file_with_a_dangerous_number_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PID_FILE);
        for bad in ["-1", "0", "1", "not a pid"] {
            std::fs::write(&path, bad).unwrap();
            let held = std::fs::File::open(&path).unwrap();
            flock(&held, FlockOperation::NonBlockingLockExclusive).unwrap();
            assert!(
                matches!(
                    send(dir.path(), Command::Stop),
                    Err(ControlError::BadPidFile(_))
                ),
                "{bad}"
            );
            drop(held);
        }
    }

    #[test]
    fn a_second_instance_cannot_take_the_pid_file() {
        let dir = tempfile::tempdir().unwrap();
        let first = PidFile::create(dir.path()).unwrap();
        assert!(matches!(
            PidFile::create(dir.path()),
            Err(Error::AlreadyRunning { .. })
        ));
        drop(first);
        assert!(PidFile::create(dir.path()).is_ok());
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
