//! The `ferrogate` binary: `ferrogate [--config conf/config.yaml] [COMMAND]`,
//! with APISIX's CLI commands: `start` (the default), `reload`, `quit`,
//! `stop`, `test` and `version`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use gateway::control::{Command, PidFile};
use gateway::GatewayConfig;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// A proxy allocates and frees small buffers and header maps on every
/// request, from several threads; mimalloc's per-thread free lists make that
/// markedly cheaper than the system allocator (see README, figures).
#[global_allocator]
static ALLOCATOR: gateway::alloc::Mimalloc = gateway::alloc::Mimalloc;

/// Drops the code pages start-up (or a reload) ran from the process's
/// resident memory (see `gateway::resident`); `FERROGATE_KEEP_CODE` set in
/// the environment keeps them.
fn release_startup_code() {
    if std::env::var_os("FERROGATE_KEEP_CODE").is_some() {
        return;
    }
    match gateway::resident::release_startup_code() {
        Ok(bytes) => tracing::debug!(bytes, "start-up code pages released"),
        Err(e) => tracing::debug!(error = %e, "start-up code pages kept"),
    }
}

/// How often configuration changes are looked for by
/// [`release_code_after_changes`].
const CODE_RELEASE_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// Releases the code pages again once configuration changes have stopped
/// for a [`CODE_RELEASE_CHECK`] period: the Admin API, the store and the
/// compiler run code that serving requests never does.
async fn release_code_after_changes(live: gateway::snapshot::SharedSnapshot) {
    let mut released = live.load().version;
    let mut seen = released;
    loop {
        tokio::time::sleep(CODE_RELEASE_CHECK).await;
        let version = live.load().version;
        if version == seen && version != released {
            release_startup_code();
            released = version;
        }
        seen = version;
    }
}

/// `worker_processes: auto` (the default) is one worker per CPU the
/// process may run on, as nginx counts them; the Admin API and the rest
/// keep a thread of their own.
fn workers_for_auto(mut config: GatewayConfig) -> GatewayConfig {
    if config.worker_threads.is_none() {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        config.worker_threads = Some(cpus);
    }
    config
}

/// Turns transparent huge pages off for this process, unless
/// `MIMALLOC_ALLOW_THP` is set (mimalloc's own switch; `1` keeps them).
///
/// mimalloc advises the kernel to back its arenas with 2 MiB pages, and
/// where THP is in `madvise` mode (most distributions) the kernel then
/// makes a whole 2 MiB range resident as soon as one byte of it is
/// touched. A gateway's memory is mostly small, sparsely touched
/// per-connection state, so that made it hold far more than it used:
/// 28.3 MiB PSS after the keep-alive benchmark instead of 17.5, 38.7 KiB
/// per idle HTTP/2 connection instead of 22.8, for no measurable CPU gain.
/// Failure (an old kernel) only leaves the kernel's default.
fn small_pages_only() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        let _ = rustix::thread::disable_transparent_huge_pages(true);
    }
}

/// An API gateway compatible with Apache APISIX.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// APISIX-style config file. Relative paths in it (the data directory)
    /// are resolved against PATH when the file is PATH/conf/config.yaml.
    #[arg(long, short = 'c', default_value = "conf/config.yaml", global = true)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(clap::Subcommand, Debug, Clone)]
