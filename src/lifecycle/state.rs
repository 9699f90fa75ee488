//! The child's life as data: [`ChildState`], the one function that changes it ([`transition`]),
//! and the table of allowed transitions it checks against.
//!
//! ```text
//!   Idle ──spawn──▶ Starting ──/health 200──▶ Ready ◀──probe ok── Unhealthy
//!                    │   ▲                     │ ──probe failed──▶    │
//!        exited or   │   │ delay over          │ exited               │ failures >= threshold
//!   startup_timeout  ▼   │                     ▼                      ▼
//!                  Backoff ◀───────────── (restart policy) ◀──── Stopping
//!                    │                                              │
//!                    └──── policy says stop / gave up / shutdown ───┴──▶ Exited
//! ```
//! An illegal transition is a bug: it is logged and applied anyway, never a panic.

use serde::Serialize;
use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq)]
pub enum ChildState {
    /// Before the first spawn.
    Idle,
    /// Spawned; waiting for `/health` to answer 200.
    Starting { pid: u32, since: Instant },
    /// Serving.
    Ready { pid: u32, since: Instant },
    /// Was ready; the last `failures` probes failed (fewer than the threshold).
    Unhealthy {
        pid: u32,
        failures: u32,
        since: Instant,
    },
    /// SIGTERM sent to the child's group; SIGKILL follows after `stop_timeout`.
    Stopping { pid: u32, reason: StopReason },
    /// Waiting to start attempt `attempt` at `until`.
    Backoff { attempt: u32, until: Instant },
    /// For good: the gateway will not start vLLM again.
    Exited { status: Option<ExitInfo> },
}

/// Why the supervisor stops a running child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Shutdown,
    StartupTimeout,
    Unhealthy,
}

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitInfo {
    Code(i32),
    Signal(i32),
}

impl ExitInfo {
    /// The shell convention: the code, or 128 + the signal number.
    pub fn exit_code(self) -> i32 {
        match self {
            ExitInfo::Code(code) => code,
            ExitInfo::Signal(signal) => 128 + signal,
        }
    }

    pub fn success(self) -> bool {
        self == ExitInfo::Code(0)
    }
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitInfo::Code(code) => write!(f, "exit code {code}"),
            ExitInfo::Signal(signal) => match nix::sys::signal::Signal::try_from(*signal) {
                Ok(name) => write!(f, "signal {signal} ({name})"),
                Err(_) => write!(f, "signal {signal}"),
            },
        }
    }
}

impl ChildState {
    pub fn name(&self) -> &'static str {
        match self {
            ChildState::Idle => "idle",
            ChildState::Starting { .. } => "starting",
            ChildState::Ready { .. } => "ready",
            ChildState::Unhealthy { .. } => "unhealthy",
            ChildState::Stopping { .. } => "stopping",
            ChildState::Backoff { .. } => "restarting",
            ChildState::Exited { .. } => "stopped",
        }
    }

    pub const NAMES: [&'static str; 7] = [
        "idle",
        "starting",
        "ready",
        "unhealthy",
        "stopping",
        "restarting",
        "stopped",
    ];

    pub fn pid(&self) -> Option<u32> {
        match self {
            ChildState::Starting { pid, .. }
            | ChildState::Ready { pid, .. }
            | ChildState::Unhealthy { pid, .. }
            | ChildState::Stopping { pid, .. } => Some(*pid),
            ChildState::Idle | ChildState::Backoff { .. } | ChildState::Exited { .. } => None,
        }
    }

    /// The state in words an operator understands (systemd STATUS=, /readyz `reason`).
    pub fn describe(&self) -> String {
        let now = Instant::now();
        match self {
            ChildState::Idle => "vLLM not started yet".into(),
            ChildState::Starting { since, .. } => {
                format!(
                    "loading model: waiting for vLLM /health ({} s)",
                    now.saturating_duration_since(*since).as_secs()
                )
            }
            ChildState::Ready { .. } => "ready".into(),
            ChildState::Unhealthy { failures, .. } => {
                format!("vLLM /health failed {failures} time(s) in a row")
            }
            ChildState::Stopping { reason, .. } => match reason {
                StopReason::Shutdown => "stopping vLLM".into(),
                StopReason::StartupTimeout => {
                    "stopping vLLM: not ready within startup_timeout".into()
                }
                StopReason::Unhealthy => "stopping vLLM: /health stopped answering".into(),
            },
            ChildState::Backoff { attempt, until } => {
                format!(
                    "restart {attempt} in {} s",
                    until.saturating_duration_since(now).as_secs_f64().ceil() as u64
                )
            }
            ChildState::Exited {
                status: Some(status),
            } => format!("vLLM stopped ({status})"),
            ChildState::Exited { status: None } => "vLLM stopped".into(),
        }
    }
}

/// Allowed (from, to) pairs, by state name.
const ALLOWED_TRANSITIONS: &[(&str, &str)] = &[
    ("idle", "starting"),
    ("idle", "restarting"),
    ("idle", "stopped"),
    ("starting", "ready"),
    ("starting", "stopping"),
    ("starting", "restarting"),
    ("starting", "stopped"),
    ("ready", "unhealthy"),
    ("ready", "stopping"),
    ("ready", "restarting"),
    ("ready", "stopped"),
    ("unhealthy", "ready"),
    ("unhealthy", "unhealthy"),
    ("unhealthy", "stopping"),
    ("unhealthy", "restarting"),
    ("unhealthy", "stopped"),
    ("stopping", "stopping"),
    ("stopping", "restarting"),
    ("stopping", "stopped"),
    ("restarting", "starting"),
    ("restarting", "restarting"),
    ("restarting", "stopped"),
];

pub fn is_allowed(from: &ChildState, to: &ChildState) -> bool {
    ALLOWED_TRANSITIONS.contains(&(from.name(), to.name()))
}

/// Replaces `current` with `next`, logging the change; an illegal change is logged as a bug.
pub fn transition(current: &mut ChildState, next: ChildState) {
    if !is_allowed(current, &next) {
        tracing::error!(
            from = current.name(),
            to = next.name(),
            "illegal child state transition (a bug); applying it anyway"
        );
    } else {
        tracing::info!(
            state = next.name(),
            previous = current.name(),
            pid = next.pid(),
            "vLLM state changed"
        );
    }
    *current = next;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_cycle_is_allowed_and_skipping_backoff_is_not() {
        let now = Instant::now();
        let starting = ChildState::Starting { pid: 1, since: now };
        let ready = ChildState::Ready { pid: 1, since: now };
        let backoff = ChildState::Backoff {
            attempt: 1,
            until: now,
        };
        assert!(is_allowed(&ChildState::Idle, &starting));
        assert!(is_allowed(&starting, &ready));
        assert!(is_allowed(&ready, &backoff));
        assert!(is_allowed(&backoff, &starting));
        assert!(
            !is_allowed(&ready, &starting),
            "a restart always goes through Backoff"
        );
        assert!(
            !is_allowed(&ChildState::Exited { status: None }, &starting),
            "Exited is final"
        );
    }

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(ExitInfo::Code(3).exit_code(), 3);
        assert_eq!(ExitInfo::Signal(9).exit_code(), 137);
        assert_eq!(ExitInfo::Signal(9).to_string(), "signal 9 (SIGKILL)");
    }
}
