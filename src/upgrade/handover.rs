//! The description of what a new gateway image takes over from the old one across the exec.
//!
//! The old image writes it as JSON into [`ENV_VAR`] of the new image's environment; the descriptors
//! it names are inherited (see `fds`). The new image decodes it once at start: [`decode`] checks the
//! format version and every field, [`Handover::check_process`] that the descriptors are open and
//! that vLLM is still this process's child, leading its own group.
//!
//! A description the new image cannot take whole is refused, never half-used. The keys that say
//! which socket to serve on, which vLLM to adopt and where it listens, and which descriptors keep
//! it alive are kept by every version, at the top level, so that even a refused description tells
//! the new image that much ([`Salvage`]): `version`, `listener_fd`, `health_fd` (written only
//! when there is a health listener), `vllm_port`, `vllm_pid`, `guard_fd`, `stdout_fd` and
//! `stderr_fd`. Nothing in a refused description ever leads to signalling vLLM.

use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};

use crate::lifecycle::backoff::History;
use crate::upgrade::fds;

/// The environment variable that carries the description to the new image. The new image reads
/// it once and never passes it on (vLLM and the guards are spawned without it).
pub const ENV_VAR: &str = "GATEWAY_HANDOVER";

/// The format this image writes and the only one it reads. Any change to the description's
/// meaning bumps it; the keys of [`Salvage`] never change.
pub const VERSION: u32 = 1;

/// What the new image takes over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handover {
    pub version: u32,
    /// The old image's package version, for the log line that says what was upgraded to what.
    pub from_version: String,
    /// The listening socket, bound and listening: connections arriving during the exec wait in
    /// its backlog.
    pub listener_fd: RawFd,
    /// The health listener's socket, listening, when there is one. Absent from the JSON when
    /// there is none, so that such a description reads as every earlier image wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_fd: Option<RawFd>,
    /// The port vLLM listens on (the old image may have picked it), where the new image probes.
    pub vllm_port: u16,
    /// vLLM's pid (also its process group's id, since it leads its group); `None` when no vLLM
    /// was running (in backoff, or before the first start).
    pub vllm_pid: Option<u32>,
    /// The write end of the guard's pipe: the guard stops vLLM's group when it closes, so it
    /// must cross the exec or the guard would take vLLM down.
    pub guard_fd: Option<RawFd>,
    /// The read ends of vLLM's stdout and stderr pipes: were they closed, vLLM's next write would
    /// fail with EPIPE (or kill it with SIGPIPE); were they not read, vLLM would block on a full
    /// pipe.
    pub stdout_fd: Option<RawFd>,
    pub stderr_fd: Option<RawFd>,
    /// The rest of what is known of the running vLLM; present exactly when `vllm_pid` is.
    pub child: Option<HandedChild>,
    /// Restarts so far, which `/livez` and the metrics report.
    pub restarts: u32,
    /// The backoff's memory, so that an upgrade does not reset a crash loop's delays.
    pub failed_starts: u32,
    pub backoff_level: u32,
}

/// The running vLLM as the old image knew it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandedChild {
    /// vLLM's process group; the same number as its pid.
    pub pgid: u32,
    pub state: HandedState,
}

/// The child's state, as far as it survives an exec (timers restart in the new image). A vLLM
/// being stopped has no state here: the old image finishes the stop before it hands over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", deny_unknown_fields)]
pub enum HandedState {
    /// Loading: the new image probes it with a fresh startup timeout.
    Starting,
    Ready,
    /// Was ready, with `failures` probes failed in a row since.
    Unhealthy {
        failures: u32,
    },
}

/// Why a description was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoverError {
    #[error("the hand-over description is not valid JSON: {0}")]
    Malformed(String),
    #[error(
        "the hand-over description has format version {found}; this gateway reads only {known}"
    )]
    UnknownVersion { found: u64, known: u32 },
    #[error("the hand-over description does not match format version {version}: {detail}")]
    Unreadable { version: u32, detail: String },
    #[error("the hand-over description is inconsistent: {0}")]
    Invalid(String),
    #[error("the hand-over does not match this process: {0}")]
    Stale(String),
}

/// What a refused description still says, read from the keys every version keeps. The new image
/// serves on the listener and adopts vLLM by pid (it is still this process's child), probing it
/// afresh; what it cannot trust it does without.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Salvage {
    pub listener_fd: Option<RawFd>,
    pub health_fd: Option<RawFd>,
    pub vllm_port: Option<u16>,
    pub vllm_pid: Option<u32>,
    pub guard_fd: Option<RawFd>,
    pub stdout_fd: Option<RawFd>,
    pub stderr_fd: Option<RawFd>,
}

