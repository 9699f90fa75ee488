//! The engine's processes, as vLLM runs them: the API server starts `VLLM::EngineCore`, which
//! starts `VLLM::Worker`, both in the server's process group. They are this same executable,
//! re-run with their name as `argv[0]` (and as the thread name that `/proc/<pid>/comm` shows), so
//! that `ps` and `/proc` show what they show for vLLM.
//!
//! What matters to a supervisor is how they live and die, which follows vLLM:
//!
//! - The worker dies with the engine core (a parent-death signal), and the engine core exits 1
//!   when its worker dies.
//! - SIGTERM and SIGINT stop them, and SIGHUP and SIGQUIT kill them as they kill vLLM's (which
//!   handle neither), so stopping the group stops them.
//! - The server stops the engine core whenever it exits on its own or on a stop signal. A SIGKILL
//!   or SIGHUP of the server alone leaves both behind, orphaned, as vLLM's are.
//! - When the engine core dies while the server runs, the server reports it (`/health` answers
//!   503, generation requests 500) for the death linger or until a generation request, then
//!   shuts down and exits 0, as vLLM's API server does.

use std::ffi::CStr;
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use nix::sys::signal::{SigHandler, Signal, kill, signal};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// The name vLLM gives its engine process; `/proc/<pid>/comm` keeps its first 15 bytes.
pub(crate) const ENGINE_CORE: &str = "VLLM::EngineCore";

/// The name vLLM gives its worker process.
pub(crate) const WORKER: &str = "VLLM::Worker";

/// Tells the worker its engine core's pid, so that it can tell whether the engine core died before
/// the worker could ask to die with it. Set only on the worker's command.
const PARENT_PID_VAR: &str = "MOCK_VLLM_WORKER_PARENT_PID";

/// The running engine core's pid, 0 when there is none, so that every exit path can stop it.
static ENGINE_PID: AtomicI32 = AtomicI32::new(0);

/// What this process is, told by the name it was started under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Server,
    EngineCore,
    Worker,
}

/// A started engine core.
pub(crate) struct Engine {
    pub(crate) pid: u32,
    /// Resolves with the engine core's exit status when it exits.
    pub(crate) exited: oneshot::Receiver<ExitStatus>,
}

/// Tells the role from `argv[0]`: the helpers are started under their process names.
pub(crate) fn role() -> Role {
    match std::env::args_os().next() {
        Some(name) if name == ENGINE_CORE => Role::EngineCore,
        Some(name) if name == WORKER => Role::Worker,
        _ => Role::Server,
    }
}

/// Starts the engine core (which starts its worker) in our process group, and a thread that
/// reaps it.
pub(crate) fn spawn_engine() -> Result<Engine, String> {
    let child = spawn_helper(ENGINE_CORE, None)?;
    let pid = child.id();
    ENGINE_PID.store(pid_i32(pid), Ordering::SeqCst);
    let (exited_tx, exited) = oneshot::channel();
    std::thread::Builder::new()
        .name("engine-reaper".to_owned())
        .spawn(move || {
            let mut child = child;
            if let Ok(status) = child.wait() {
                ENGINE_PID.store(0, Ordering::SeqCst);
                let _ = exited_tx.send(status);
            }
        })
        .map_err(|error| format!("cannot start the engine reaper thread: {error}"))?;
    Ok(Engine { pid, exited })
}

/// Asks the engine core to stop, as vLLM's API server does when it shuts down; its worker goes
/// with it. Does nothing when there is no engine core.
pub(crate) fn stop_engine() {
    signal_engine(Signal::SIGTERM);
}

/// Kills the engine core, as a CUDA error or the OOM killer would.
pub(crate) fn kill_engine() {
    signal_engine(Signal::SIGKILL);
}

/// How an engine core's exit reads in the log.
pub(crate) fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => "an unknown status".to_owned(),
    }
}

/// The whole life of a helper process; `main` returns this for the helper roles.
pub(crate) fn run_helper(role: Role) -> ExitCode {
    restore_default_signals();
    let name = match role {
        Role::EngineCore => c"VLLM::EngineCore",
        Role::Worker | Role::Server => c"VLLM::Worker",
    };
    set_process_name(name);
    match role {
        Role::EngineCore => run_engine_core(),
        Role::Worker | Role::Server => run_worker(),
    }
}

fn run_engine_core() -> ExitCode {
    let mut worker = match spawn_helper(WORKER, Some(std::process::id())) {
        Ok(worker) => worker,
        Err(message) => {
            helper_log(format_args!("ERROR:    {message}"));
            return ExitCode::FAILURE;
        }
    };
    helper_log(format_args!(
        "INFO:     {ENGINE_CORE} [{}] started {WORKER} [{}]",
        std::process::id(),
        worker.id()
    ));
    // An engine whose worker died is dead too.
    let status = worker.wait();
    helper_log(format_args!(
        "ERROR:    {ENGINE_CORE} [{}]: {WORKER} exited ({}), exiting",
        std::process::id(),
        status.map_or_else(|error| error.to_string(), describe_exit)
    ));
    ExitCode::FAILURE
}

fn run_worker() -> ExitCode {
    // vLLM's workers go when their engine core goes.
    if let Err(error) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        helper_log(format_args!(
            "WARNING:  cannot set the parent-death signal: {error}"
        ));
    }
    // An engine core that died before the line above left us re-parented already.
    let parent = std::env::var(PARENT_PID_VAR)
        .ok()
        .and_then(|pid| pid.parse::<i32>().ok());
    if parent.is_some_and(|parent| parent != nix::unistd::getppid().as_raw()) {
        return ExitCode::FAILURE;
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn spawn_helper(name: &str, parent: Option<u32>) -> Result<std::process::Child, String> {
    let exe = std::env::current_exe()
        .map_err(|error| format!("cannot find this executable to start {name}: {error}"))?;
    let mut command = Command::new(exe);
    // stdout and stderr are shared, as vLLM's processes share them.
    command.arg0(name).stdin(Stdio::null());
    match parent {
        Some(pid) => command.env(PARENT_PID_VAR, pid.to_string()),
        None => command.env_remove(PARENT_PID_VAR),
    };
    command
        .spawn()
        .map_err(|error| format!("cannot start {name}: {error}"))
}

fn signal_engine(signal: Signal) {
    let pid = ENGINE_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // ESRCH means it is already gone, which is what was wanted.
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// vLLM's engine processes stop on SIGTERM and SIGINT whatever their parent left them (their
/// handlers raise `SystemExit`); the default action does the same here. SIGHUP and SIGQUIT keep
/// what they inherited, as in vLLM, which handles neither.
fn restore_default_signals() {
    for which in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the default disposition is no handler, so no code of ours can run in signal
        // context.
        let _ = unsafe { signal(which, SigHandler::SigDfl) };
    }
}

/// Sets the name `/proc/<pid>/comm` shows (at most 15 bytes are kept, as for vLLM's).
fn set_process_name(name: &CStr) {
    if let Err(error) = nix::sys::prctl::set_name(name) {
        helper_log(format_args!(
            "WARNING:  cannot set the process name: {error}"
        ));
    }
}

/// The helpers have no log writer thread; they write whole lines to stderr, as vLLM's do.
fn helper_log(line: std::fmt::Arguments<'_>) {
    let _ = std::io::stderr()
        .lock()
        .write_all(format!("{line}\n").as_bytes());
}

fn pid_i32(pid: u32) -> i32 {
    i32::try_from(pid).unwrap_or(0)
}
