//! The supervisor's timing as pure functions of the child's state: when its one timer fires
//! ([`next_deadline`]), whether a start ran out of time ([`startup_expired`]), and what a `/health`
//! probe's outcome does to a running child ([`after_probe`]: the streak of failures that makes it
//! hung). The supervisor task acts on them; tests drive them on a paused clock.

use std::time::Duration;

use tokio::time::Instant;

use crate::lifecycle::state::ChildState;

/// The supervisor's pending deadlines besides those the state itself carries.
#[derive(Debug, Clone, Copy)]
pub struct Timers {
    /// When the next `/health` probe is due.
    pub next_probe: Instant,
    /// A probe is in flight: the next one is not due until it is answered.
    pub probe_in_flight: bool,
    /// When SIGKILL follows the SIGTERM of a stop.
    pub kill_at: Option<Instant>,
}

/// The one timer: whichever of the state's deadlines comes first. A probe in flight never holds
/// back the startup deadline.
pub fn next_deadline(
    state: &ChildState,
    startup_timeout: Duration,
    timers: Timers,
    now: Instant,
) -> Instant {
    let far = now + Duration::from_secs(86400);
    match state {
        ChildState::Starting { since, .. } => {
            let startup_deadline = *since + startup_timeout;
            if timers.probe_in_flight {
                startup_deadline
            } else {
                startup_deadline.min(timers.next_probe)
            }
        }
        ChildState::Ready { .. } | ChildState::Unhealthy { .. } => {
            if timers.probe_in_flight {
                far
            } else {
                timers.next_probe
            }
        }
        ChildState::Stopping { .. } => timers.kill_at.unwrap_or(far),
        ChildState::Backoff { until, .. } => *until,
        ChildState::Idle | ChildState::Exited { .. } => far,
    }
}

/// Whether a start has run out of time: still `Starting` at `since + startup_timeout`.
pub fn startup_expired(state: &ChildState, startup_timeout: Duration, now: Instant) -> bool {
    matches!(state, ChildState::Starting { since, .. } if now >= *since + startup_timeout)
}

/// What one probe's outcome does to the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterProbe {
    /// The state stays as it is (still starting, or still ready).
    Same,
    /// Ready from now on: the first 200 of a start, or a 200 after failures.
    Ready,
    /// The `failures`-th failure in a row of a child that was ready, below the threshold.
    Unhealthy { failures: u32 },
    /// `failures` in a row reached `health_failures`: the child is hung and is stopped.
    Hung { failures: u32 },
}

