//! The old image's last step of an in-place upgrade: `execve` of the new binary under the same
//! PID, with the same arguments and environment, plus the description in [`ENV_VAR`] and exactly
//! the descriptors it names.
//!
//! `std`'s `Command::exec` is not used: it resets the signal mask, and the calling thread blocks
//! the handled signals (as every thread of the gateway does but the one that takes them, which
//! holds them back across the exec: `signals::hold`), so that one sent meanwhile waits for the
//! new image's handlers.

use std::ffi::{CString, OsString};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use crate::upgrade::fds;
use crate::upgrade::handover::{ENV_VAR, Handover};

/// Set (to `1`) in the environment of a trial run of the new binary before the upgrade: it loads
/// the configuration the way it would start, then exits 0, or 2 naming what it refuses.
pub const CHECK_VAR: &str = "GATEWAY_UPGRADE_CHECK";

/// Replaces this process's image with `path`. Returns only if the exec failed, with close-on-exec
/// set again on the descriptors it had cleared.
///
/// The caller keeps every descriptor `handover` names open until this returns.
pub fn exec(path: &Path, handover: &Handover) -> std::io::Error {
    let program = match c_string(path.as_os_str().to_owned()) {
        Ok(program) => program,
        Err(error) => return error,
    };
    let args: Result<Vec<CString>, _> = std::env::args_os().map(c_string).collect();
    let mut env: Vec<OsString> = std::env::vars_os()
        .filter(|(name, _)| name != ENV_VAR && name != CHECK_VAR)
        .map(|(name, value)| {
            let mut pair = name;
            pair.push("=");
            pair.push(value);
            pair
        })
        .collect();
    env.push(format!("{ENV_VAR}={}", handover.encode()).into());
    let env: Result<Vec<CString>, _> = env.into_iter().map(c_string).collect();
    let (args, env) = match (args, env) {
        (Ok(args), Ok(env)) => (args, env),
        (Err(error), _) | (_, Err(error)) => return error,
    };
    let numbers = handover.fds();
    // SAFETY: the caller keeps every descriptor the description names open until this returns.
    let descriptors: Vec<BorrowedFd<'_>> = numbers
        .iter()
        .map(|fd| unsafe { BorrowedFd::borrow_raw(*fd) })
        .collect();
    if let Err(error) = fds::inherit_only(&descriptors) {
        return error.into();
    }
    let error = match nix::unistd::execve(&program, &args, &env) {
        Err(error) => error,
        Ok(never) => match never {},
    };
    for fd in &descriptors {
        let _ = fds::set_close_on_exec(*fd, true);
    }
    error.into()
}

fn c_string(text: OsString) -> Result<CString, std::io::Error> {
    CString::new(text.into_vec()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "an argument or variable holds a NUL byte",
        )
    })
}
