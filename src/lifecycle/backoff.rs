//! The restart decision as a pure function of the policy, the history, and how the child ended.
//! No clock and no randomness inside: the caller passes the jitter, tests pass fixed values.

use std::time::Duration;

use crate::config::BackoffConfig;
use crate::config::RestartPolicy;
use crate::lifecycle::outcome::Outcome;
use crate::lifecycle::state::ExitInfo;

/// How one run of the child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndCause {
    /// It exited on its own.
    Exited,
    /// It never became ready within `startup_timeout` and was stopped.
    StartupTimeout,
    /// Its /health stopped answering and it was stopped.
    Unhealthy,
    /// It was not spawned: another process holds `vllm_port`.
    PortInUse,
}

#[derive(Debug, Clone, Copy)]
pub struct End {
    pub exit: ExitInfo,
    pub cause: EndCause,
    /// How long it was ready; `None` if it never was.
    pub ready_for: Option<Duration>,
}

/// What the supervisor remembers between runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct History {
    /// Consecutive starts that never became ready.
    pub failed_starts: u32,
    /// Doublings applied to the next delay.
    pub level: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Restart { delay: Duration },
    Stop(Outcome),
}

/// Decides what follows `end`, and updates `history`. `jitter` is in `[0, 1)`: the delay is scaled
/// into `[0.75, 1.0]` of its nominal value, so doubling still makes each delay longer than the last.
pub fn decide(
    policy: RestartPolicy,
    config: &BackoffConfig,
    prevent_exit_codes: &[i32],
    history: &mut History,
    end: End,
    jitter: f64,
) -> Decision {
    match end.ready_for {
        None => history.failed_starts += 1,
        Some(ready_for) => {
            history.failed_starts = 0;
            if ready_for >= config.reset_after {
                history.level = 0;
            }
        }
    }
    // Every end that reaches here is a failure, whatever the exit code: the gateway asks vLLM to
    // exit only to stop it for good (a shutdown never comes here) or because it failed (startup
    // timeout, hung), and real vLLM exits 0 on its own when its engine dies. So `on-failure`
    // restarts whatever `always` restarts.
    // A code the operator listed is final under every policy, and passed on as it is (0 too,
    // where `no` alone would make it 75); a death by signal N counts as 128 + N, the code it is
    // reported as.
    if end.cause == EndCause::Exited && prevent_exit_codes.contains(&end.exit.exit_code()) {
        return Decision::Stop(Outcome::Prevented(end.exit));
    }
    let restart = match policy {
        RestartPolicy::No => false,
        RestartPolicy::OnFailure | RestartPolicy::Always => true,
    };
    if !restart {
        return Decision::Stop(match end.cause {
            EndCause::Exited => Outcome::ChildExited(end.exit),
            EndCause::StartupTimeout => {
                Outcome::GaveUp("vLLM did not become ready within startup_timeout".into())
            }
            EndCause::Unhealthy => Outcome::GaveUp("vLLM stopped answering /health".into()),
            EndCause::PortInUse => {
                Outcome::GaveUp("vllm_port is held by a process that is not vLLM".into())
            }
        });
    }
    if config.max_restarts > 0 && history.failed_starts >= config.max_restarts {
        return Decision::Stop(Outcome::GaveUp(format!(
            "vLLM failed to become ready {} times in a row (max_restarts); last: {}",
            history.failed_starts,
            match end.cause {
                EndCause::PortInUse => "vllm_port held by another process".to_string(),
                _ => end.exit.to_string(),
            }
        )));
    }
    let nominal = config
        .delay
        .saturating_mul(1u32.checked_shl(history.level).unwrap_or(u32::MAX))
        .min(config.max_delay);
    history.level = history.level.saturating_add(1).min(31);
    let scale = 0.75 + 0.25 * jitter.clamp(0.0, 1.0);
    Decision::Restart {
        delay: nominal.mul_f64(scale),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BackoffConfig {
        BackoffConfig {
            delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            reset_after: Duration::from_secs(300),
            max_restarts: 5,
        }
    }

    fn crash(ready_for: Option<Duration>) -> End {
        End {
            exit: ExitInfo::Code(1),
            cause: EndCause::Exited,
            ready_for,
        }
    }

    fn delay_of(decision: Decision) -> Duration {
        match decision {
            Decision::Restart { delay } => delay,
            other => panic!("expected a restart, got {other:?}"),
        }
    }

    #[test]
    fn delays_double_up_to_the_cap() {
        let mut history = History::default();
        let delays: Vec<u64> = (0..8)
            .map(|_| {
                history.failed_starts = 0;
                delay_of(decide(
                    RestartPolicy::Always,
                    &config(),
                    &[],
                    &mut history,
                    crash(Some(Duration::ZERO)),
                    1.0,
                ))
                .as_secs()
            })
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn jitter_never_makes_a_delay_shorter_than_the_previous_one() {
        let mut history = History::default();
        let first = delay_of(decide(
            RestartPolicy::Always,
            &config(),
            &[],
            &mut history,
            crash(Some(Duration::ZERO)),
            0.999,
        ));
        let second = delay_of(decide(
            RestartPolicy::Always,
            &config(),
            &[],
            &mut history,
            crash(Some(Duration::ZERO)),
            0.0,
        ));
        assert!(second > first, "{second:?} > {first:?}");
    }

    #[test]
    fn staying_ready_long_enough_resets_the_delay() {
        let mut history = History {
            failed_starts: 0,
            level: 4,
        };
        let delay = delay_of(decide(
            RestartPolicy::Always,
            &config(),
            &[],
            &mut history,
            crash(Some(Duration::from_secs(301))),
            1.0,
        ));
        assert_eq!(delay, Duration::from_secs(1));
    }

    #[test]
    fn gives_up_after_max_restarts_starts_that_never_became_ready() {
        let mut history = History::default();
        let mut failed_start = || {
            decide(
                RestartPolicy::Always,
                &config(),
                &[],
                &mut history,
                crash(None),
                0.5,
            )
        };
        for _ in 0..4 {
            assert!(matches!(failed_start(), Decision::Restart { .. }));
        }
        assert!(matches!(failed_start(), Decision::Stop(Outcome::GaveUp(_))));
    }

    #[test]
    fn policies_decide_on_clean_and_failed_exits() {
        let clean = End {
            exit: ExitInfo::Code(0),
            cause: EndCause::Exited,
            ready_for: Some(Duration::ZERO),
        };
        let killed = End {
            exit: ExitInfo::Signal(9),
            cause: EndCause::Exited,
            ready_for: Some(Duration::ZERO),
        };
        let decide_with =
            |policy, end| decide(policy, &config(), &[], &mut History::default(), end, 0.0);
        assert_eq!(
            decide_with(RestartPolicy::No, killed),
            Decision::Stop(Outcome::ChildExited(ExitInfo::Signal(9)))
        );
        assert!(
            matches!(
                decide_with(RestartPolicy::OnFailure, clean),
                Decision::Restart { .. }
            ),
            "vLLM exits 0 on its own when its engine dies: a failure"
        );
        assert_eq!(
            decide_with(RestartPolicy::No, clean),
            Decision::Stop(Outcome::ChildExited(ExitInfo::Code(0)))
        );
        assert!(matches!(
            decide_with(RestartPolicy::OnFailure, killed),
            Decision::Restart { .. }
        ));
        assert!(matches!(
            decide_with(RestartPolicy::Always, clean),
            Decision::Restart { .. }
        ));
        let hung = End {
            exit: ExitInfo::Code(0),
            cause: EndCause::Unhealthy,
            ready_for: Some(Duration::ZERO),
        };
        assert!(
            matches!(
                decide_with(RestartPolicy::OnFailure, hung),
                Decision::Restart { .. }
            ),
            "a hung child is a failure"
        );
    }

    #[test]
    fn prevented_exit_codes_are_not_restarted() {
        let bad_args = End {
            exit: ExitInfo::Code(2),
            cause: EndCause::Exited,
            ready_for: None,
        };
        let decision = decide(
            RestartPolicy::Always,
            &config(),
            &[2],
            &mut History::default(),
            bad_args,
            0.0,
        );
        assert_eq!(
            decision,
            Decision::Stop(Outcome::Prevented(ExitInfo::Code(2)))
        );
    }

    /// Under every policy, `no` too (where an exit 0 alone becomes 75), and for a death by signal
    /// N, listed as 128 + N: the code it is reported as.
    #[test]
    fn a_listed_code_is_final_under_every_policy_an_exit_0_and_a_signal_too() {
        for policy in [
            RestartPolicy::No,
            RestartPolicy::OnFailure,
            RestartPolicy::Always,
        ] {
            for (exit, listed) in [(ExitInfo::Code(0), 0), (ExitInfo::Signal(9), 137)] {
                let end = End {
                    exit,
                    cause: EndCause::Exited,
                    ready_for: Some(Duration::ZERO),
                };
                let decision = decide(
                    policy,
                    &config(),
                    &[listed],
                    &mut History::default(),
                    end,
                    0.0,
                );
                assert_eq!(
                    decision,
                    Decision::Stop(Outcome::Prevented(exit)),
                    "{policy:?}, {exit:?}"
                );
                assert_eq!(Outcome::Prevented(exit).exit_code(), listed as u8);
            }
        }
    }
}
