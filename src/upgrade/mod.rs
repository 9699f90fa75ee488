//! In-place upgrade: the parts that let a reload re-execute a new gateway binary under the same
//! PID, keeping vLLM (its child), the guard and the listening socket.
//!
//! Not wired into SIGHUP yet: a reload is a configuration reload only. What is here is the
//! groundwork that the hand-over builds on, each part tested on its own:
//!
//! - `identity`: whether the executable the gateway started from has been replaced on disk
//!   (its device and inode at start against those of the path now).
//! - `handover`: the versioned description of what the new image takes over (listener, vLLM's
//!   pid and group, the guard's pipe, vLLM's output pipes, restart counters, the child's state),
//!   as JSON in [`handover::ENV_VAR`]; decoding validates it, and a description the new image
//!   cannot understand is refused, yet still yields what is needed to keep vLLM alive and serve.
//! - `fds`: clearing close-on-exec on exactly the descriptors that must cross the exec.
//!
//! Invariants the hand-over must keep (see the README's "Upgrading in place"):
//!
//! - vLLM is never killed to recover from a refused hand-over: the new image adopts it by pid.
//! - Only the descriptors named in the description cross the exec; everything else stays
//!   close-on-exec.

pub mod fds;
pub mod handover;
pub mod identity;