/// A refused description: why, and what can still be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub error: HandoverError,
    pub salvage: Salvage,
}

impl Handover {
    /// The description as the old image writes it.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("the description holds only numbers, strings and enums")
    }

    /// Every descriptor the description names, which are the ones to inherit.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.listener_fd];
        fds.extend(
            [
                self.health_fd,
                self.guard_fd,
                self.stdout_fd,
                self.stderr_fd,
            ]
            .into_iter()
            .flatten(),
        );
        fds
    }

    pub fn history(&self) -> History {
        History {
            failed_starts: self.failed_starts,
            level: self.backoff_level,
        }
    }

    /// Checks that hold without looking at the process: numbers in range, no descriptor named
    /// twice or taken from stdio, a child described exactly when a pid is given.
    fn validate(&self) -> Result<(), HandoverError> {
        let invalid = |detail: String| Err(HandoverError::Invalid(detail));
        let fds = self.fds();
        if let Some(fd) = fds.iter().find(|fd| **fd < 3) {
            return invalid(format!("descriptor {fd} is not one a hand-over may pass"));
        }
        let mut sorted = fds.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != fds.len() {
            return invalid("a descriptor is named twice".into());
        }
        let vllm_fds = [self.guard_fd, self.stdout_fd, self.stderr_fd];
        if self.vllm_pid.is_none() && vllm_fds.iter().any(Option::is_some) {
            return invalid("descriptors of vLLM are given without its pid".into());
        }
        if self.vllm_port == 0 {
            return invalid("vLLM's port is 0".into());
        }
        match (self.vllm_pid, &self.child) {
            (None, None) => Ok(()),
            (Some(pid), Some(child)) => {
                if pid <= 1 || pid > i32::MAX as u32 {
                    return invalid(format!("vLLM's pid {pid} is out of range"));
                }
                if child.pgid != pid {
                    return invalid(format!(
                        "vLLM (pid {pid}) does not lead its process group {}",
                        child.pgid
                    ));
                }
                Ok(())
            }
            (Some(_), None) => invalid("vLLM's pid is given without its state".into()),
            (None, Some(_)) => invalid("vLLM's state is given without its pid".into()),
        }
    }

    /// Checks against this process (`own_pid`): every descriptor open, the listener a socket,
    /// vLLM this process's child in its own group.
    pub fn check_process(&self, own_pid: u32) -> Result<(), HandoverError> {
        let stale = |detail: String| Err(HandoverError::Stale(detail));
        for fd in self.fds() {
            if !fds::is_open(fd) {
                return stale(format!("descriptor {fd} was not inherited"));
            }
        }
        for listener in std::iter::once(self.listener_fd).chain(self.health_fd) {
            if fds::kind(listener).as_deref() != Some("socket") {
                return stale(format!("descriptor {listener} is not a socket"));
            }
        }
        if let Some(pid) = self.vllm_pid {
            match parent_and_group(pid) {
                Some((parent, group)) if parent == own_pid && group == pid => {}
                Some((parent, group)) => {
                    return stale(format!(
                        "process {pid} has parent {parent} and group {group}, not this gateway's vLLM"
                    ));
                }
                None => return stale(format!("vLLM (pid {pid}) is gone")),
            }
        }
        Ok(())
    }
}

/// Reads a description: its version first, then the whole of it strictly, then its consistency.
/// A description refused at any step still yields what [`Salvage`] can read.
pub fn decode(text: &str) -> Result<Handover, Refused> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|error| Refused {
        error: HandoverError::Malformed(error.to_string()),
        salvage: Salvage::default(),
    })?;
    let salvage = salvage(&value);
    let refuse = |error| Refused { error, salvage };
    match value.get("version").and_then(serde_json::Value::as_u64) {
        Some(found) if found == u64::from(VERSION) => {}
        Some(found) => {
            return Err(refuse(HandoverError::UnknownVersion {
                found,
                known: VERSION,
            }));
        }
        None => {
            return Err(refuse(HandoverError::Malformed(
                "no numeric `version`".into(),
            )));
        }
    }
    let handover: Handover = serde_json::from_value(value).map_err(|error| {
        refuse(HandoverError::Unreadable {
            version: VERSION,
            detail: error.to_string(),
        })
    })?;
    handover.validate().map_err(refuse)?;
    Ok(handover)
}

