//! What mock-vllm leaves outside itself for tests to check: a bare grandchild that it never stops
//! (besides the engine processes, which it does stop), the pid file, and the output flood.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::process::{Command, Stdio};

use crate::log::say;

pub(crate) fn spawn_grandchild(detach: bool) -> Result<u32, String> {
    // The grandchild stays in our process group and shares our stdout and stderr, as vLLM's
    // EngineCore does, so that a supervisor which stops only our pid leaves it behind.
    let mut command = Command::new("sleep");
    command.arg("100000").stdin(Stdio::null());
    if detach {
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
    }
    let child = command
        .spawn()
        .map_err(|error| format!("cannot start the grandchild `sleep 100000`: {error}"))?;
    let pid = child.id();
    say(format_args!("INFO:     Started grandchild process [{pid}]"));
    // Dropping a std Child neither kills nor reaps it, which is the point.
    drop(child);
    Ok(pid)
}

/// Appends `<pid> <grandchild pid or 0> <engine core pid or 0>`, one line per start.
pub(crate) fn append_pid_line(
    path: &std::path::Path,
    grandchild: Option<u32>,
    engine_core: Option<u32>,
) -> Result<(), String> {
    let line = format!(
        "{} {} {}\n",
        std::process::id(),
        grandchild.unwrap_or(0),
        engine_core.unwrap_or(0)
    );
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|error| format!("cannot open the pid file {}: {error}", path.display()))?;
    // One write of a short line to a file opened for append lands whole, even when several
    // restarts share the file.
    file.write_all(line.as_bytes())
        .map_err(|error| format!("cannot write the pid file {}: {error}", path.display()))
}

pub(crate) fn start_flood() -> Result<(), String> {
    std::thread::Builder::new()
        .name("flood".to_owned())
        .spawn(flood)
        .map(drop)
        .map_err(|error| format!("cannot start the flood thread: {error}"))
}

/// Writes as much as the pipes take; blocking here is fine because nothing else runs on this
/// thread, and it stops when a pipe is closed.
pub(crate) fn flood() {
    let mut long_line = vec![b'x'; 1024 * 1024];
    long_line.push(b'\n');
    if io::stderr().lock().write_all(&long_line).is_err() {
        return;
    }
    for number in 1u64.. {
        let line = format!("INFO:     mock-vllm flood line {number}\n");
        let mut stdout = io::stdout().lock();
        if stdout
            .write_all(line.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return;
        }
    }
}
