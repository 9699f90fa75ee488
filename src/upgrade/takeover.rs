//! The new image's side of an in-place upgrade: reading the description the old image left in
//! [`ENV_VAR`] and taking ownership of what it names.
//!
//! [`take`] runs first thing in `main`, before anything opens a descriptor that could take the
//! number of one that was named but not inherited. A description that decodes and matches this
//! process is taken whole. Otherwise the new image takes what it can still trust, each part
//! checked on its own (the listener if it is a socket, vLLM if it is this process's live child
//! leading its group, the guard's and output pipes if they are pipes) and probes vLLM afresh, as a
//! start that is still loading: it never signals vLLM because of a description it refused.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use crate::lifecycle::backoff::History;
use crate::upgrade::fds;
use crate::upgrade::handover::{ENV_VAR, HandedState, Handover, Salvage, decode, parent_and_group};

/// What the old image handed over, as far as this image takes it.
#[derive(Debug)]
pub struct Takeover {
    /// The old image's version, when the description was readable.
    pub from_version: Option<String>,
    /// The listening socket, already listening.
    pub listener: Option<OwnedFd>,
    /// The health listener's socket, already listening.
    pub health: Option<OwnedFd>,
    /// Where the running vLLM listens.
    pub vllm_port: Option<u16>,
    pub child: Option<TakenChild>,
    pub restarts: u32,
    pub history: History,
    /// Why the description was not taken whole; `main` logs it once logging is set up.
    pub refused: Option<String>,
}

/// The running vLLM, now this image's to supervise.
#[derive(Debug)]
pub struct TakenChild {
    pub pid: u32,
    pub state: HandedState,
    /// The write end of the guard's pipe.
    pub guard: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// Reads and takes over the description in [`ENV_VAR`], if there is one.
pub fn take() -> Option<Takeover> {
    let text = std::env::var_os(ENV_VAR)?;
    // Whatever happens next, nothing inherited leaks into what this image spawns.
    fds::close_on_exec_all();
    let own_pid = std::process::id();
    let Some(text) = text.to_str() else {
        return Some(salvaged(
            Salvage::default(),
            "the hand-over description is not UTF-8".into(),
            own_pid,
        ));
    };
    Some(match decode(text) {
        Ok(handover) => match handover.check_process(own_pid) {
            Ok(()) => whole(handover),
            Err(error) => salvaged(salvage_of(&handover), error.to_string(), own_pid),
        },
        Err(refused) => salvaged(refused.salvage, refused.error.to_string(), own_pid),
    })
}

/// A description checked against this process: every part is taken.
fn whole(handover: Handover) -> Takeover {
    let child = handover
        .vllm_pid
        .zip(handover.child.as_ref())
        .map(|(pid, child)| TakenChild {
            pid,
            state: child.state,
            guard: handover.guard_fd.map(own),
            stdout: handover.stdout_fd.map(own),
            stderr: handover.stderr_fd.map(own),
        });
    Takeover {
        listener: Some(own(handover.listener_fd)),
        health: handover.health_fd.map(own),
        vllm_port: Some(handover.vllm_port),
        history: handover.history(),
        restarts: handover.restarts,
        from_version: Some(handover.from_version),
        child,
        refused: None,
    }
}

fn salvage_of(handover: &Handover) -> Salvage {
    Salvage {
        listener_fd: Some(handover.listener_fd),
        health_fd: handover.health_fd,
        vllm_port: Some(handover.vllm_port),
        vllm_pid: handover.vllm_pid,
        guard_fd: handover.guard_fd,
        stdout_fd: handover.stdout_fd,
        stderr_fd: handover.stderr_fd,
    }
}

/// A refused description: each part that can still be trusted, checked on its own.
fn salvaged(salvage: Salvage, reason: String, own_pid: u32) -> Takeover {
    let mut taken: Vec<RawFd> = Vec::new();
    let mut take_if = |fd: Option<RawFd>, wanted: &str| {
        let fd = fd.filter(|fd| !taken.contains(fd))?;
        (fds::kind(fd).as_deref() == Some(wanted)).then(|| {
            taken.push(fd);
            own(fd)
        })
    };
    let listener = take_if(salvage.listener_fd, "socket");
    let health = take_if(salvage.health_fd, "socket");
    let child = salvage
        .vllm_pid
        .filter(|pid| is_own_child_leading_its_group(*pid, own_pid))
        .map(|pid| TakenChild {
            pid,
            // Nothing else of the description is trusted: vLLM is probed as if it were loading.
            state: HandedState::Starting,
            guard: take_if(salvage.guard_fd, "pipe"),
            stdout: take_if(salvage.stdout_fd, "pipe"),
            stderr: take_if(salvage.stderr_fd, "pipe"),
        });
    Takeover {
        from_version: None,
        listener,
        health,
        vllm_port: salvage.vllm_port,
        child,
        restarts: 0,
        history: History::default(),
        refused: Some(reason),
    }
}

/// Takes ownership of an inherited descriptor, which `close_on_exec_all` already marked.
fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: the descriptor was inherited across the exec for this image to take; the
    // description names each at most once (decode checks it; salvage dedups), and nothing else
    // in this process has claimed it (`take` runs before anything else opens or owns one).
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Whether `pid` is alive (not a zombie), this process's child, and leads its process group.
fn is_own_child_leading_its_group(pid: u32, own_pid: u32) -> bool {
    parent_and_group(pid) == Some((own_pid, pid))
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, IntoRawFd};
    use std::os::unix::process::CommandExt;

    use super::*;

    #[test]
    fn a_refused_description_takes_only_what_checks_out_and_starts_vllm_over_as_loading() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let listener_fd = OwnedFd::from(listener).into_raw_fd();
        let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
        let guard_fd = write_end.into_raw_fd();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let salvage = Salvage {
            listener_fd: Some(listener_fd),
            // Named as the listener already: not taken twice.
            health_fd: Some(listener_fd),
            vllm_port: Some(8000),
            vllm_pid: Some(pid),
            guard_fd: Some(guard_fd),
            // The same descriptor named twice, and a socket named as a pipe: neither taken.
            stdout_fd: Some(guard_fd),
            stderr_fd: Some(listener_fd),
        };
        let taken = salvaged(salvage, "unknown version".into(), std::process::id());
        let _ = child.kill();
        let _ = child.wait();

        assert_eq!(taken.refused.as_deref(), Some("unknown version"));
        assert_eq!(
            taken.listener.as_ref().map(AsRawFd::as_raw_fd),
            Some(listener_fd)
        );
        assert!(taken.health.is_none());
        assert_eq!(taken.vllm_port, Some(8000));
        let adopted = taken.child.expect("vLLM adopted");
        assert_eq!(adopted.pid, pid);
        assert_eq!(adopted.state, HandedState::Starting);
        assert_eq!(
            adopted.guard.as_ref().map(AsRawFd::as_raw_fd),
            Some(guard_fd)
        );
        assert!(adopted.stdout.is_none() && adopted.stderr.is_none());
        drop(read_end);
    }

    #[test]
    fn a_process_that_is_not_this_ones_child_is_not_adopted() {
        let salvage = Salvage {
            vllm_pid: Some(1),
            ..Salvage::default()
        };
        let taken = salvaged(salvage, "stale".into(), std::process::id());
        assert!(taken.child.is_none());
        assert!(taken.listener.is_none());
    }
}
