//! The child's life as data, below everything that acts on it: [`state`] (the state machine),
//! [`backoff`] (the restart decision), and [`outcome`], how supervision ended, with the gateway's
//! exit code for it. Pure: no processes, no clock of their own, no I/O.

pub mod backoff;
pub mod outcome;
pub mod schedule;
pub mod state;

pub use crate::lifecycle::outcome::{EXIT_FAILURE, EXIT_VLLM_EXITED_0, Outcome};