/// The streak rule: a ready child becomes unhealthy at its first failed probe, and hung at
/// `health_failures` failures in a row; one success ends the streak. A starting child's failures
/// count for nothing (`startup_timeout` bounds the start).
pub fn after_probe(state: &ChildState, ok: bool, health_failures: u32) -> AfterProbe {
    match (state, ok) {
        (ChildState::Starting { .. } | ChildState::Unhealthy { .. }, true) => AfterProbe::Ready,
        (ChildState::Ready { .. } | ChildState::Unhealthy { .. }, false) => {
            let failures = match state {
                ChildState::Unhealthy { failures, .. } => failures + 1,
                _ => 1,
            };
            if failures >= health_failures {
                AfterProbe::Hung { failures }
            } else {
                AfterProbe::Unhealthy { failures }
            }
        }
        _ => AfterProbe::Same,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STARTUP_TIMEOUT: Duration = Duration::from_secs(600);
    const POLL: Duration = Duration::from_secs(1);
    const INTERVAL: Duration = Duration::from_secs(5);
    const PROBE_TAKES: Duration = Duration::from_millis(300);

    /// The supervisor's loop over a start whose probes never succeed, each taking `PROBE_TAKES`:
    /// sleeps to the next deadline, then probes or ends the start. Returns when the start ended.
    async fn a_start_that_never_answers() -> Instant {
        let since = Instant::now();
        let state = ChildState::Starting { pid: 1, since };
        let mut timers = Timers {
            next_probe: since + POLL,
            probe_in_flight: false,
            kill_at: None,
        };
        loop {
            let deadline = next_deadline(&state, STARTUP_TIMEOUT, timers, Instant::now());
            let probe_answered = Instant::now() + PROBE_TAKES;
            if timers.probe_in_flight && probe_answered < deadline {
                tokio::time::sleep_until(probe_answered).await;
                assert_eq!(after_probe(&state, false, 3), AfterProbe::Same);
                timers.probe_in_flight = false;
                timers.next_probe = Instant::now() + POLL;
                continue;
            }
            tokio::time::sleep_until(deadline).await;
            let now = Instant::now();
            if startup_expired(&state, STARTUP_TIMEOUT, now) {
                return now;
            }
            timers.probe_in_flight = true;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_start_that_never_answers_ends_at_startup_timeout_not_a_probe_later() {
        let since = Instant::now();
        let ended = a_start_that_never_answers().await;
        assert_eq!(ended - since, STARTUP_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn the_startup_deadline_fires_even_while_a_probe_is_in_flight() {
        let since = Instant::now();
        let state = ChildState::Starting { pid: 1, since };
        let timers = Timers {
            next_probe: since,
            probe_in_flight: true,
            kill_at: None,
        };
        tokio::time::advance(STARTUP_TIMEOUT - Duration::from_millis(1)).await;
        let deadline = next_deadline(&state, STARTUP_TIMEOUT, timers, Instant::now());
        assert_eq!(deadline, since + STARTUP_TIMEOUT);
        assert!(!startup_expired(&state, STARTUP_TIMEOUT, Instant::now()));
        tokio::time::sleep_until(deadline).await;
        assert!(startup_expired(&state, STARTUP_TIMEOUT, Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_ready_child_is_hung_at_the_third_failure_in_a_row_and_one_success_ends_the_streak() {
        let mut state = ChildState::Ready {
            pid: 1,
            since: Instant::now(),
        };
        let mut verdicts = Vec::new();
        // Probes every interval: fail, fail, ok, fail, fail, fail.
        for ok in [false, false, true, false, false, false] {
            tokio::time::sleep(INTERVAL).await;
            let now = Instant::now();
            let verdict = after_probe(&state, ok, 3);
            verdicts.push(verdict);
            state = match verdict {
                AfterProbe::Same => state,
                AfterProbe::Ready => ChildState::Ready { pid: 1, since: now },
                AfterProbe::Unhealthy { failures } => ChildState::Unhealthy {
                    pid: 1,
                    failures,
                    since: now,
                },
                AfterProbe::Hung { .. } => break,
            };
        }
        assert_eq!(
            verdicts,
            [
                AfterProbe::Unhealthy { failures: 1 },
                AfterProbe::Unhealthy { failures: 2 },
                AfterProbe::Ready,
                AfterProbe::Unhealthy { failures: 1 },
                AfterProbe::Unhealthy { failures: 2 },
                AfterProbe::Hung { failures: 3 },
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_backoff_ends_at_its_until_and_a_stop_escalates_at_its_kill_deadline() {
        let now = Instant::now();
        let timers = Timers {
            next_probe: now,
            probe_in_flight: false,
            kill_at: Some(now + Duration::from_secs(30)),
        };
        let backoff = ChildState::Backoff {
            attempt: 2,
            until: now + Duration::from_secs(4),
        };
        assert_eq!(
            next_deadline(&backoff, STARTUP_TIMEOUT, timers, now),
            now + Duration::from_secs(4)
        );
        let stopping = ChildState::Stopping {
            pid: 1,
            reason: crate::lifecycle::state::StopReason::Unhealthy,
        };
        assert_eq!(
            next_deadline(&stopping, STARTUP_TIMEOUT, timers, now),
            now + Duration::from_secs(30)
        );
    }

    #[test]
    fn failures_while_starting_count_for_nothing() {
        let starting = ChildState::Starting {
            pid: 1,
            since: Instant::now(),
        };
        assert_eq!(after_probe(&starting, false, 1), AfterProbe::Same);
        assert_eq!(after_probe(&starting, true, 1), AfterProbe::Ready);
    }
}
