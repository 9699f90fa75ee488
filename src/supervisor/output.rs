//! Relays the child's stdout and stderr into the gateway's log, line by line, tagged with the
//! stream and the child's pid.
//!
//! The pipes are always drained at full speed, so the child never blocks on a write because of
//! the gateway: lines go through a bounded queue to a writer task, and when the log cannot keep up
//! lines are dropped and counted rather than buffered. A line longer than [`MAX_LINE`] is cut.

use std::os::fd::OwnedFd;

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

/// The tracing target of vLLM's lines; under journald they get their own `SYSLOG_IDENTIFIER`.
pub const TARGET: &str = "vllm";

/// Longest line kept; the rest of a longer line is dropped.
pub const MAX_LINE: usize = 16 * 1024;

/// Lines waiting for the log writer.
const QUEUE: usize = 1024;

#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Starts the readers and the writer for one child.
pub fn relay(pid: u32, stdout: Option<OwnedFd>, stderr: Option<OwnedFd>) {
    let (lines_tx, mut lines_rx) = mpsc::channel::<(Stream, String)>(QUEUE);
    for (stream, fd) in [(Stream::Stdout, stdout), (Stream::Stderr, stderr)] {
        let Some(fd) = fd else { continue };
        match pipe::Receiver::from_owned_fd(fd) {
            Ok(receiver) => {
                tokio::spawn(read_lines(pid, stream, receiver, lines_tx.clone()));
            }
            Err(error) => {
                tracing::warn!(pid, stream = stream.name(), %error, "cannot read vLLM's output")
            }
        }
    }
    drop(lines_tx);
    tokio::spawn(async move {
        while let Some((stream, line)) = lines_rx.recv().await {
            tracing::info!(target: TARGET, pid, stream = stream.name(), "{line}");
        }
    });
}

async fn read_lines(
    pid: u32,
    stream: Stream,
    mut receiver: pipe::Receiver,
    lines: mpsc::Sender<(Stream, String)>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut line: Vec<u8> = Vec::with_capacity(1024);
    let mut truncated = false;
    let mut dropped: u64 = 0;
    loop {
        let read = match receiver.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        for chunk in buffer[..read].split_inclusive(|byte| *byte == b'\n') {
            let (content, complete) = match chunk.strip_suffix(b"\n") {
                Some(content) => (content, true),
                None => (chunk, false),
            };
            let room = MAX_LINE.saturating_sub(line.len());
            if content.len() > room {
                truncated = true;
            }
            line.extend_from_slice(&content[..content.len().min(room)]);
            if complete {
                emit(stream, &mut line, &mut truncated, &lines, &mut dropped);
            }
        }
    }
    if !line.is_empty() {
        emit(stream, &mut line, &mut truncated, &lines, &mut dropped);
    }
    if dropped > 0 {
        tracing::warn!(
            pid,
            stream = stream.name(),
            dropped,
            "vLLM output lines dropped because the log could not keep up"
        );
    }
}

fn emit(
    stream: Stream,
    line: &mut Vec<u8>,
    truncated: &mut bool,
    lines: &mpsc::Sender<(Stream, String)>,
    dropped: &mut u64,
) {
    let mut text = String::from_utf8_lossy(line)
        .trim_end_matches('\r')
        .to_string();
    if *truncated {
        text.push_str(" [line truncated]");
    }
    line.clear();
    *truncated = false;
    if lines.try_send((stream, text)).is_err() {
        *dropped += 1;
    }
}
