//! In-place upgrade: what lets a SIGHUP re-execute a replaced gateway binary under the same
//! PID, keeping vLLM (its child), the guard and the listening socket. The sequence itself (trial
//! run, drain, hand-over, exec) is `run`'s; these are its parts, each tested on its own:
//!
//! - `identity`: whether the executable the gateway started from has been replaced on disk
//!   (its device and inode at start against those of the path now).
//! - `handover`: the versioned description of what the new image takes over (listener, vLLM's
//!   port, pid and group, the guard's pipe, vLLM's output pipes, restart counters, the child's
//!   state), as JSON in [`handover::ENV_VAR`]; decoding validates it, and a description the new
//!   image cannot understand is refused, yet still yields what is needed to keep vLLM alive and
//!   serve.
//! - `fds`: clearing close-on-exec on exactly the descriptors that must cross the exec.
//! - `exec`: the old image's `execve`.
//! - `takeover`: the new image's first step, taking what the description names.
//!
//! Invariants (see the README's "Upgrading in place"):
//!
//! - vLLM is never signalled because of a hand-over: a refused one adopts it by pid.
//! - Only the descriptors named in the description cross the exec; the new image marks every
//!   inherited descriptor close-on-exec before it spawns anything.

pub mod exec;
pub mod fds;
pub mod handover;
pub mod identity;
pub mod takeover;
