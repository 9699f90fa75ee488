//! Start-up and the run: bind, wait out the startup delay, listen, route, serve (`conn`), and stop
//! gracefully within the shutdown grace.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::middleware;
use axum::routing::{MethodRouter, get, post};
use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook_tokio::Signals;
use tokio::net::TcpSocket;
use tokio::sync::{oneshot, watch};
use tokio::time::sleep;

use crate::chat::create_chat_completion;
use crate::cli::{Cli, VERSION};
use crate::completions::create_completion;
use crate::conn::serve;
use crate::control::{exit_on_request, hang_health, last_request, stats, unhang_health};
use crate::engine;
use crate::knobs::Knobs;
use crate::log::{complain, exit_now, say};
use crate::metrics::metrics;
use crate::middleware::{
    add_server_header, add_vary_origin, echo_request_id, log_access, require_json,
    track_api_request,
};
use crate::models::{health, list_models, version};
use crate::openai::{method_not_allowed, not_found, only_get_allowed};
use crate::process::{append_pid_line, spawn_grandchild, start_flood};
use crate::responses::create_response;
use crate::signals::handle_signals;
use crate::state::AppState;
use crate::tokenize::{detokenize, tokenize};

/// uvicorn's listen backlog, which vLLM keeps.
pub(crate) const LISTEN_BACKLOG: u32 = 1024;

/// Installs the signal handlers, does the start-up chores the knobs ask for, then serves until a
/// stop signal.
pub(crate) async fn start(cli: Cli, knobs: Knobs) -> Result<(), String> {
    let mut handled = vec![SIGTERM, SIGINT, SIGQUIT];
    // Without the knobs SIGHUP, SIGUSR1 and SIGUSR2 keep the action they inherited, as in vLLM,
    // which installs no handler for them: normally that action kills the process.
    if knobs.ignore_sighup {
        handled.push(SIGHUP);
    }
    if knobs.handle_sigusr {
        handled.extend([SIGUSR1, SIGUSR2]);
    }
    let signals = Signals::new(handled)
        .map_err(|error| format!("cannot install signal handlers: {error}"))?;
    say(format_args!(
        "INFO:     Started server process [{}]",
        std::process::id()
    ));
    say(format_args!(
        "INFO:     mock-vllm {VERSION} serving model {:?}{}",
        cli.served_model(),
        if !cli.api_keys.is_empty() {
            " (API key required)"
        } else {
            ""
        }
    ));
    let grandchild = if knobs.spawn_grandchild {
        Some(spawn_grandchild(knobs.detach_grandchild)?)
    } else {
        None
    };
    if knobs.flood {
        start_flood()?;
    }
    let engine = if knobs.engine_processes {
        Some(engine::spawn_engine()?)
    } else {
        None
    };
    if let Some(path) = &knobs.pid_file {
        append_pid_line(path, grandchild, engine.as_ref().map(|engine| engine.pid))?;
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let state = Arc::new(AppState::new(
        &cli,
        knobs,
        engine.as_ref().map(|engine| engine.pid),
        shutdown_rx.clone(),
    ));
    tokio::spawn(watch_engine(
        Arc::clone(&state),
        engine.map(|engine| engine.exited),
        shutdown_tx.clone(),
    ));
    tokio::spawn(handle_signals(signals, Arc::clone(&state), shutdown_tx));
    let result = run(&cli, state, shutdown_rx).await;
    say(format_args!(
        "INFO:     Finished server process [{}]",
        std::process::id()
    ));
    result
}

/// Binds, waits out the startup delay, listens and serves until `shutdown` turns true, then gives
/// open responses the shutdown grace to finish.
pub(crate) async fn run(
    cli: &Cli,
    state: Arc<AppState>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    let addr = resolve(&cli.host, cli.port).await?;
    let socket = bind(addr).map_err(|error| bind_error(addr, &error))?;
    tokio::select! {
        () = sleep(state.knobs.startup_delay) => {}
        () = stop_requested(shutdown.clone()) => return Ok(()),
    }
    let listener = socket
        .listen(LISTEN_BACKLOG)
        .map_err(|error| bind_error(addr, &error))?;
    let local_addr = listener
        .local_addr()
        .map_err(|error| format!("cannot read the listening address: {error}"))?;
    say(format_args!("INFO:     Waiting for application startup."));
    say(format_args!("INFO:     Application startup complete."));
    say(format_args!(
        "INFO:     Uvicorn running on http://{local_addr} (Press CTRL+C to quit)"
    ));
    start_timers(&state);

    let grace = state.knobs.shutdown_grace;
    let stop_listening = state.stop_listening.clone();
    let stop_serving = shutdown.clone();
    let server = serve(
        listener,
        app(Arc::clone(&state)),
        Arc::clone(&state),
        async move {
            tokio::select! {
                () = stop_requested(stop_serving) => {}
                () = stop_listening.cancelled() => {}
            }
        },
    );
    tokio::select! {
        () = server => {
            if state.stop_listening.is_cancelled() {
                // `/_mock/exit?linger=` ends the process when the linger is over.
                std::future::pending::<()>().await;
            }
        }
        () = grace_expired(shutdown, grace) => {
            say(format_args!(
                "INFO:     Gave up waiting for open responses after {}",
                humantime::format_duration(grace)
            ));
        }
    }
    say(format_args!("INFO:     Waiting for application shutdown."));
    say(format_args!("INFO:     Application shutdown complete."));
    Ok(())
}

/// The whole HTTP surface, without sockets, so that it can be driven directly.
pub(crate) fn app(state: Arc<AppState>) -> Router {
    let json_routes = Router::new()
        .route("/v1/responses", post(create_response))
        .route("/v1/chat/completions", post(create_chat_completion))
        .route("/v1/completions", post(create_completion))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(middleware::from_fn(require_json));
    Router::new()
        .route("/health", get_only(health))
        // SageMaker's name for `/health`, which vLLM serves for GET and POST alike (as two
        // routes, the GET one first, so that a 405 allows only GET).
        .route("/ping", get_only(health).post(health))
        .route("/version", get_only(version))
        .route("/v1/models", get_only(list_models))
        .route("/metrics", get(metrics))
        .merge(json_routes)
        .route("/_mock/last-request", get(last_request))
        .route("/_mock/stats", get(stats))
        .route("/_mock/hang-health", post(hang_health))
        .route("/_mock/unhang-health", post(unhang_health))
        .route("/_mock/exit", post(exit_on_request))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // The tracking middleware has already bounded and buffered the body.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn(add_vary_origin))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            track_api_request,
        ))
        .layer(middleware::from_fn(log_access))
        .layer(middleware::from_fn(echo_request_id))
        .layer(middleware::from_fn(add_server_header))
        .with_state(state)
}

