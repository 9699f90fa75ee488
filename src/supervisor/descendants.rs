//! The gateway's descendants other than a running vLLM's group: processes that left vLLM's group
//! (a setsid'd worker, a daemonised helper) and were adopted by the gateway as subreaper (or as
//! PID 1) once their parent died. They survive every stop of vLLM's group, so before each spawn
//! and before the gateway exits they are all stopped: SIGTERM, then SIGKILL after `stop_timeout`.
//!
//! They are found by walking `/proc` down the parent links from the gateway's own pid, so that
//! nothing outside the gateway's tree is ever signalled. Left alone: the gateway's guard
//! processes (`gateway __guard`, which must outlive a SIGKILLed gateway) and the pids the caller
//! names (a running vLLM, whose group is stopped its own way). Owns no state; the reaper reaps
//! whatever exits.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::time::Instant;

use crate::supervisor::port::{processes, stat};

/// How often the walk is repeated while waiting for the stopped processes to go.
const POLL: Duration = Duration::from_millis(50);

/// Stops every descendant of the gateway except guards and `keep` (with their own descendants):
/// SIGTERM at once, SIGKILL to those still there after `grace`. Returns once none is left (or a
/// second after the SIGKILL, should one be stuck in the kernel). Processes adopted meanwhile (the
/// children of one that just died) are signalled as they appear.
pub async fn stop_all(keep: &[u32], grace: Duration) {
    let keep: Vec<i32> = keep.iter().map(|&pid| pid as i32).collect();
    let first = find(&keep);
    if first.is_empty() {
        return;
    }
    tracing::warn!(
        pids = ?first,
        "stopping processes left behind by vLLM outside its process group (SIGTERM)"
    );
    let mut signalled: HashSet<i32> = HashSet::new();
    let kill_at = Instant::now() + grace;
    loop {
        let left = find(&keep);
        if left.is_empty() {
            return;
        }
        for &pid in &left {
            if signalled.insert(pid) {
                signal(pid, Signal::SIGTERM);
            }
        }
        if Instant::now() >= kill_at {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let give_up_at = Instant::now() + Duration::from_secs(1);
    let mut killed: HashSet<i32> = HashSet::new();
    loop {
        let left = find(&keep);
        if left.is_empty() {
            return;
        }
        let fresh: Vec<i32> = left
            .iter()
            .copied()
            .filter(|pid| killed.insert(*pid))
            .collect();
        if !fresh.is_empty() {
            tracing::warn!(
                pids = ?fresh,
                stop_timeout = %humantime::format_duration(grace),
                "processes left behind by vLLM did not stop in time; sending SIGKILL"
            );
            for pid in fresh {
                signal(pid, Signal::SIGKILL);
            }
        }
        if Instant::now() >= give_up_at {
            tracing::error!(pids = ?left, "processes left behind by vLLM survive SIGKILL");
            return;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Live (not zombie) descendants of this process, except guards and `keep` and everything below
/// them.
pub fn find(keep: &[i32]) -> Vec<i32> {
    let own = std::process::id() as i32;
    let mut children: HashMap<i32, Vec<(i32, bool)>> = HashMap::new();
    for pid in processes() {
        if let Some((state, parent, _)) = stat(pid) {
            let live = !matches!(state, 'Z' | 'X');
            children.entry(parent).or_default().push((pid, live));
        }
    }
    let mut found = Vec::new();
    let mut queue = vec![own];
    while let Some(parent) = queue.pop() {
        for &(pid, live) in children.get(&parent).into_iter().flatten() {
            if keep.contains(&pid) || is_guard(pid) {
                continue;
            }
            if live {
                found.push(pid);
            }
            queue.push(pid);
        }
    }
    found.sort_unstable();
    found
}

fn signal(pid: i32, signal: Signal) {
    // ESRCH: it went on its own meanwhile.
    let _ = kill(Pid::from_raw(pid), signal);
}

/// `gateway __guard ...`: the second word of its command line.
fn is_guard(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        cmdline.split(|byte| *byte == 0).nth(1) == Some(crate::supervisor::guard::ARG.as_bytes())
    })
}
