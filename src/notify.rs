//! systemd notification (`sd_notify`): READY=1, STATUS=, STOPPING=1, EXTEND_TIMEOUT_USEC=, the
//! WATCHDOG=1 keep-alive, and RELOADING=1 then READY=1 around a reload. The sd-notify crate formats the states and reads the watchdog settings;
//! the datagram is sent here so that abstract sockets (`@name`) work too. Every function is a no-op without
//! `$NOTIFY_SOCKET`, and a failed send is logged, never fatal.
//!
//! Readiness is sent by `run`; status lines follow the child state ([`follow`]); STOPPING=1 and the
//! count of requests left go out while the proxy drains ([`report_drain`]); watchdog pings come
//! from the supervisor loop itself, so a wedged loop misses them. A reload is announced only between
//! the first READY=1 and STOPPING=1 ([`reloading`]): before, its READY=1 would pass for the start's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use sd_notify::NotifyState;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::lifecycle::state::ChildState;
use crate::status::UpstreamStatus;

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

/// READY=1 went out.
static READY_SENT: AtomicBool = AtomicBool::new(false);
/// STOPPING=1 went out.
static STOPPING_SENT: AtomicBool = AtomicBool::new(false);

/// Held while READY=1 or RELOADING=1 is sent with its flag read or set, so that a reload that
/// follows a READY=1 (the moment systemd, or a test, can see it) always finds it sent, and none
/// can slip a RELOADING=1 in before the first READY=1.
static READY_ORDER: Mutex<()> = Mutex::new(());

pub fn ready(status: &str) {
    let _order = READY_ORDER.lock();
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
    READY_SENT.store(true, Ordering::Relaxed);
}

pub fn stopping() {
    STOPPING_SENT.store(true, Ordering::Relaxed);
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// A reload under way, as systemd has been told of it (or not).
#[must_use = "a reload announced to systemd must be ended with `done`"]
pub struct Reloading {
    announced: bool,
}

/// Begins a reload: RELOADING=1 with MONOTONIC_USEC= (which systemd requires with it). Nothing is
/// sent before the gateway is ready or once it is stopping.
pub fn reloading() -> Reloading {
    let _order = READY_ORDER.lock();
    let announced = READY_SENT.load(Ordering::Relaxed) && !STOPPING_SENT.load(Ordering::Relaxed);
    if announced {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => send(&[NotifyState::Reloading, now]),
            Err(error) => {
                tracing::debug!(%error, "cannot read the monotonic clock");
                send(&[NotifyState::Reloading]);
            }
        }
    }
    Reloading { announced }
}

impl Reloading {
    /// Ends the reload, applied or refused: READY=1 again, unless a stop began meanwhile.
    pub fn done(self) {
        if self.announced && !STOPPING_SENT.load(Ordering::Relaxed) {
            send(&[NotifyState::Ready]);
        }
    }
}

/// For a drain that has begun: STOPPING=1 at once, then every second how many requests are
/// still being drained, as `in_flight` counts them. Never returns; the caller drops it when the
/// drain is over.
pub async fn report_drain(in_flight: impl Fn() -> i64) {
    STOPPING_SENT.store(true, Ordering::Relaxed);
    let text = draining_status(in_flight());
    send(&[NotifyState::Stopping, NotifyState::Status(&text)]);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    loop {
        ticker.tick().await;
        status(&draining_status(in_flight()));
    }
}

fn draining_status(requests: i64) -> String {
    match requests {
        1 => "draining 1 request".into(),
        n => format!("draining {n} requests"),
    }
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

/// Sends a STATUS= line on every state change. Until the first READY=1 it also keeps systemd's
/// start timeout just ahead of now: while vLLM loads (never more than one period past its startup
/// deadline, so a stuck load still ends at `startup_timeout`), and while the gateway waits to retry a failed start or
/// stops a child that failed to start. The gateway's own restart policy bounds those.
pub async fn follow(mut status_rx: watch::Receiver<UpstreamStatus>, startup_timeout: Duration) {
    let mut ticker = tokio::time::interval(EXTEND_EVERY);
    let mut was_ready = false;
    loop {
        let (text, extend) = {
            let status = status_rx.borrow_and_update();
            let UpstreamStatus::Child(child) = &*status else {
                return;
            };
            was_ready |= matches!(child.state, ChildState::Ready { .. });
            let mut text = child.state.describe();
            if let ChildState::Backoff { .. } = child.state
                && let Some(exit) = child.last_exit
            {
                text = format!("vLLM exited ({exit}); {text}");
            }
            let extend = if was_ready {
                None
            } else {
                start_extension(&child.state, startup_timeout, Instant::now())
            };
            (text, extend)
        };
        status(&text);
        if let Some(extend) = extend.filter(|extend| !extend.is_zero()) {
            let usec = u32::try_from(extend.as_micros()).unwrap_or(u32::MAX);
            send(&[NotifyState::ExtendTimeoutUsec(usec)]);
        }
        tokio::select! {
            changed = status_rx.changed() => if changed.is_err() { return },
            _ = ticker.tick(), if extend.is_some() => {}
        }
    }
}

/// How far to push systemd's start timeout out from `now`, before the first READY=1; `None` when
/// the start is over for good.
fn start_extension(
    state: &ChildState,
    startup_timeout: Duration,
    now: Instant,
) -> Option<Duration> {
    let margin = EXTEND_EVERY * 3;
    match state {
        ChildState::Starting { since, .. } => {
            // Up to the startup deadline plus one period: at the deadline the supervisor stops
            // vLLM and the stop is extended in turn, but only once it has noticed.
            let deadline = *since + startup_timeout + EXTEND_EVERY;
            Some(deadline.saturating_duration_since(now).min(margin))
        }
        ChildState::Backoff { until, .. } => Some(until.saturating_duration_since(now) + margin),
        ChildState::Idle | ChildState::Stopping { .. } => Some(margin),
        ChildState::Ready { .. } | ChildState::Unhealthy { .. } | ChildState::Exited { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_is_extended_to_one_period_past_its_startup_deadline_and_no_further() {
        let since = Instant::now();
        let loading = ChildState::Starting { pid: 1, since };
        let timeout = Duration::from_secs(600);
        let after = |secs| since + Duration::from_secs(secs);
        assert_eq!(
            start_extension(&loading, timeout, after(10)),
            Some(EXTEND_EVERY * 3)
        );
        assert_eq!(
            start_extension(&loading, timeout, after(595)),
            Some(Duration::from_secs(5) + EXTEND_EVERY)
        );
        assert_eq!(
            start_extension(&loading, timeout, after(700)),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn a_backoff_before_the_first_ready_is_covered_until_the_next_start() {
        let now = Instant::now();
        let backoff = ChildState::Backoff {
            attempt: 2,
            until: now + Duration::from_secs(50),
        };
        assert_eq!(
            start_extension(&backoff, Duration::from_secs(600), now),
            Some(Duration::from_secs(50) + EXTEND_EVERY * 3)
        );
        let ready = ChildState::Ready { pid: 1, since: now };
        assert_eq!(start_extension(&ready, Duration::from_secs(600), now), None);
    }
}