enum Cmd {
    /// Run the gateway in the foreground (the default).
    Start,
    /// Make the running gateway re-read its config file (SIGHUP).
    Reload,
    /// Stop the running gateway gracefully (SIGQUIT).
    Quit,
    /// Stop the running gateway; requests in flight still finish (SIGTERM).
    Stop,
    /// Check the config file and exit.
    Test,
    /// Print the version.
    Version,
    /// Print the nftables and `ip` commands that divert TCP traffic to a
    /// transparent listener on PORT (changes nothing itself).
    TproxySetup {
        /// The transparent listener's port.
        #[arg(long)]
        port: u16,
        /// Divert only traffic arriving on this interface.
        #[arg(long)]
        interface: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    small_pages_only();
    let args = Args::parse();
    // The log first, so that reading the config can already log.
    let (error_log, level) = gateway::error_log::settings(&args.config);
    let to_file = match &error_log {
        Some(path) => match gateway::error_log::open(path) {
            Ok(()) => true,
            Err(e) => {
                eprintln!(
                    "cannot open the error log {}: {e}; logging to stderr",
                    path.display()
                );
                false
            }
        },
        None => false,
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new(level.as_deref().unwrap_or("info"))),
        )
        .with_target(false)
        .with_writer(|| gateway::error_log::Writer)
        .with_ansi(!to_file && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let command = args.command.unwrap_or(Cmd::Start);
    match &command {
        Cmd::Version => {
            println!("ferrogate {}", gateway::VERSION);
            return Ok(());
        }
        Cmd::TproxySetup { port, interface } => {
            print!(
                "{}",
                gateway::tproxy::setup_commands(*port, interface.as_deref())
            );
            return Ok(());
        }
        _ => {}
    }
    let config = GatewayConfig::load(&args.config)
        .map(workers_for_auto)
        .with_context(|| format!("invalid configuration in {}", args.config.display()))?;
    let control = match command {
        Cmd::Test => {
            gateway::check(&config)
                .with_context(|| format!("invalid configuration in {}", args.config.display()))?;
            println!("configuration file {} is valid", args.config.display());
            return Ok(());
        }
        Cmd::Reload => Some(Command::Reload),
        Cmd::Quit => Some(Command::Quit),
        Cmd::Stop => Some(Command::Stop),
        Cmd::Start | Cmd::Version | Cmd::TproxySetup { .. } => None,
    };
    if let Some(control) = control {
        let pid = gateway::control::send(&config.data_dir, control)?;
        println!("sent {control:?} to ferrogate (PID {pid})");
        return Ok(());
    }
    let data_dir = config.data_dir.clone();
    let grace = config.shutdown_grace;
    // worker_processes: 1 runs everything on one thread, like one nginx
    // worker; N > 1 serves requests on N worker threads of their own
    // (`gateway::workers`), this one keeping the Admin API and the rest.
    // (`None` is left only to programs that embed the gateway.)
    let runtime = match config.worker_threads {
        Some(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
    .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        // Handlers before the listeners: a `reload` or a logrotate's USR1
        // sent as soon as a port answers must not meet the signal's default
        // action (exit).
        let mut signals = Signals::install()?;
        let running = gateway::start(config).await?;
        let _pid_file = PidFile::create(&data_dir)?;
        release_startup_code();
        tokio::spawn(release_code_after_changes(running.live.clone()));
        // The thread that serves requests with one worker (with more, each
        // worker thread does this itself).
        tokio::spawn(gateway::alloc::return_free_pages_periodically());
        signals.wait_for_stop(&running, &args.config).await;
        tracing::info!(?grace, "shutting down: finishing requests in flight (signal again to stop at once)");
        tokio::select! {
            _ = running.shutdown(grace) => tracing::info!("stopped"),
            _ = signals.next_stop() => tracing::warn!("second stop signal: stopped without waiting"),
        }
        Ok(())
    })
}

/// The signals the gateway answers.
struct Signals {
    term: Signal,
    int: Signal,
    quit: Signal,
    hup: Signal,
    usr1: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
        })
    }

    /// The next TERM, INT or QUIT.
    async fn next_stop(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
            _ = self.quit.recv() => {}
        }
    }

    /// Waits for TERM, INT or QUIT (graceful stop); on HUP re-reads the
    /// config file and applies what can change while running.
    async fn wait_for_stop(&mut self, running: &gateway::Running, path: &std::path::Path) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.quit.recv() => return,
                _ = self.hup.recv() => match GatewayConfig::load(path).map(workers_for_auto) {
                    Ok(config) => {
                        if let Err(e) = running.reload(config) {
                            tracing::error!(error = %e, "reload failed; previous configuration kept");
                        }
                        release_startup_code();
                    }
                    Err(e) => tracing::error!(error = %e, "config file invalid; previous configuration kept"),
                },
                // logrotate renamed the logs: write to new files.
                _ = self.usr1.recv() => running.reopen_logs(),
            }
        }
    }
}
