//! The `gateway` binary: parse the command line, dispatch the subcommands, take over what a
//! previous image handed over (after an in-place upgrade), load and validate the configuration,
//! set up logging and everything process-wide (open-files limit, signal handlers, the reaper and
//! subreaper, the metrics recorder, the allocator), then hand over to [`gateway::run::run`]. See
//! `lib.rs` for the codemap.

use std::os::fd::{FromRawFd, IntoRawFd};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use gateway::cli::{Cli, Command, ConfigCommand};
use gateway::config::{self, Config, Mode};
use gateway::lifecycle::outcome::EXIT_FAILURE;
use gateway::reload::{self, Reloader};
use gateway::run::Context;
use gateway::signals::{self, Shutdown};
use gateway::supervisor::Inherited;
use gateway::upgrade::exec::CHECK_VAR;
use gateway::upgrade::takeover::{self, Takeover};
use gateway::{commands, proxy, supervisor, telemetry};
use tokio::net::TcpSocket;
use tokio::sync::mpsc;

/// jemalloc rather than glibc's malloc, for the memory each open stream holds (measured in
/// tests/bench/README.md, "How the figures came about"). jemalloc keeps buffers of one size class
/// together, page-aligned, so a buffer written only at its start costs one page; and with no decay,
/// a page freed as a stream gets under way (the request's read buffer, its head on the way up) goes
/// back to the system at once instead of staying resident for 10 s. With no decay, though, a slab
/// that empties is handed back at once, and the next request faults its pages in again (a page
/// fault and a TLB shootdown). Under load, slabs of one request's buffers (hyper's 8 KB read
/// buffer, the request's future) emptied whenever a thread cache gave back what it held: at its
/// garbage collection, and when a burst of responses overflowed its 20 slots for a size. The caches
/// are therefore collected once a gigabyte allocated instead of every 64 KB, and hold at least 64
/// of each small size.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (`_RJEM_MALLOC_CONF` in the environment still wins).
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static JEMALLOC_CONF: &[u8] =
    b"dirty_decay_ms:0,muzzy_decay_ms:0,tcache_gc_incr_bytes:1073741824,tcache_nslots_small_min:64\0";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (mode, flags) = match cli.command {
        None => (Mode::Standalone, cli.proxy.0),
        Some(Command::Serve(serve)) => (Mode::Serve, serve.0),
        Some(Command::Config(ConfigCommand::Check { file, serve })) => {
            return commands::check_config(&file, serve);
        }
        Some(Command::Healthcheck(args)) => return commands::healthcheck(&args.url, args.timeout),
        Some(Command::Guard { grace_ms }) => {
            return supervisor::guard::run(Duration::from_millis(grace_ms));
        }
    };
    // Before any other thread starts, so that every thread inherits the block (see `signals`).
    if let Err(error) = signals::block() {
        eprintln!("gateway: cannot block signals: {error}");
        return ExitCode::from(1);
    }
    // First, before anything opens a descriptor: the numbers a hand-over names are inherited ones.
    let takeover = takeover::take();
    let env = |name: &str| std::env::var(name).ok();
    // Kept for SIGHUP, which loads the configuration again the same way.
    let source = config::Source { flags, mode };
    let mut config = match source.load(&env) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("gateway: invalid configuration:\n{errors}");
            return ExitCode::from(2);
        }
    };
    if std::env::var_os(CHECK_VAR).is_some() {
        // The trial run before an in-place upgrade: this binary runs here, and takes this
        // configuration.
        return ExitCode::SUCCESS;
    }
    if let Err(error) = telemetry::init_logging(&config.log.level, config.log.format) {
        eprintln!("gateway: cannot set up logging: {error}");
        return ExitCode::from(2);
    }
    let loaded = config.clone();
    if let (Some(taken), Some(serve)) = (&takeover, &config.serve) {
        log_takeover(taken, serve.vllm_port);
        // The running vLLM listens where the previous image started it.
        if let Some(port) = taken.vllm_port {
            config.set_vllm_port(port);
        }
    }
    if let Err(error) = config.resolve_vllm_port() {
        eprintln!("gateway: cannot pick a free port for vLLM: {error}");
        return ExitCode::from(1);
    }
    raise_open_files_limit();
    // The main runtime carries the supervisor, signals, notify and the health poller; requests run
    // on the proxy's own worker threads. Two threads keep the supervisor loop (and with it the
    // watchdog) going while the other relays a flood of vLLM output.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("gateway: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let (upgrade_tx, upgrades) = mpsc::channel(1);
    let reloader = Reloader::new(source, loaded, &config, upgrade_tx);
    let code = runtime.block_on(serve(config, reloader, upgrades, takeover));
    // Tasks still draining after the deadline are abandoned rather than awaited.
    runtime.shutdown_timeout(Duration::from_millis(100));
    telemetry::flush_logs();
    ExitCode::from(code)
}

