//! How supervision ended ([`Outcome`]), and the gateway's exit code for each way.

use crate::lifecycle::state::ExitInfo;

/// Exit code when the gateway cannot start or gives up on vLLM.
pub const EXIT_FAILURE: u8 = 1;

/// Exit code when vLLM exited 0 on its own and the gateway stops because of it (`restart = "no"`):
/// EX_TEMPFAIL of sysexits.h, "try again later". Real vLLM exits 0 when its engine dies, so a 0
/// must not reach systemd's `Restart=on-failure` as a clean stop.
pub const EXIT_VLLM_EXITED_0: u8 = 75;

/// Why the supervisor ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Asked to stop; the child was stopped.
    Stopped,
    /// The child exited on its own and the restart policy (`no`) does not restart it.
    ChildExited(ExitInfo),
    /// The child exited with a code of `restart_prevent_exit_codes`.
    Prevented(ExitInfo),
    /// Too many starts in a row never became ready (or the child could not be spawned).
    GaveUp(String),
}

impl Outcome {
    /// The gateway's own exit code. An exit of vLLM that the gateway did not ask for is a failure
    /// whatever its code, so that the layer above (systemd, a container runtime) restarts the
    /// gateway: vLLM's code when it is not 0, [`EXIT_VLLM_EXITED_0`] when it is. Only a code
    /// the operator listed in `restart_prevent_exit_codes` is passed on as it is, 0 included.
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Stopped => 0,
            Outcome::ChildExited(exit) => match exit.exit_code() {
                0 => EXIT_VLLM_EXITED_0,
                code => u8::try_from(code).unwrap_or(EXIT_FAILURE),
            },
            Outcome::Prevented(exit) => u8::try_from(exit.exit_code()).unwrap_or(EXIT_FAILURE),
            Outcome::GaveUp(_) => EXIT_FAILURE,
        }
    }
}
