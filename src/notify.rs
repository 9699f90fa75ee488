//! systemd notification (`sd_notify`): READY=1, STATUS=, STOPPING=1, EXTEND_TIMEOUT_USEC= and the
//! WATCHDOG=1 keep-alive. The sd-notify crate formats the states and reads the watchdog settings;
//! the datagram is sent here so that abstract sockets (`@name`) work too. Every function is a no-op without
//! `$NOTIFY_SOCKET`, and a failed send is logged, never fatal.
//!
//! Readiness and stopping are sent by `run`; status lines follow the child state ([`follow`]);
//! watchdog pings come from the supervisor loop itself, so a wedged loop misses them.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::status::UpstreamStatus;
use crate::supervisor::state::ChildState;

fn send(states: &[NotifyState<'_>]) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let mut message = String::new();
    for state in states {
        message.push_str(&state.to_string());
        message.push('\n');
    }
    if let Err(error) = send_to(&socket, message.as_bytes()) {
        tracing::debug!(%error, "sd_notify failed");
    }
}

/// Sends one datagram to `$NOTIFY_SOCKET`: a path, or an abstract socket written `@name`
/// (which the sd-notify crate's own sender does not handle).
fn send_to(socket: &std::ffi::OsStr, message: &[u8]) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    let bytes = socket.as_bytes();
    let address = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(std::path::Path::new(socket))?,
    };
    let datagram = UnixDatagram::unbound()?;
    datagram.send_to_addr(message, &address)?;
    Ok(())
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

pub fn watchdog_ping() {
    send(&[NotifyState::Watchdog]);
}

/// Half the watchdog period systemd asked for, when it asked this process (`WATCHDOG_PID` unset
/// or ours).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|period| period / 2)
}

/// How often the start timeout is pushed out while vLLM loads.
const EXTEND_EVERY: Duration = Duration::from_secs(10);

/// Sends a STATUS= line on every state change, and while the child starts, keeps systemd's start
/// timeout just ahead of now (never past the startup deadline), with the elapsed time in STATUS.
pub async fn follow(mut status_rx: watch::Receiver<UpstreamStatus>, startup_timeout: Duration) {
    let mut ticker = tokio::time::interval(EXTEND_EVERY);
    loop {
        let (text, starting_since) = {
            let status = status_rx.borrow_and_update();
            match &*status {
                UpstreamStatus::Child(child) => {
                    let since = match child.state {
                        ChildState::Starting { since, .. } => Some(since),
                        _ => None,
                    };
                    let mut text = child.state.describe();
                    if let ChildState::Backoff { .. } = child.state {
                        if let Some(exit) = child.last_exit {
                            text = format!("vLLM exited ({exit}); {text}");
                        }
                    }
                    (text, since)
                }
                UpstreamStatus::External(_) => return,
            }
        };
        status(&text);
        if let Some(since) = starting_since {
            let deadline = since + startup_timeout;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let extend = remaining.min(EXTEND_EVERY * 3);
            if !extend.is_zero() {
                let usec = u32::try_from(extend.as_micros()).unwrap_or(u32::MAX);
                send(&[NotifyState::ExtendTimeoutUsec(usec)]);
            }
        }
        tokio::select! {
            changed = status_rx.changed() => if changed.is_err() { return },
            _ = ticker.tick(), if starting_since.is_some() => {}
        }
    }
}
