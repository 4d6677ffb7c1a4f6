//! The thread every Admin API write runs on.
//!
//! A write validates, commits to the store (the embedded store waits for its
//! `fdatasync` there) and compiles the next snapshot, so it cannot run on
//! the runtime's threads. Handing each write to the runtime's blocking pool
//! spread a steady stream of updates over a dozen idle threads in turn, each
//! with cold caches and its own allocator heap: about a sixth more CPU per
//! update than one thread that stays warm. One thread also runs the writes
//! one at a time, in the order they came, which the store and the reference
//! checks (an upstream in use, a duplicate key) rely on.
//!
//! The thread runs at a lower CPU priority than the data plane's (see
//! [`WRITER_NICE`]).
//!
//! The thread starts with the first write and ends when its [`Writer`] is
//! dropped. Failure modes: a thread that cannot be started fails that write
//! (the next write tries again); a write that panics fails alone, and the
//! thread goes on with the next one.

use std::panic::{self, AssertUnwindSafe};
use std::sync::{mpsc, Mutex};

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// The writer thread's nice value, above the process's main thread's.
///
/// A route update costs the writer a few hundred microseconds of CPU (the
/// journal's sync, validation, the snapshot's compile). When the machine's
/// cores are all busy, a writer at the data plane's priority takes that time
/// from the threads serving requests. At nice 10 its weight is a tenth of
/// theirs, so a burst of changes runs in what the data plane leaves, yet it
/// never starves: the scheduler still gives it a tenth of a busy thread's
/// share (on two cores with three busy threads, about what 400 updates a
/// second need; their answers then take a few milliseconds longer, tens of
/// milliseconds with two busy workers). Databases lower their background
/// threads the same way (RocksDB's compactions).
const WRITER_NICE: i32 = 10;

/// Sets the calling thread's nice value to [`WRITER_NICE`] above the main
/// thread's (a thread inherits its creator's, so this is not added twice),
/// never lowering it. Raising a nice value needs no privilege; where it
/// still fails (a seccomp filter), the thread keeps its priority.
fn yield_to_the_data_plane() {
    use rustix::process::{getpid, getpriority_process, setpriority_process};
    // On Linux a nice value is per thread; the process's is its main thread's.
    let (Ok(main), Ok(ours)) = (
        getpriority_process(Some(getpid())),
        getpriority_process(None),
    ) else {
        return;
    };
    let target = (main + WRITER_NICE).min(19);
    if ours < target {
        if let Err(e) = setpriority_process(None, target) {
            tracing::debug!(error = %e, "admin writer: nice value left as it was");
        }
    }
}

/// Why a write did not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum WriteFailed {
    #[error("cannot start the admin writer thread: {0}")]
    NoThread(std::io::Error),
    #[error("the write panicked")]
    Panicked,
    #[error("the admin writer thread has stopped")]
    Stopped,
}

/// Runs closures one at a time on a thread of its own.
#[derive(Default)]
pub struct Writer {
    /// The running thread's queue; `None` until the first write, or after
    /// the thread was found gone.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
}

impl Writer {
    /// Runs `work` on the writer thread, after the writes queued before it,
    /// and returns what it returned.
    pub async fn run<R, F>(&self, work: F) -> Result<R, WriteFailed>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let (done, answer) = oneshot::channel();
        let job: Job = Box::new(move || {
            // The caller may have gone away (client disconnected): the
            // write itself has still happened, and nothing is left to tell.
            let _ = done.send(panic::catch_unwind(AssertUnwindSafe(work)));
        });
        self.submit(job)?;
        match answer.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => Err(WriteFailed::Panicked),
            Err(_) => Err(WriteFailed::Stopped),
        }
    }

    fn submit(&self, job: Job) -> Result<(), WriteFailed> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        // A thread that is gone (it cannot panic out of its loop, but a
        // failed send must not lose the write) is started again.
        let job = match jobs.as_ref() {
            Some(queue) => match queue.send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let (queue, incoming) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("admin-writer".into())
            .spawn(move || {
                yield_to_the_data_plane();
                for job in incoming {
                    job();
                }
            })
            .map_err(WriteFailed::NoThread)?;
        // A fresh channel's receiver is alive: this send cannot fail.
        let sent = queue.send(job);
        *jobs = Some(queue);
        sent.map_err(|_| WriteFailed::Stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_run_in_order_on_one_thread() {
        let writer = Writer::default();
        let first = writer.run(|| std::thread::current().id()).await.unwrap();
        for _ in 0..10 {
            let id = writer.run(|| std::thread::current().id()).await.unwrap();
            assert_eq!(id, first);
        }
        assert_ne!(first, std::thread::current().id());
        let order = std::sync::Arc::new(Mutex::new(Vec::new()));
        let runs = (0..20).map(|i| {
            let order = order.clone();
            writer.run(move || order.lock().unwrap().push(i))
        });
        for run in futures_util::future::join_all(runs).await {
            run.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..20).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn writes_run_below_the_data_planes_priority() {
        use rustix::process::{getpid, getpriority_process};
        let writer = Writer::default();
        let ours = getpriority_process(None).unwrap();
        let main = getpriority_process(Some(getpid())).unwrap();
        let its = writer
            .run(|| {
                // A second call (as in a thread started from a lowered one)
                // leaves the value as it is.
                yield_to_the_data_plane();
                getpriority_process(None).unwrap()
            })
            .await
            .unwrap();
        // Per thread: the caller's stays as it was.
        assert_eq!(getpriority_process(None).unwrap(), ours);
        assert_eq!(its, (main + WRITER_NICE).min(19).max(ours));
    }

    #[tokio::test]
    async fn a_panicking_write_fails_alone() {
        let writer = Writer::default();
        let before = writer.run(|| std::thread::current().id()).await.unwrap();
        let failed = writer.run(|| -> u8 { panic!("bad write") }).await;
        assert!(matches!(failed, Err(WriteFailed::Panicked)));
        let after = writer.run(|| std::thread::current().id()).await.unwrap();
        assert_eq!(before, after);
    }
}
