//! The descriptors that cross the exec of a new image.
//!
//! Every descriptor the gateway opens is close-on-exec (Rust's std and tokio open them so); the
//! hand-over clears the flag on exactly the descriptors its description names, right before the
//! exec, and the new image sets it again on each as it takes them over, so that nothing it spawns
//! (vLLM, a guard) inherits them.

use std::os::fd::{BorrowedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};

/// Whether `fd` is an open descriptor of this process (a number read from a hand-over
/// description, not yet owned by anything).
pub fn is_open(fd: RawFd) -> bool {
    fd >= 0 && std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_ok()
}

/// Whether `fd` is closed by an exec.
pub fn is_close_on_exec(fd: BorrowedFd<'_>) -> Result<bool, Errno> {
    let flags = fcntl(fd, FcntlArg::F_GETFD)?;
    Ok(FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC))
}

/// Sets or clears close-on-exec on `fd`, keeping its other descriptor flags.
pub fn set_close_on_exec(fd: BorrowedFd<'_>, close: bool) -> Result<(), Errno> {
    let mut flags = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD)?);
    flags.set(FdFlag::FD_CLOEXEC, close);
    fcntl(fd, FcntlArg::F_SETFD(flags)).map(drop)
}

/// Clears close-on-exec on each of `fds`, so that exactly these cross the exec. On an error the
/// flag is set again on those already cleared: a hand-over that cannot happen leaks nothing into
/// the processes the gateway spawns later.
pub fn inherit_only(fds: &[BorrowedFd<'_>]) -> Result<(), Errno> {
    for (done, fd) in fds.iter().enumerate() {
        if let Err(error) = set_close_on_exec(*fd, false) {
            for cleared in &fds[..done] {
                let _ = set_close_on_exec(*cleared, true);
            }
            return Err(error);
        }
    }
    Ok(())
}

/// Sets close-on-exec on every descriptor above stdio: the new image's first step, so that
/// nothing inherited (a descriptor it does not know of, from a description it refused) leaks
/// into what it spawns. The descriptors stay open: an unknown guard pipe keeps guarding.
pub fn close_on_exec_all() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: only the flag is changed, on a descriptor this process holds (or, for the
        // directory read above, held: F_SETFD then fails with EBADF, which is ignored).
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let _ = set_close_on_exec(fd, true);
    }
}

/// What a descriptor is, from its `/proc/self/fd` link: `socket`, `pipe`, or a path.
pub fn kind(fd: RawFd) -> Option<String> {
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    let target = target.to_string_lossy();
    Some(match target.split_once(":[") {
        Some((kind, _)) => kind.to_string(),
        None => target.into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, AsRawFd};

    use nix::fcntl::OFlag;

    use super::*;

    #[test]
    fn only_the_named_descriptors_lose_close_on_exec() {
        let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe");
        assert!(is_close_on_exec(read_end.as_fd()).expect("flags"));
        inherit_only(&[read_end.as_fd()]).expect("inherit");
        assert!(!is_close_on_exec(read_end.as_fd()).expect("flags"));
        assert!(is_close_on_exec(write_end.as_fd()).expect("flags"));
        set_close_on_exec(read_end.as_fd(), true).expect("set again");
        assert!(is_close_on_exec(read_end.as_fd()).expect("flags"));
    }

    #[test]
    fn every_descriptor_above_stdio_becomes_close_on_exec_and_stays_open() {
        let (read_end, _write_end) = nix::unistd::pipe().expect("pipe without close-on-exec");
        assert!(!is_close_on_exec(read_end.as_fd()).expect("flags"));
        close_on_exec_all();
        assert!(is_close_on_exec(read_end.as_fd()).expect("flags"));
        assert!(is_open(read_end.as_raw_fd()));
        assert_eq!(kind(read_end.as_raw_fd()).as_deref(), Some("pipe"));
    }

    #[test]
    fn a_closed_descriptor_is_not_open() {
        let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe");
        let raw = write_end.as_raw_fd();
        assert!(is_open(raw));
        drop(write_end);
        // The test runs alone in its process (nextest), so nothing reuses the number meanwhile.
        assert!(!is_open(raw));
        assert!(!is_open(-1));
        assert!(is_open(read_end.as_raw_fd()));
    }
}
