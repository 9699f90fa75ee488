//! The guard: a small process (`gateway __guard`) that outlives a SIGKILLed gateway to stop vLLM's
//! whole process group.
//!
//! The gateway gives vLLM no parent-death signal (see `child`), and such a signal would reach only
//! the group's leader (vLLM's API server) anyway: every other process of the group would be left
//! holding the GPU. So each vLLM start gets a guard in a process group of its own, reading a pipe
//! whose write end only the gateway holds (close-on-exec, so vLLM's program never inherits it; an
//! in-place upgrade passes it on to the new image).
//!
//! The guard starts before vLLM, so that no moment of vLLM's life is unguarded: vLLM's process,
//! between its fork and its exec, writes its own pid (4 bytes, little-endian) into the pipe
//! ([`Guard::watch`]), which is the group to stop. The gateway writes one byte once vLLM's group is
//! gone and reaped, and the guard exits. If the pipe closes without that byte, the gateway died:
//! the guard sends SIGTERM to the group, and SIGKILL once the grace is over if anyone is left. A
//! pipe that closes before a pid arrived had no vLLM to guard.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{SigHandler, Signal, killpg};
use nix::unistd::Pid;

/// The hidden subcommand a guard runs as (`cli` names it too); `descendants` tells guards by it.
pub const ARG: &str = "__guard";

/// The gateway's end of a guard.
pub struct Guard {
    release: std::fs::File,
}

impl Guard {
    /// Starts a guard for the next vLLM, whose group is stopped within `grace` if the gateway dies
    /// (give `watch` the command that starts it). A guard that cannot start is logged, not fatal.
    pub fn start(grace: Duration) -> Option<Guard> {
        let start = || -> std::io::Result<Guard> {
            let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
            let mut command = Command::new("/proc/self/exe");
            crate::supervisor::child::unblock_signals_in_child(&mut command);
            command
                .arg(ARG)
                .arg(grace.as_millis().to_string())
                .stdin(Stdio::from(read_end))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .env_clear()
                // Out of vLLM's group (its stop must not take the guard) and the terminal's.
                .process_group(0)
                .spawn()?;
            Ok(Guard {
                release: std::fs::File::from(write_end),
            })
        };
        match start() {
            Ok(guard) => Some(guard),
            Err(error) => {
                tracing::warn!(%error, "cannot start the guard of vLLM's process group; vLLM starts unguarded");
                None
            }
        }
    }

    /// Makes the process `command` starts tell this guard its pid, before it runs its program.
    pub fn watch(&self, command: &mut Command) {
        let fd = self.fd();
        // SAFETY: between fork and exec only async-signal-safe calls are made (getpid, sigaction,
        // write), and nothing is allocated. SIGPIPE is ignored around the write: were the guard
        // gone, the write fails instead of killing vLLM before it starts.
        unsafe {
            command.pre_exec(move || {
                let pid = nix::unistd::getpid().as_raw().to_le_bytes();
                let previous = nix::sys::signal::signal(Signal::SIGPIPE, SigHandler::SigIgn)?;
                let _ = nix::unistd::write(BorrowedFd::borrow_raw(fd), &pid);
                nix::sys::signal::signal(Signal::SIGPIPE, previous)?;
                Ok(())
            });
        }
    }

    /// A guard started by an earlier gateway image, from the write end of its pipe.
    pub fn from_fd(release: OwnedFd) -> Guard {
        Guard {
            release: std::fs::File::from(release),
        }
    }

    /// The write end of the pipe, which must cross an in-place upgrade's exec.
    pub fn fd(&self) -> RawFd {
        self.release.as_raw_fd()
    }

    /// vLLM's group is gone and reaped: the guard exits without touching its (reusable) pgid.
    pub fn release(mut self) {
        let _ = self.release.write_all(b"r");
    }
}

/// `gateway __guard <grace_ms>`: reads vLLM's pid, waits on stdin, then acts as described above.
pub fn run(grace: Duration) -> ExitCode {
    let mut pid = [0u8; 4];
    if std::io::stdin().read_exact(&mut pid).is_err() {
        // The pipe closed before vLLM started: nothing to guard.
        return ExitCode::SUCCESS;
    }
    let pgid = i32::from_le_bytes(pid);
    let mut byte = [0u8; 1];
    let released = loop {
        match std::io::stdin().read(&mut byte) {
            Ok(read) => break read == 1,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break false,
        }
    };
    if released || pgid <= 1 {
        return ExitCode::SUCCESS;
    }
    let group = Pid::from_raw(pgid);
    if killpg(group, Signal::SIGTERM) == Err(Errno::ESRCH) {
        return ExitCode::SUCCESS;
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        if !group_alive(pgid) {
            return ExitCode::SUCCESS;
        }
    }
    let _ = killpg(group, Signal::SIGKILL);
    ExitCode::SUCCESS
}

/// Whether any process of the group is still running. Zombies do not count: with the gateway dead,
/// reaping them is up to whoever inherited them.
fn group_alive(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return killpg(Pid::from_raw(pgid), None) != Err(Errno::ESRCH);
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("stat")).ok())
        .any(|stat| {
            // After the parenthesised command name: state, ppid, pgrp, ...
            let mut fields = stat
                .rsplit_once(") ")
                .map(|(_, rest)| rest.split_whitespace())
                .into_iter()
                .flatten();
            let state = fields.next();
            let pgrp = fields.nth(1).and_then(|pgrp| pgrp.parse::<i32>().ok());
            pgrp == Some(pgid) && !matches!(state, Some("Z" | "X"))
        })
}
