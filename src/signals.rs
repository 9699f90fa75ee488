//! The one task that reads process signals and turns them into decisions.
//!
//! SIGTERM/SIGINT: graceful stop; a second one: fast stop (skip the drain).
//! SIGHUP: the gateway's own: reload the configuration, or re-execute a replaced binary in place
//! (`reload`); vLLM never sees it (vLLM does not handle SIGHUP and dies of it).
//! SIGUSR1/SIGUSR2: forwarded to the child's process group (under `serve`), which vLLM dies of
//! unless a build of it handles them: the supervisor's log line says so.
//! SIGQUIT: forwarded, then a graceful stop.
//!
//! Every thread of the gateway blocks these signals but one, `gateway-signals`, which does
//! nothing but take them (their handlers run there and wake the task). So the gateway can hold
//! them all back at once, as an in-place upgrade does across its exec: a signal sent meanwhile
//! then waits for the new image instead of being lost with the old one.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::StreamExt;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
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

/// Set by a stop signal's handler itself, at once, where the signal task may read the signal
/// only later: an in-place upgrade's exec must not lose a stop that came just before it.
static STOP_RECEIVED: AtomicBool = AtomicBool::new(false);

/// A change to the mask of the thread that takes the signals, and where it answers.
type MaskRequest = (SigmaskHow, std::sync::mpsc::SyncSender<nix::Result<()>>);

/// The way to the thread that takes the signals, once [`install`] has started it.
static RECEIVER: OnceLock<std::sync::mpsc::Sender<MaskRequest>> = OnceLock::new();

/// Blocks the handled signals on the calling thread. `main` calls it before it starts any other
/// thread, so every thread inherits the block, and only the one [`install`] starts takes the
/// signals: an in-place upgrade can then hold them all back across its exec ([`hold`]). A new
/// image starts with them blocked (the mask survives the exec), so one sent meanwhile waits,
/// pending, for its handlers.
pub fn block() -> nix::Result<()> {
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&handled_set()), None)
}

/// Installs the handlers, and starts the thread that takes the signals, the only one that does
/// not block them: its handlers run there. A signal that came before (since [`block`], or
/// across an upgrade's exec) was pending meanwhile and arrives now; none is lost to the default
/// action, which for SIGTERM would kill the gateway without stopping the child.
pub fn install() -> std::io::Result<Signals> {
    let signals = Signals::new(HANDLED)?;
    for signal in [SIGTERM, SIGINT, SIGQUIT] {
        signal_hook::flag::register(signal, &STOP_RECEIVED)?;
    }
    if RECEIVER.get().is_none() {
        let (requests, received) = std::sync::mpsc::channel::<MaskRequest>();
        std::thread::Builder::new()
            .name("gateway-signals".into())
            .spawn(move || {
                // Handlers interrupt this wait; nothing else runs here.
                while let Ok((how, done)) = received.recv() {
                    let _ = done.send(pthread_sigmask(how, Some(&handled_set()), None));
                }
            })?;
        let _ = RECEIVER.set(requests);
    }
    set_receiver_mask(SigmaskHow::SIG_UNBLOCK)?;
    Ok(signals)
}

/// Holds the handled signals back until the [`Held`] is dropped: the thread that takes them
/// blocks them too, so a signal sent meanwhile stays pending, and across an exec it waits for
/// the new image's handlers. Only a handler that ran before the hold can have been missed by the
/// signal task yet; for a stop, [`Held::stop_received`] tells.
pub fn hold() -> std::io::Result<Held> {
    set_receiver_mask(SigmaskHow::SIG_BLOCK)?;
    Ok(Held(()))
}

/// The handled signals held back, until dropped ([`hold`]).
pub struct Held(());

impl Held {
    /// Whether a stop signal has come, even one the signal task has not acted on yet.
    pub fn stop_received(&self) -> bool {
        STOP_RECEIVED.load(Ordering::SeqCst)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = set_receiver_mask(SigmaskHow::SIG_UNBLOCK);
    }
}

/// Changes the mask of the thread that takes the signals, and waits until it has.
fn set_receiver_mask(how: SigmaskHow) -> std::io::Result<()> {
    let gone = || std::io::Error::other("the thread that takes the signals is not running");
    let receiver = RECEIVER.get().ok_or_else(gone)?;
    let (done, answer) = std::sync::mpsc::sync_channel(1);
    receiver.send((how, done)).map_err(|_| gone())?;
    Ok(answer.recv().map_err(|_| gone())??)
}

fn handled_set() -> SigSet {
    let mut set = SigSet::empty();
    for signal in HANDLED {
        if let Ok(signal) = Signal::try_from(signal) {
            set.add(signal);
        }
    }
    set
}

/// Reads signals until the process ends. Signals to forward go to `forward` (under `serve`, on to
/// the supervisor; standalone, the channel is closed and they are logged as ignored). Reload
/// requests go to `reload`; one already waiting covers the next (it reads the file after both).
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
                if forward.send(signal).is_ok() {
                    tracing::info!(signal = name, "signal for vLLM received");
                } else {
                    tracing::info!(signal = name, "signal ignored: the gateway runs no vLLM");
                }
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
