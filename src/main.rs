//! The `gateway` binary: parse the command line, load and validate the configuration, set up
//! logging, then hand over to [`gateway::run`]. See `lib.rs` for the codemap.

use std::process::ExitCode;

use clap::Parser;
use gateway::cli::{Cli, Command, ConfigCommand, ProxyArgs};
use gateway::config::{self, Mode};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (mode, proxy_args, serve_args) = match &cli.command {
        None => (Mode::Standalone, &cli.proxy, None),
        Some(Command::Serve(serve)) => (Mode::Serve, &serve.proxy, Some(&**serve)),
        Some(Command::Config(ConfigCommand::Check { file })) => return check_config(file),
        Some(Command::Healthcheck(args)) => return gateway::healthcheck(&args.url, args.timeout),
        Some(Command::Guard { pgid, grace_ms }) => {
            return gateway::supervisor::guard::run(
                *pgid,
                std::time::Duration::from_millis(*grace_ms),
            );
        }
    };
    let env = |name: &str| std::env::var(name).ok();
    // Kept for SIGHUP, which loads the configuration again the same way.
    let source = config::Source {
        proxy_args: proxy_args.clone(),
        serve_args: serve_args.cloned(),
        mode,
    };
    let mut config = match source.load(&env) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("gateway: invalid configuration:\n{errors}");
            return ExitCode::from(2);
        }
    };
    if let Err(error) = gateway::telemetry::init_logging(&config.log.level, config.log.format) {
        eprintln!("gateway: cannot set up logging: {error}");
        return ExitCode::from(2);
    }
    let loaded = config.clone();
    if let Err(error) = config.resolve_vllm_port() {
        eprintln!("gateway: cannot pick a free port for vLLM: {error}");
        return ExitCode::from(1);
    }
    gateway::raise_open_files_limit();
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
    let reloader = gateway::reload::Reloader::new(source, loaded, &config);
    let code = runtime.block_on(gateway::main(config, reloader));
    // Tasks still draining after the deadline are abandoned rather than awaited.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    gateway::telemetry::flush_logs();
    ExitCode::from(code)
}

fn check_config(file: &std::path::Path) -> ExitCode {
    let args = ProxyArgs {
        config: Some(file.to_path_buf()),
        ..ProxyArgs::default()
    };
    match config::load(&args, None, Mode::Check, &|_| None) {
        Ok(_) => {
            println!("{}: ok", file.display());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::from(2)
        }
    }
}
