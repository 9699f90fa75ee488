//! The upstream's state as the proxy, the health endpoints and the notifier see it: one value on a
//! `tokio::sync::watch` channel. In standalone mode the health poller writes it; under `serve` the
//! supervisor does. Readers only ever borrow it.
//!
//! Beside it, [`VllmReads`]: how many reads from vLLM brought the proxy's workers data, which the
//! supervisor (and the standalone poller) weighs against a `/health` probe that timed out.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;

use crate::lifecycle::state::{ChildState, ExitInfo};

#[derive(Debug, Clone)]
pub enum UpstreamStatus {
    /// Standalone: a vLLM we do not own, known only through its /health.
    External(ExternalHealth),
    /// `serve`: the child the supervisor owns.
    Child(ChildStatus),
}

#[derive(Debug, Clone, Default)]
pub struct ExternalHealth {
    /// The last probe's outcome; `None` before the first probe finished.
    pub last_probe: Option<Probe>,
}

#[derive(Debug, Clone)]
pub struct Probe {
    pub ok: bool,
    pub at: Instant,
    /// Why it failed, in words (empty when ok).
    pub detail: String,
}

#[derive(Debug, Clone)]
pub struct ChildStatus {
    pub state: ChildState,
    /// Restarts since the gateway started.
    pub restarts: u32,
    pub last_exit: Option<ExitInfo>,
}

/// The JSON body of /livez, /readyz and /health.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restarts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitInfo>,
}

impl UpstreamStatus {
    /// Whether readiness probes should pass. `fresh_within` bounds how old a standalone
    /// probe may be.
    pub fn is_ready(&self, fresh_within: Duration) -> bool {
        match self {
            UpstreamStatus::External(health) => health
                .last_probe
                .as_ref()
                .is_some_and(|probe| probe.ok && probe.at.elapsed() <= fresh_within),
            UpstreamStatus::Child(child) => matches!(child.state, ChildState::Ready { .. }),
        }
    }

    /// Whether the proxy forwards requests now rather than holding them until ready. A child whose
    /// /health just failed once still serves; only a child that is not running holds requests.
    /// A vLLM we do not own is always tried: its /health poll may lag behind.
    pub fn accepts_requests(&self) -> bool {
        match self {
            UpstreamStatus::External(_) => true,
            UpstreamStatus::Child(child) => {
                matches!(
                    child.state,
                    ChildState::Ready { .. } | ChildState::Unhealthy { .. }
                )
            }
        }
    }

    /// The pid of the child requests go to, while it accepts them; `None` in standalone mode.
    pub fn serving_pid(&self) -> Option<u32> {
        match self {
            UpstreamStatus::Child(child) if self.accepts_requests() => child.state.pid(),
            _ => None,
        }
    }

    /// Whether waiting could still help: false once the child is gone for good. A child being
    /// stopped may still be restarted, so only `Exited` is final.
    pub fn may_become_ready(&self) -> bool {
        match self {
            UpstreamStatus::External(_) => true,
            UpstreamStatus::Child(child) => !matches!(child.state, ChildState::Exited { .. }),
        }
    }

    /// A hint for `Retry-After`, in whole seconds.
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            UpstreamStatus::Child(ChildStatus {
                state: ChildState::Backoff { until, .. },
                ..
            }) => until
                .saturating_duration_since(Instant::now())
                .as_secs()
                .max(1),
            _ => 5,
        }
    }

    /// The upstream's state in words, for the reasons the gateway gives.
    pub fn describe(&self) -> String {
        match self {
            UpstreamStatus::External(health) => match &health.last_probe {
                Some(probe) if !probe.ok => probe.detail.clone(),
                Some(_) => "ready".into(),
                None => "upstream /health not probed yet".into(),
            },
            UpstreamStatus::Child(child) => child.state.describe(),
        }
    }

    pub fn report(&self, ready: bool, draining: bool) -> StatusReport {
        let status = if draining {
            "draining"
        } else if ready {
            "ready"
        } else {
            "not_ready"
        };
        // vLLM's own state may be fine: what keeps the gateway from being ready is the stop.
        let drain = || Some("the gateway is draining before it stops".to_string());
        match self {
            UpstreamStatus::External(health) => StatusReport {
                status,
                reason: match &health.last_probe {
                    _ if draining => drain(),
                    None => Some("upstream /health not probed yet".into()),
                    Some(probe) if !probe.ok => Some(probe.detail.clone()),
                    Some(_) if !ready => Some("last upstream /health probe is stale".into()),
                    Some(_) => None,
                },
                state: None,
                pid: None,
                restarts: None,
                last_exit: None,
            },
            UpstreamStatus::Child(child) => StatusReport {
                status,
                reason: if draining {
                    drain()
                } else {
                    (!ready).then(|| child.state.describe())
                },
                state: Some(child.state.name()),
                pid: child.state.pid(),
                restarts: Some(child.restarts),
                last_exit: child.last_exit,
            },
        }
    }
}

/// How many reads from vLLM have brought data to the proxy's workers (response heads and bodies,
/// not the gateway's own probes): when the total moves on between two `/health` probes, vLLM is
/// answering requests, however slowly its `/health` does. One count per worker, which only that
/// worker writes.
#[derive(Clone, Default)]
pub struct VllmReads {
    workers: Arc<Mutex<Vec<Arc<ReadCount>>>>,
}

impl VllmReads {
    /// A count for one worker's connections. Made on the worker's thread, it lands among that
    /// worker's memory.
    pub fn worker(&self) -> Arc<ReadCount> {
        let count = Arc::new(ReadCount::default());
        self.workers.lock().push(Arc::clone(&count));
        count
    }

    /// Whether any worker has read since `seen` (the total the last call saw), which it updates.
    pub fn moved_since(&self, seen: &mut u64) -> bool {
        let total = self.total();
        std::mem::replace(seen, total) != total
    }

    /// Every worker's reads so far, those of workers that have ended included.
    pub fn total(&self) -> u64 {
        self.workers
            .lock()
            .iter()
            .map(|count| count.0.load(Ordering::Relaxed))
            .sum()
    }
}

/// One worker's reads from vLLM, on a cache line of its own: a count that two workers wrote
/// would move between their CPUs at every read.
#[repr(align(128))]
#[derive(Default)]
pub struct ReadCount(AtomicU64);

impl ReadCount {
    /// One more. Only the worker that owns it writes it, so a load and a store do.
    pub fn count(&self) {
        self.0
            .store(self.0.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}