/// Everything after configuration: signal handlers, the reaper, metrics, the reload and signal
/// tasks, then [`gateway::run::run`]. Returns the process exit code.
async fn serve(
    config: Config,
    reloader: Reloader,
    upgrades: mpsc::Receiver<gateway::reload::UpgradeRequest>,
    takeover: Option<Takeover>,
) -> u8 {
    let signals = match signals::install() {
        Ok(signals) => signals,
        Err(error) => {
            tracing::error!(%error, "cannot install signal handlers");
            return EXIT_FAILURE;
        }
    };
    // An adopted vLLM is registered with the reaper before it starts reaping, so that an exit
    // during the exec is delivered to the supervisor rather than reaped as an orphan's.
    let upgraded = takeover.is_some();
    let (listener, health, inherited) = match takeover {
        Some(taken) if config.serve.is_some() => (
            taken.listener,
            taken.health,
            Some(Inherited::adopt(taken.restarts, taken.history, taken.child)),
        ),
        Some(taken) => (taken.listener, taken.health, None),
        None => (None, None, None),
    };
    supervisor::reaper::start();
    let metrics = match telemetry::init_metrics() {
        Ok(handle) => Some(handle),
        Err(error) => {
            tracing::warn!(%error, "metrics are disabled");
            None
        }
    };
    if let Some(handle) = &metrics {
        tokio::spawn(telemetry::run_metrics_upkeep(handle.clone()));
    }
    // The address is taken now, so that a port in use fails the start before a model loads; it
    // listens (and accepts connections) only once the gateway may serve. After an upgrade, the
    // previous image's socket, listening all along.
    let socket = match listener {
        Some(listener) => inherited_socket(listener, config.listen, "keys `host`/`port`"),
        None => proxy::workers::bind(config.listen),
    };
    let socket = match socket {
        Ok(socket) => socket,
        Err(error) => {
            tracing::error!("{error:#}");
            return EXIT_FAILURE;
        }
    };
    let health = match health_socket(health, &config) {
        Ok(health) => health,
        // After an in-place upgrade vLLM runs already: the health listener is not worth it.
        Err(error) if upgraded => {
            tracing::error!(
                "{error:#}; serving without a health listener (restart the gateway to open it)"
            );
            None
        }
        Err(error) => {
            tracing::error!("{error:#}");
            return EXIT_FAILURE;
        }
    };
    let shutdown = Shutdown::new();
    let (forward_tx, forward_rx) = mpsc::unbounded_channel();
    let (reload_tx, reload_rx) = mpsc::channel(1);
    let live = reloader.live();
    let reload_task = tokio::spawn(reload::run(reloader, reload_rx));
    let signal_task = tokio::spawn(signals::handle(
        signals,
        shutdown.clone(),
        forward_tx,
        reload_tx,
    ));
    let context = Context {
        live,
        shutdown,
        forward: forward_rx,
        metrics,
        upgrades,
        inherited,
        health,
    };
    let code = match gateway::run::run(config, socket, context).await {
        Ok(code) => code,
        Err(error) => {
            tracing::error!("{error:#}");
            EXIT_FAILURE
        }
    };
    signal_task.abort();
    reload_task.abort();
    code
}

/// Logs what was taken over from the previous image, and what was not.
fn log_takeover(taken: &Takeover, configured_vllm_port: u16) {
    match &taken.refused {
        None => tracing::info!(
            from_version = taken.from_version.as_deref().unwrap_or("unknown"),
            to_version = env!("CARGO_PKG_VERSION"),
            vllm_pid = taken.child.as_ref().map(|child| child.pid),
            "upgraded in place: took over the listening socket and vLLM from the previous image"
        ),
        Some(reason) => tracing::error!(
            %reason,
            listener = taken.listener.is_some(),
            vllm_pid = taken.child.as_ref().map(|child| child.pid),
            "refused the previous image's hand-over; serving with what could still be taken (vLLM, if adopted, is probed as if loading)"
        ),
    }
    if let Some(port) = taken.vllm_port
        && configured_vllm_port != 0
        && configured_vllm_port != port
    {
        tracing::warn!(
            vllm_port = port,
            configured = configured_vllm_port,
            "configuration key `vllm_port` changed but needs a restart; the running value stays"
        );
    }
}

/// A listening socket a previous image handed over, as the socket `run` listens on; `configured`
/// is where the configuration (`keys`) would have it now, which takes a restart.
fn inherited_socket(
    listener: std::os::fd::OwnedFd,
    configured: std::net::SocketAddr,
    keys: &str,
) -> anyhow::Result<TcpSocket> {
    let listener = std::net::TcpListener::from(listener);
    let address = listener.local_addr()?;
    if address != configured && configured.port() != 0 {
        tracing::warn!(listen = %address, configured = %configured, "configuration {keys} changed, which takes a restart; serving on the inherited socket");
    }
    Ok(socket_from(listener)?)
}

/// The health listener's socket: the one a previous image handed over, else bound now (so that a
/// port in use fails the start; `serve` then leaves it out after an in-place upgrade, where vLLM
/// runs already), if `health_port` is set.
fn health_socket(
    inherited: Option<std::os::fd::OwnedFd>,
    config: &Config,
) -> anyhow::Result<Option<TcpSocket>> {
    let Some(port) = config.health_port else {
        if inherited.is_some() {
            tracing::warn!(
                "configuration key `health_port` was removed but needs a restart; the health listener stays open"
            );
        }
        return Ok(inherited
            .map(std::net::TcpListener::from)
            .map(socket_from)
            .transpose()?);
    };
    let address = std::net::SocketAddr::new(config.listen.ip(), port);
    match inherited {
        Some(inherited) => inherited_socket(inherited, address, "key `health_port`").map(Some),
        None => proxy::workers::bind(address)
            .map(Some)
            .map_err(|error| error.context("the health listener (`health_port`)")),
    }
}

/// A listening socket a previous image handed over, as a socket `run` listens on.
fn socket_from(listener: std::net::TcpListener) -> std::io::Result<TcpSocket> {
    listener.set_nonblocking(true)?;
    // SAFETY: the descriptor is the listener's, given up by `into_raw_fd` to the socket alone.
    Ok(unsafe { TcpSocket::from_raw_fd(listener.into_raw_fd()) })
}

/// Raises the soft open-files limit to the hard limit, as vLLM does: each proxied stream holds two
/// sockets, and systemd's default soft limit (1024) would cap the gateway near 500 streams.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(%error, soft, hard, "cannot raise the open-files limit");
            } else {
                tracing::debug!(from = soft, to = hard, "raised the open-files limit");
            }
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot read the open-files limit"),
    }
}