/// A GET route of vLLM's (`/health`, `/ping`, `/version`, `/v1/models`), served as FastAPI serves
/// one: unlike axum, FastAPI answers no HEAD for it, and its 405 allows GET alone. `/metrics`, an
/// app of its own mounted in vLLM's, does answer HEAD.
fn get_only<H, T>(handler: H) -> MethodRouter<Arc<AppState>>
where
    H: Handler<T, Arc<AppState>>,
    T: 'static,
{
    get(handler)
        .head(only_get_allowed)
        .fallback(only_get_allowed)
}

/// Starts the timers that crash the process or hang `/health` some time after listening.
pub(crate) fn start_timers(state: &Arc<AppState>) {
    if let Some(after) = state.knobs.crash_after {
        let code = state.knobs.exit_code;
        tokio::spawn(async move {
            sleep(after).await;
            complain(format_args!(
                "ERROR:    crashing with exit code {code} as MOCK_VLLM_CRASH_AFTER asks"
            ));
            exit_now(code);
        });
    }
    if let Some(after) = state.knobs.engine_die_after {
        let state = Arc::clone(state);
        tokio::spawn(async move {
            sleep(after).await;
            complain(format_args!(
                "ERROR:    killing the engine as MOCK_VLLM_ENGINE_DIE_AFTER asks"
            ));
            if state.engine_pid.is_some() {
                engine::kill_engine();
            } else {
                state.kill_simulated_engine.cancel();
            }
        });
    }
    if let Some(after) = state.knobs.hang_health_after {
        let state = Arc::clone(state);
        tokio::spawn(async move {
            sleep(after).await;
            state.stats.health_hung.store(true, Ordering::SeqCst);
            say(format_args!(
                "INFO:     /health now hangs as MOCK_VLLM_HANG_HEALTH_AFTER asks"
            ));
        });
    }
}

pub(crate) async fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    // vLLM treats an empty host as every interface.
    let host = if host.is_empty() { "0.0.0.0" } else { host };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|error| format!("cannot resolve host {host:?}: {error}"))?
        .next()
        .ok_or_else(|| format!("host {host:?} resolves to no address"))
}

/// Binds without listening, so that the port is ours but connects are refused until `listen`.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

pub(crate) fn bind_error(addr: SocketAddr, error: &io::Error) -> String {
    // uvicorn's wording, which supervisors and people already recognise; Rust's own message ends
    // in a redundant "(os error N)".
    let errno = error.raw_os_error().unwrap_or(0);
    let message = error.to_string();
    let message = message.split(" (os error").next().unwrap_or(&message);
    format!(
        "[Errno {errno}] error while attempting to bind on address {addr}: {}",
        message.to_lowercase()
    )
}

/// Resolves once a stop is requested; never, if the signal task is gone.
pub(crate) async fn stop_requested(mut shutdown: watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

pub(crate) async fn grace_expired(shutdown: watch::Receiver<bool>, grace: Duration) {
    stop_requested(shutdown).await;
    sleep(grace).await;
}

/// Waits for the engine to die; unless the server is stopping anyway, reports it as vLLM does
/// (`/health` answers 503, generation requests 500) for the death linger, or until a generation
/// request met the dead engine, then shuts the server down, which exits 0.
async fn watch_engine(
    state: Arc<AppState>,
    exited: Option<oneshot::Receiver<ExitStatus>>,
    shutdown: watch::Sender<bool>,
) {
    let how = match exited {
        Some(exited) => match exited.await {
            Ok(status) => engine::describe_exit(status),
            // The reaper thread is gone without a status: nothing more to learn.
            Err(_) => return,
        },
        None => {
            state.kill_simulated_engine.cancelled().await;
            "killed".to_owned()
        }
    };
    if *shutdown.borrow() {
        return;
    }
    state.stats.engine_dead.store(true, Ordering::SeqCst);
    state.engine_died.cancel();
    complain(format_args!(
        "ERROR:    Engine core proc EngineCore_DP0 died unexpectedly ({how}), shutting down client."
    ));
    tokio::select! {
        () = sleep(state.knobs.engine_death_linger) => {}
        () = state.end_death_linger.cancelled() => {}
    }
    if !*shutdown.borrow() {
        say(format_args!("INFO:     Shutting down"));
        shutdown.send_replace(true);
    }
}
