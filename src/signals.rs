//! The one task that reads process signals and turns them into decisions.
//!
//! SIGTERM/SIGINT: graceful stop; a second one: fast stop (skip the drain).
//! SIGHUP: the gateway's own: reload the configuration, or re-execute a replaced binary in place
//! (`reload`); vLLM never sees it (vLLM does not handle SIGHUP and dies of it).
//! SIGUSR1/SIGUSR2: forwarded to the child's process group (under `serve`).
//! SIGQUIT: forwarded, then a graceful stop.

use futures_util::StreamExt;
use nix::sys::signal::Signal;
use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook_tokio::Signals;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The gateway's shutdown triggers. `main` makes them; `run` and its tasks watch them.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Cancelled on the first stop request: readiness turns 503, the listener closes, draining begins.
    pub graceful: CancellationToken,
    /// Cancelled on the second: the drain is cut short.
    pub fast: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Shutdown::default()
    }

    /// A stop request: graceful the first time, fast after that.
    pub fn request(&self) {
        if self.graceful.is_cancelled() {
            self.fast.cancel();
        } else {
            self.graceful.cancel();
        }
    }
}

/// What a received signal means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalAction {
    Stop,
    Reload,
    Forward(Signal),
    ForwardThenStop(Signal),
}

pub fn action_for(signal: i32) -> Option<SignalAction> {
    Some(match signal {
        SIGTERM | SIGINT => SignalAction::Stop,
        SIGHUP => SignalAction::Reload,
        SIGUSR1 => SignalAction::Forward(Signal::SIGUSR1),
        SIGUSR2 => SignalAction::Forward(Signal::SIGUSR2),
        SIGQUIT => SignalAction::ForwardThenStop(Signal::SIGQUIT),
        _ => return None,
    })
}

/// The signals the gateway handles.
const HANDLED: [i32; 6] = [SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2, SIGQUIT];

/// Installs the handlers, then unblocks the signals on this thread. Done before anything else
/// starts so that no signal is lost to the default action (which for SIGTERM would kill the
/// gateway without stopping the child).
///
/// An in-place upgrade blocks the handled signals across its exec ([`block_for_exec`]): the new
/// image starts with them blocked, so one sent meanwhile waits, pending, until its handlers are
/// installed here instead of killing it.
pub fn install() -> std::io::Result<Signals> {
    let signals = Signals::new(HANDLED)?;
    nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_UNBLOCK,
        Some(&handled_set()),
        None,
    )?;
    Ok(signals)
}

/// Blocks the handled signals on the calling thread, which is about to exec a new image (the
/// mask survives the exec); [`unblock_after_failed_exec`] undoes it.
pub fn block_for_exec() -> std::io::Result<()> {
    nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_BLOCK,
        Some(&handled_set()),
        None,
    )?;
    Ok(())
}

pub fn unblock_after_failed_exec() {
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_UNBLOCK,
        Some(&handled_set()),
        None,
    );
}

fn handled_set() -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    for signal in HANDLED {
        if let Ok(signal) = Signal::try_from(signal) {
            set.add(signal);
        }
    }
    set
}

/// Reads signals until the process ends. Signals to forward go to `forward` (under `serve`, on to
/// the supervisor; with no child they are logged and dropped). Reload requests go to `reload`; one already waiting covers the next (it
/// reads the file after both).
pub async fn handle(
    mut signals: Signals,
    shutdown: Shutdown,
    forward: mpsc::UnboundedSender<Signal>,
    reload: mpsc::Sender<()>,
) {
    while let Some(signal) = signals.next().await {
        let Some(action) = action_for(signal) else {
            continue;
        };
        let name = Signal::try_from(signal).map_or("unknown", Signal::as_str);
        match action {
            SignalAction::Stop => {
                if shutdown.graceful.is_cancelled() {
                    tracing::warn!(signal = name, "second stop signal: skipping the drain");
                } else {
                    tracing::info!(signal = name, "stop signal: shutting down gracefully");
                }
                shutdown.request();
            }
            SignalAction::Reload => {
                tracing::info!(signal = name, "reloading the configuration");
                let _ = reload.try_send(());
            }
            SignalAction::Forward(signal) => {
                tracing::info!(signal = name, "forwarding signal to vLLM");
                let _ = forward.send(signal);
            }
            SignalAction::ForwardThenStop(signal) => {
                tracing::info!(
                    signal = name,
                    "forwarding signal to vLLM, then shutting down"
                );
                let _ = forward.send(signal);
                shutdown.request();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_stop_request_skips_the_drain() {
        let shutdown = Shutdown::new();
        shutdown.request();
        assert!(shutdown.graceful.is_cancelled() && !shutdown.fast.is_cancelled());
        shutdown.request();
        assert!(shutdown.fast.is_cancelled());
    }

    #[test]
    fn signals_map_to_actions() {
        assert_eq!(action_for(SIGTERM), Some(SignalAction::Stop));
        assert_eq!(action_for(SIGHUP), Some(SignalAction::Reload));
        assert_eq!(
            action_for(SIGUSR1),
            Some(SignalAction::Forward(Signal::SIGUSR1))
        );
        assert_eq!(
            action_for(SIGQUIT),
            Some(SignalAction::ForwardThenStop(Signal::SIGQUIT))
        );
    }
}
