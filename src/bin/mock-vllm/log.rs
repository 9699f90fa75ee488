//! Output in uvicorn's format through a log writer thread, so that output nobody reads stalls
//! that thread and never the server; and exiting after the queued lines are written.

use std::fmt;
use std::io::{self, Write};
use std::sync::OnceLock;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::time::{Duration, Instant};

/// How many log lines may wait for a slow reader before new ones are dropped.
pub(crate) const LOG_QUEUE_LINES: usize = 4096;

/// How long an exit waits for queued log lines to be written.
pub(crate) const LOG_FLUSH_TIMEOUT: Duration = Duration::from_millis(500);

/// Log lines on their way to the log writer thread. The server never writes to stdout or stderr
/// itself, so that output nobody reads stalls that thread and not the server.
pub(crate) static LOG_QUEUE: OnceLock<SyncSender<LogItem>> = OnceLock::new();

#[derive(Debug, Clone, Copy)]
pub(crate) enum Output {
    Stdout,
    Stderr,
}

pub(crate) enum LogItem {
    Line(Output, String),
    /// Answered once every line queued before it is written.
    Flush(mpsc::Sender<()>),
}

/// Logs one line to stdout.
pub(crate) fn say(line: fmt::Arguments<'_>) {
    emit(Output::Stdout, line);
}

/// Logs one line to stderr.
pub(crate) fn complain(line: fmt::Arguments<'_>) {
    emit(Output::Stderr, line);
}

/// Hands a line to the log writer once it runs, and writes it directly before that.
pub(crate) fn emit(output: Output, line: fmt::Arguments<'_>) {
    let line = format!("{line}\n");
    match LOG_QUEUE.get() {
        // A full queue means nobody reads our output; the line is dropped rather than stalling
        // the server.
        Some(queue) => drop(queue.try_send(LogItem::Line(output, line))),
        None => write_line(output, &line),
    }
}

/// Writes one whole line and flushes it; a closed pipe is not worth dying for.
pub(crate) fn write_line(output: Output, line: &str) {
    let _ = match output {
        Output::Stdout => {
            let mut stdout = io::stdout().lock();
            stdout
                .write_all(line.as_bytes())
                .and_then(|()| stdout.flush())
        }
        Output::Stderr => io::stderr().lock().write_all(line.as_bytes()),
    };
}

pub(crate) fn start_log_writer() -> Result<(), String> {
    let (queue, lines) = mpsc::sync_channel(LOG_QUEUE_LINES);
    std::thread::Builder::new()
        .name("log-writer".to_owned())
        .spawn(move || {
            for item in lines {
                match item {
                    LogItem::Line(output, line) => write_line(output, &line),
                    LogItem::Flush(done) => drop(done.send(())),
                }
            }
        })
        .map_err(|error| format!("cannot start the log writer thread: {error}"))?;
    // Only main calls this, once, so the cell is always empty here.
    let _ = LOG_QUEUE.set(queue);
    Ok(())
}

/// Waits, at most `LOG_FLUSH_TIMEOUT`, until every queued line is written, so that an exit keeps
/// the lines that explain it even when our output is not read.
pub(crate) fn flush_log() {
    let Some(queue) = LOG_QUEUE.get() else {
        return;
    };
    let deadline = Instant::now() + LOG_FLUSH_TIMEOUT;
    let (done_tx, done_rx) = mpsc::channel();
    let mut item = LogItem::Flush(done_tx);
    loop {
        match queue.try_send(item) {
            Ok(()) => break,
            Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                item = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => return,
        }
    }
    let _ = done_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
}

/// Exits at once, after giving the log writer a moment to write what is queued.
pub(crate) fn exit_now(code: u8) -> ! {
    // vLLM's API server stops its engine on every exit it makes itself.
    crate::engine::stop_engine();
    flush_log();
    std::process::exit(i32::from(code))
}
