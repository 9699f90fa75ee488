//! The signal task: records every signal and turns stop signals into a graceful shutdown.

use std::sync::{Arc, PoisonError};

use futures_util::StreamExt;
use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook_tokio::Signals;
use tokio::sync::watch;

use crate::log::{exit_now, say};
use crate::state::AppState;

pub(crate) async fn handle_signals(
    mut signals: Signals,
    state: Arc<AppState>,
    shutdown: watch::Sender<bool>,
) {
    while let Some(signal) = signals.next().await {
        let name = signal_name(signal);
        state
            .stats
            .signals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(name);
        say(format_args!("INFO:     received {name}"));
        let stops = match signal {
            SIGTERM | SIGINT if state.knobs.ignore_sigterm => {
                say(format_args!(
                    "INFO:     ignoring {name} as MOCK_VLLM_IGNORE_SIGTERM asks"
                ));
                false
            }
            SIGTERM | SIGINT | SIGQUIT => true,
            _ => false,
        };
        if !stops {
            continue;
        }
        if *shutdown.borrow() {
            // Like uvicorn's force quit on a second Ctrl+C.
            say(format_args!(
                "INFO:     Forced exit on a second stop signal"
            ));
            exit_now(0);
        }
        say(format_args!("INFO:     Shutting down"));
        shutdown.send_replace(true);
    }
}

pub(crate) fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGTERM => "SIGTERM",
        SIGINT => "SIGINT",
        SIGHUP => "SIGHUP",
        SIGUSR1 => "SIGUSR1",
        SIGUSR2 => "SIGUSR2",
        SIGQUIT => "SIGQUIT",
        _ => "UNKNOWN",
    }
}