/// The keys every version keeps, each taken only if it is a plausible value.
fn salvage(value: &serde_json::Value) -> Salvage {
    let fd = |key: &str| {
        value
            .get(key)
            .and_then(serde_json::Value::as_i64)
            .and_then(|fd| RawFd::try_from(fd).ok())
            .filter(|fd| *fd >= 3)
    };
    let vllm_pid = value
        .get("vllm_pid")
        .and_then(serde_json::Value::as_u64)
        .and_then(|pid| u32::try_from(pid).ok())
        .filter(|pid| *pid > 1 && *pid <= i32::MAX as u32);
    let vllm_port = value
        .get("vllm_port")
        .and_then(serde_json::Value::as_u64)
        .and_then(|port| u16::try_from(port).ok())
        .filter(|port| *port > 0);
    Salvage {
        listener_fd: fd("listener_fd"),
        health_fd: fd("health_fd"),
        vllm_port,
        vllm_pid,
        guard_fd: fd("guard_fd"),
        stdout_fd: fd("stdout_fd"),
        stderr_fd: fd("stderr_fd"),
    }
}

/// A live process's parent pid and process group, from `/proc/<pid>/stat`; `None` if it is gone
/// or a zombie (exited: nothing to adopt).
pub(crate) fn parent_and_group(pid: u32) -> Option<(u32, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the parenthesised command name: state, ppid, pgrp, ...
    let (_, rest) = stat.rsplit_once(") ")?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if matches!(state, "Z" | "X") {
        return None;
    }
    let parent = fields.next()?.parse().ok()?;
    let group = fields.next()?.parse().ok()?;
    Some((parent, group))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;

    use super::*;

    fn sample() -> Handover {
        Handover {
            version: VERSION,
            from_version: "0.1.0".into(),
            listener_fd: 3,
            health_fd: Some(8),
            vllm_port: 8000,
            vllm_pid: Some(4242),
            guard_fd: Some(5),
            stdout_fd: Some(6),
            stderr_fd: Some(7),
            child: Some(HandedChild {
                pgid: 4242,
                state: HandedState::Unhealthy { failures: 2 },
            }),
            restarts: 3,
            failed_starts: 1,
            backoff_level: 2,
        }
    }

    #[test]
    fn without_a_health_listener_the_description_is_the_one_earlier_images_read() {
        let handover = Handover {
            health_fd: None,
            ..sample()
        };
        let text = handover.encode();
        assert!(!text.contains("health_fd"), "{text}");
        assert_eq!(decode(&text), Ok(handover));
    }

    #[test]
    fn a_description_reads_back_as_written() {
        let handover = sample();
        assert_eq!(decode(&handover.encode()), Ok(handover.clone()));
        assert_eq!(handover.fds(), vec![3, 8, 5, 6, 7]);
        assert_eq!(
            handover.history(),
            History {
                failed_starts: 1,
                level: 2
            }
        );
    }

    /// [`sample`] with no vLLM running (in backoff when it was handed over).
    fn sample_without_vllm() -> Handover {
        Handover {
            vllm_pid: None,
            guard_fd: None,
            stdout_fd: None,
            stderr_fd: None,
            child: None,
            ..sample()
        }
    }

    #[test]
    fn a_description_without_vllm_reads_back_as_written() {
        let handover = sample_without_vllm();
        assert_eq!(decode(&handover.encode()), Ok(handover));
    }

    #[test]
    fn an_unknown_version_is_refused_but_still_names_the_listener_and_vllm() {
        let text = sample().encode().replace(
            &format!("\"version\":{VERSION}"),
            &format!("\"version\":{}", VERSION + 1),
        );
        let refused = decode(&text).expect_err("refused");
        assert_eq!(
            refused.error,
            HandoverError::UnknownVersion {
                found: u64::from(VERSION) + 1,
                known: VERSION
            }
        );
        assert_eq!(
            refused.salvage,
            Salvage {
                listener_fd: Some(3),
                health_fd: Some(8),
                vllm_port: Some(8000),
                vllm_pid: Some(4242),
                guard_fd: Some(5),
                stdout_fd: Some(6),
                stderr_fd: Some(7),
            }
        );
    }

    #[test]
    fn a_key_this_version_does_not_know_is_refused() {
        let text = sample()
            .encode()
            .replacen('{', "{\"drain_left_ms\":100,", 1);
        let refused = decode(&text).expect_err("refused");
        assert!(
            matches!(refused.error, HandoverError::Unreadable { .. }),
            "{refused:?}"
        );
        assert_eq!(refused.salvage.vllm_pid, Some(4242));
    }

    #[test]
    fn text_that_is_not_json_is_refused_with_nothing_to_salvage() {
        for text in ["", "{", "null", "[1,2]", "{\"version\":\"1\"}"] {
            let refused = decode(text).expect_err(text);
            assert!(
                matches!(refused.error, HandoverError::Malformed(_)),
                "{text}: {refused:?}"
            );
            assert_eq!(refused.salvage, Salvage::default(), "{text}");
        }
    }

    #[test]
    fn inconsistent_descriptions_are_refused() {
        let mut stdio = sample();
        stdio.listener_fd = 0;
        let mut twice = sample();
        twice.stderr_fd = twice.stdout_fd;
        let mut no_port = sample();
        no_port.vllm_port = 0;
        let mut other_group = sample();
        if let Some(child) = &mut other_group.child {
            child.pgid = 1;
        }
        let mut init = sample();
        init.vllm_pid = Some(1);
        if let Some(child) = &mut init.child {
            child.pgid = 1;
        }
        let pid_alone = Handover {
            child: None,
            ..sample()
        };
        let state_alone = Handover {
            vllm_pid: None,
            guard_fd: None,
            stdout_fd: None,
            stderr_fd: None,
            ..sample()
        };
        let fds_alone = Handover {
            vllm_pid: None,
            child: None,
            ..sample()
        };
        for handover in [
            stdio,
            twice,
            no_port,
            other_group,
            init,
            pid_alone,
            state_alone,
            fds_alone,
        ] {
            let refused = decode(&handover.encode()).expect_err("refused");
            assert!(
                matches!(refused.error, HandoverError::Invalid(_)),
                "{handover:?}: {refused:?}"
            );
        }
    }

    #[test]
    fn a_salvaged_pid_or_descriptor_out_of_range_is_dropped() {
        let text = r#"{"version":99,"listener_fd":1,"vllm_pid":1}"#;
        assert_eq!(
            decode(text).expect_err("refused").salvage,
            Salvage::default()
        );
        let text = r#"{"version":99,"listener_fd":-4,"vllm_pid":4294967296}"#;
        assert_eq!(
            decode(text).expect_err("refused").salvage,
            Salvage::default()
        );
    }

    #[test]
    fn a_description_naming_descriptors_this_process_lacks_is_stale() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let health = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let handover = Handover {
            listener_fd: listener.as_raw_fd(),
            health_fd: Some(health.as_raw_fd()),
            ..sample_without_vllm()
        };
        assert_eq!(handover.check_process(std::process::id()), Ok(()));

        let file = tempfile::tempfile().expect("temp file");
        let not_a_socket = Handover {
            listener_fd: file.as_raw_fd(),
            ..handover.clone()
        };
        assert!(matches!(
            not_a_socket.check_process(std::process::id()),
            Err(HandoverError::Stale(_))
        ));
        let health_not_a_socket = Handover {
            health_fd: Some(file.as_raw_fd()),
            ..handover.clone()
        };
        assert!(matches!(
            health_not_a_socket.check_process(std::process::id()),
            Err(HandoverError::Stale(_))
        ));
        let closed = Handover {
            listener_fd: i32::MAX,
            ..handover
        };
        assert!(matches!(
            closed.check_process(std::process::id()),
            Err(HandoverError::Stale(_))
        ));
    }

    #[test]
    fn a_vllm_that_is_not_this_process_child_is_stale() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let handover = Handover {
            listener_fd: listener.as_raw_fd(),
            health_fd: None,
            vllm_pid: Some(pid),
            guard_fd: None,
            stdout_fd: None,
            stderr_fd: None,
            child: Some(HandedChild {
                pgid: pid,
                state: HandedState::Ready,
            }),
            ..sample()
        };
        let mine = handover.check_process(std::process::id());
        // The same child, claimed by another parent: not ours to adopt.
        let theirs = handover.check_process(1);
        let _ = child.kill();
        let _ = child.wait();
        let gone = handover.check_process(std::process::id());
        assert_eq!(mine, Ok(()));
        assert!(matches!(theirs, Err(HandoverError::Stale(_))), "{theirs:?}");
        assert!(matches!(gone, Err(HandoverError::Stale(_))), "{gone:?}");
    }
}
