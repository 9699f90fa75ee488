//! The gateway's own resource errors: which failures mean that the gateway (not vLLM) ran out of
//! something, and which limit it ran into. Owns no state.
//!
//! A health probe that cannot even open a socket says nothing about vLLM, and a spawn that cannot
//! create a pipe says nothing about vLLM's command line: the supervisor must not count either
//! against vLLM (it would kill a healthy model, then give up on it). The errors are recognised by
//! the `raw_os_error` of an `io::Error` anywhere in the error's chain.

use std::error::Error;
use std::fmt;

use nix::errno::Errno;

/// The errors that mean the gateway itself is out of a resource.
const LOCAL: [Errno; 4] = [Errno::EMFILE, Errno::ENFILE, Errno::ENOMEM, Errno::ENOBUFS];

/// The gateway ran out of a resource; [`fmt::Display`] names the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted {
    pub errno: Errno,
}

impl Exhausted {
    /// Looks through `error` and its sources for an `io::Error` with one of the local errnos.
    pub fn in_chain(error: &(dyn Error + 'static)) -> Option<Exhausted> {
        let mut next = Some(error);
        while let Some(error) = next {
            if let Some(io) = error.downcast_ref::<std::io::Error>() {
                if let Some(exhausted) = Self::from_io(io) {
                    return Some(exhausted);
                }
                // A custom io::Error's `source` skips the error it wraps; look at that one too.
                if let Some(inner) = io.get_ref()
                    && let Some(exhausted) = Self::in_chain(inner)
                {
                    return Some(exhausted);
                }
            }
            next = error.source();
        }
        None
    }

    /// The error of a socket or pipe operation, if it is one of the local errnos.
    pub fn from_io(error: &std::io::Error) -> Option<Exhausted> {
        let errno = Errno::from_raw(error.raw_os_error()?);
        LOCAL.contains(&errno).then_some(Exhausted { errno })
    }

    /// The error of a spawn: the local errnos, and EAGAIN, which `fork` returns at the process
    /// limit.
    pub fn from_spawn(error: &std::io::Error) -> Option<Exhausted> {
        match error.raw_os_error().map(Errno::from_raw) {
            Some(Errno::EAGAIN) => Some(Exhausted {
                errno: Errno::EAGAIN,
            }),
            _ => Self::from_io(error),
        }
    }
}

impl fmt::Display for Exhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use nix::sys::resource::{Resource, getrlimit};
        let limit = match self.errno {
            Errno::EMFILE => match getrlimit(Resource::RLIMIT_NOFILE) {
                Ok((soft, _)) => format!("the gateway's open-files limit (RLIMIT_NOFILE {soft})"),
                Err(_) => "the gateway's open-files limit (RLIMIT_NOFILE)".into(),
            },
            Errno::ENFILE => match std::fs::read_to_string("/proc/sys/fs/file-max") {
                Ok(max) => format!(
                    "the system-wide open-files limit (fs.file-max {})",
                    max.trim()
                ),
                Err(_) => "the system-wide open-files limit (fs.file-max)".into(),
            },
            Errno::ENOMEM => "the gateway's memory".into(),
            Errno::ENOBUFS => "the kernel's socket buffer space".into(),
            Errno::EAGAIN => match getrlimit(Resource::RLIMIT_NPROC) {
                Ok((soft, _)) => format!("the process limit (RLIMIT_NPROC {soft})"),
                Err(_) => "the process limit (RLIMIT_NPROC)".into(),
            },
            _ => "a resource of the gateway's".into(),
        };
        write!(
            f,
            "out of {limit} ({:?}: {})",
            self.errno,
            self.errno.desc()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emfile_deep_in_an_error_chain_is_the_gateways_own() {
        #[derive(Debug)]
        struct Wrapper(std::io::Error);
        impl fmt::Display for Wrapper {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("tcp open error")
            }
        }
        impl Error for Wrapper {
            fn source(&self) -> Option<&(dyn Error + 'static)> {
                Some(&self.0)
            }
        }
        let emfile = std::io::Error::from_raw_os_error(Errno::EMFILE as i32);
        let wrapped = std::io::Error::other(Wrapper(emfile));
        let exhausted = Exhausted::in_chain(&wrapped).expect("found");
        assert_eq!(exhausted.errno, Errno::EMFILE);
        assert!(
            exhausted.to_string().contains("open-files limit"),
            "{exhausted}"
        );

        let refused = std::io::Error::from_raw_os_error(Errno::ECONNREFUSED as i32);
        assert_eq!(Exhausted::in_chain(&refused), None, "vLLM's problem");
        let eagain = std::io::Error::from_raw_os_error(Errno::EAGAIN as i32);
        assert_eq!(Exhausted::from_io(&eagain), None);
        assert!(Exhausted::from_spawn(&eagain).is_some());
    }
}
