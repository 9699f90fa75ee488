//! The only place that calls `waitpid`. On every SIGCHLD it reaps every exited child with
//! `waitpid(-1, WNOHANG)`: the supervised child's status goes to whoever registered its pid, and
//! orphans re-parented to the gateway (as PID 1 or as a subreaper) are reaped and logged.
//!
//! Owning all reaping avoids the classic bug of a blanket reaper stealing the exit status another
//! waiter expects. Registration happens under the same lock as reaping, inside the spawn, so a
//! child that dies instantly cannot be reaped before its waiter is known.

use std::collections::HashMap;
use std::sync::OnceLock;

use futures_util::StreamExt;
use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use parking_lot::{Mutex, MutexGuard};
use signal_hook::consts::signal::SIGCHLD;
use tokio::sync::oneshot;

use crate::lifecycle::state::ExitInfo;

/// Waiters by pid.
type Waiters = HashMap<i32, oneshot::Sender<ExitInfo>>;

fn waiters() -> &'static Mutex<Waiters> {
    static WAITERS: OnceLock<Mutex<Waiters>> = OnceLock::new();
    WAITERS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Locks the waiter table. Spawning holds this lock from fork to registration.
pub fn lock() -> MutexGuard<'static, Waiters> {
    waiters().lock()
}

/// Registers interest in `pid`'s exit. Call with the lock from [`lock`] held since the fork.
pub fn register(table: &mut Waiters, pid: i32) -> oneshot::Receiver<ExitInfo> {
    let (sender, receiver) = oneshot::channel();
    table.insert(pid, sender);
    receiver
}

/// Starts the reaping task (once per process) and makes the gateway a subreaper when it is not
/// PID 1, so grandchildren whose parent died are re-parented to it and reaped here.
pub fn start() {
    static STARTED: OnceLock<()> = OnceLock::new();
    if STARTED.set(()).is_err() {
        return;
    }
    if std::process::id() != 1
        && let Err(error) = nix::sys::prctl::set_child_subreaper(true)
    {
        tracing::warn!(%error, "cannot become a child subreaper; orphaned grandchildren go to init");
    }
    let mut signals = match signal_hook_tokio::Signals::new([SIGCHLD]) {
        Ok(signals) => signals,
        Err(error) => {
            tracing::error!(%error, "cannot watch SIGCHLD; exited children will not be reaped");
            return;
        }
    };
    tokio::spawn(async move {
        reap_all();
        while signals.next().await.is_some() {
            reap_all();
        }
    });
}

/// Reaps every child that has exited, without blocking.
pub fn reap_all() {
    let mut table = lock();
    loop {
        let (pid, info) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, ExitInfo::Code(code)),
            Ok(WaitStatus::Signaled(pid, signal, _)) => (pid, ExitInfo::Signal(signal as i32)),
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(error) => {
                tracing::warn!(%error, "waitpid failed");
                return;
            }
        };
        match table.remove(&pid.as_raw()) {
            Some(waiter) => {
                let _ = waiter.send(info);
            }
            None => tracing::debug!(pid = pid.as_raw(), exit = %info, "reaped an orphaned process"),
        }
    }
}
