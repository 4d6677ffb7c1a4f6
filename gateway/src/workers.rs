//! `nginx_config.worker_processes: N` (N > 1): N worker threads, each with
//! its own single-threaded runtime and its own listening socket on every
//! data-plane address (`SO_REUSEPORT`: the kernel spreads new connections
//! over them), as nginx runs N worker processes.
//!
//! A connection lives on the worker that accepted it, with its upstream
//! connections (the HTTP/1.1 pool lends a worker only the connections it
//! opened): no task moves between threads and no request wakes another
//! thread, which a work-stealing pool of N threads did on most requests
//! (measured: 36% more CPU per request with two threads than with one).
//! The Admin API, the config publisher, health checks and the metrics
//! server stay on the main runtime.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    static WORKER: Cell<u16> = const { Cell::new(0) };
}

/// The worker this thread is (1..=N), or 0 off the worker threads.
pub fn current() -> u16 {
    WORKER.with(Cell::get)
}

/// How many slots state kept per worker has: one for the threads off the
/// workers and one per core, the number of workers `worker_processes: auto`
/// starts. More workers than that share slots.
pub fn slots() -> usize {
    static SLOTS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SLOTS.get_or_init(|| {
        1 + std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(255)
    })
}

/// The calling thread's slot among `len` (see [`slots`]).
pub fn slot(len: usize) -> usize {
    usize::from(current()) % len.max(1)
}

/// Makes this thread count as worker `id` (tests of per-worker state).
#[cfg(test)]
pub fn pretend(id: u16) {
    WORKER.with(|w| w.set(id));
}

/// The running workers; dropping this ends their threads (their runtimes,
/// and whatever is left on them, are dropped there).
pub struct Workers {
    handles: Vec<Handle>,
    _stop: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// Starts `n` worker threads. Fails when a thread or runtime cannot be
    /// created (out of memory or threads).
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let mut handles = Vec::with_capacity(n);
        let mut stop = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let (tx, rx) = oneshot::channel::<()>();
            stop.push(tx);
            let index = u16::try_from(i + 1).unwrap_or(u16::MAX);
            std::thread::Builder::new()
                .name(format!("ferrogate-worker-{}", i + 1))
                .spawn(move || {
                    WORKER.with(|w| w.set(index));
                    runtime.block_on(async {
                        tokio::select! {
                            _ = rx => {}
                            () = crate::alloc::return_free_pages_periodically() => {}
                        }
                    });
                })?;
        }
        Ok(Workers {
            handles,
            _stop: stop,
        })
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Runs `serve(listener)` on worker `i`, the listener made a tokio one
    /// there (it must be registered with the worker's own reactor).
    fn serve<F, Fut>(
        &self,
        i: usize,
        listener: std::net::TcpListener,
        serve: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handle = &self.handles[i % self.handles.len()];
        handle.spawn(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => serve(l).await,
                Err(e) => tracing::error!(error = %e, "a worker cannot take its listener"),
            }
        })
    }

    /// Serves each listener on its own worker (the i-th on worker i); the
    /// caller's `tasks` end when the serving does.
    pub fn serve_each<F, Fut>(
        &self,
        listeners: Vec<std::net::TcpListener>,
        tasks: &mut tokio::task::JoinSet<()>,
        serve: F,
    ) where
        F: Fn(tokio::net::TcpListener) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        for (i, listener) in listeners.into_iter().enumerate() {
            let serving = self.serve(i, listener, serve.clone());
            tasks.spawn(async move {
                let _ = serving.await;
            });
        }
    }
}

/// `n` listening sockets on `addr` sharing it through `SO_REUSEPORT` (a
/// port 0 is resolved first and taken by all); each has its own backlog of
/// 1024, as [`crate::server::bind`] gives one.
///
/// Fails with `AddrInUse` when anything already listens there, another
/// gateway's worker sockets included: the address is first bound by a
/// socket without `SO_REUSEPORT`, which the kernel refuses beside any
/// listener, so a second gateway started on the same port fails as it
/// would with one worker instead of silently taking half the connections.
pub fn bind_shared(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let at = std::net::TcpListener::bind(addr)?.local_addr()?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(at),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&at.into())?;
        socket.listen(1024)?;
        out.push(socket.into());
    }
    Ok(out)
}
