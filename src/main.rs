//! The `gateway` binary: parse the command line, dispatch the subcommands, load and validate the
//! configuration, set up logging and everything process-wide (open-files limit, signal handlers,
//! the reaper and subreaper, the metrics recorder), then hand over to [`gateway::run::run`]. See
//! `lib.rs` for the codemap.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use gateway::cli::{Cli, Command, ConfigCommand};
use gateway::config::{self, Config, Mode};
use gateway::lifecycle::outcome::EXIT_FAILURE;
use gateway::reload::{self, Reloader};
use gateway::run::Context;
use gateway::signals::{self, Shutdown};
use gateway::{commands, proxy, supervisor, telemetry};
use tokio::sync::mpsc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (mode, flags) = match cli.command {
        None => (Mode::Standalone, cli.proxy.0),
        Some(Command::Serve(serve)) => (Mode::Serve, serve.0),
        Some(Command::Config(ConfigCommand::Check { file })) => {
            return commands::check_config(&file);
        }
        Some(Command::Healthcheck(args)) => return commands::healthcheck(&args.url, args.timeout),
        Some(Command::Guard { pgid, grace_ms }) => {
            return supervisor::guard::run(pgid, Duration::from_millis(grace_ms));
        }
    };
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
    if let Err(error) = telemetry::init_logging(&config.log.level, config.log.format) {
        eprintln!("gateway: cannot set up logging: {error}");
        return ExitCode::from(2);
    }
    let loaded = config.clone();
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
    let reloader = Reloader::new(source, loaded, &config);
    let code = runtime.block_on(serve(config, reloader));
    // Tasks still draining after the deadline are abandoned rather than awaited.
    runtime.shutdown_timeout(Duration::from_millis(100));
    telemetry::flush_logs();
    ExitCode::from(code)
}

/// Everything after configuration: signal handlers, the reaper, metrics, the reload and signal
/// tasks, then [`gateway::run::run`]. Returns the process exit code.
async fn serve(config: Config, reloader: Reloader) -> u8 {
    let signals = match signals::install() {
        Ok(signals) => signals,
        Err(error) => {
            tracing::error!(%error, "cannot install signal handlers");
            return EXIT_FAILURE;
        }
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
    // listens (and accepts connections) only once the gateway may serve.
    let socket = match proxy::workers::bind(config.listen) {
        Ok(socket) => socket,
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
