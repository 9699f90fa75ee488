//! Relays the child's stdout and stderr into the gateway's log, line by line, tagged with the
//! stream and the child's pid.
//!
//! The pipes are always drained at full speed, so the child never blocks on a write because of
//! the gateway: lines go through a bounded queue to a writer task, and when the log cannot keep up
//! lines are dropped and counted rather than buffered. A line longer than [`MAX_LINE`] is cut.
//! A carriage return ends a line as a newline does, so progress bars log one line per redraw.
//! Secret query parameters (`?api_key=...`, which uvicorn's access lines repeat as the client
//! sent them) are hidden.

use std::borrow::Cow;
use std::os::fd::OwnedFd;

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use crate::supervisor::child;
pub use crate::telemetry::VLLM_TARGET as TARGET;

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

/// Copies of the read ends of a child's pipes, which a new gateway image takes over across an
/// in-place upgrade (the readers' own copies end with the old image). Close-on-exec, like every
/// descriptor of the gateway's.
#[derive(Debug, Default)]
pub struct Kept {
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// Starts the readers and the writer for one child; returns copies of the pipes' read ends.
pub fn relay(pid: u32, stdout: Option<OwnedFd>, stderr: Option<OwnedFd>) -> Kept {
    let (lines_tx, mut lines_rx) = mpsc::channel::<(Stream, String)>(QUEUE);
    let mut kept = Kept::default();
    for (stream, fd) in [(Stream::Stdout, stdout), (Stream::Stderr, stderr)] {
        let Some(fd) = fd else { continue };
        let copy = match fd.try_clone() {
            Ok(copy) => Some(copy),
            Err(error) => {
                tracing::warn!(pid, stream = stream.name(), %error, "cannot keep a copy of vLLM's output pipe; an in-place upgrade will not take it over");
                None
            }
        };
        match stream {
            Stream::Stdout => kept.stdout = copy,
            Stream::Stderr => kept.stderr = copy,
        }
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
            if is_probe_access_line(&line) {
                tracing::debug!(target: TARGET, pid, stream = stream.name(), "{line}");
            } else {
                tracing::info!(target: TARGET, pid, stream = stream.name(), "{line}");
            }
        }
    });
    kept
}

/// uvicorn's access line for a `/health` answered 200: what the gateway's own probe causes every
/// `health_interval` (17,280 lines a day at 5 s). Logged at debug, so the journal keeps vLLM's
/// other lines; a failed probe (any other status) stays at info.
fn is_probe_access_line(line: &str) -> bool {
    line.contains("\"GET /health HTTP/1.1\" 200")
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
        // A carriage return ends a line too: progress bars (tqdm, while vLLM loads weights)
        // redraw themselves with `\r`, and each state becomes a line of its own rather than one
        // line of every state, cut at MAX_LINE.
        for chunk in buffer[..read].split_inclusive(|byte| matches!(byte, b'\n' | b'\r')) {
            let (content, complete) = match chunk.split_last() {
                Some((b'\n' | b'\r', content)) => (content, true),
                _ => (chunk, false),
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
    if line.is_empty() && !*truncated {
        // The empty line between `\r` and `\n`, or a blank line: nothing to log.
        return;
    }
    let text = String::from_utf8_lossy(line);
    let mut text = match hide_query_secrets(&text) {
        Cow::Borrowed(_) => text.into_owned(),
        Cow::Owned(hidden) => hidden,
    };
    if *truncated {
        text.push_str(" [line truncated]");
    }
    line.clear();
    *truncated = false;
    if lines.try_send((stream, text)).is_err() {
        *dropped += 1;
    }
}

/// `line` with the value of every secret query parameter shown as `***`: one whose name, percent-
/// decoded and without trailing brackets or spaces (`api_key[]`), says it is secret (see
/// `child::is_secret_name`: `api_key`, `access_token`, ...). A query runs from a `?` to the next
/// space or double quote, as in uvicorn's `"GET /v1/models?api_key=... HTTP/1.1"`, and `?`, `&`
/// and `;` separate its parameters. One pass over the line; a line without a secret is not copied.
fn hide_query_secrets(line: &str) -> Cow<'_, str> {
    let bytes = line.as_bytes();
    let mut hidden = String::new();
    // How much of `line` is in `hidden` so far; 0 while nothing was hidden.
    let mut copied = 0;
    let mut in_query = false;
    let mut parameter = 0;
    // One past the end counts as a space, which ends the last query.
    for at in 0..=bytes.len() {
        let byte = bytes.get(at).copied().unwrap_or(b' ');
        let ends_query = byte.is_ascii_whitespace() || byte == b'"';
        if !(ends_query || matches!(byte, b'?' | b'&' | b';')) {
            continue;
        }
        if in_query
            && let Some((name, value)) = line[parameter..at].split_once('=')
            && !value.is_empty()
            && child::is_secret_name(&parameter_name(name))
        {
            let value_starts = parameter + name.len() + 1;
            hidden.push_str(&line[copied..value_starts]);
            hidden.push_str("***");
            copied = at;
        }
        in_query = (in_query || byte == b'?') && !ends_query;
        parameter = at + 1;
    }
    if copied == 0 {
        return Cow::Borrowed(line);
    }
    hidden.push_str(&line[copied..]);
    Cow::Owned(hidden)
}

/// A query parameter's name as a server reads it: `+` as a space, percent-decoded, and without
/// what follows the name itself (`[]`, spaces).
fn parameter_name(name: &str) -> String {
    percent_encoding::percent_decode_str(&name.replace('+', " "))
        .decode_utf8_lossy()
        .trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_query_parameters_are_hidden() {
        let line = r#"INFO:     127.0.0.1:5 - "GET /v1/models?limit=2&api_key=sk-abc&access_token=t0 HTTP/1.1" 200 OK"#;
        assert_eq!(
            hide_query_secrets(line),
            r#"INFO:     127.0.0.1:5 - "GET /v1/models?limit=2&api_key=***&access_token=*** HTTP/1.1" 200 OK"#
        );
        for (query, shown) in [
            ("?a=1?api_key=S", "?a=1?api_key=***"),
            ("?x='&api_key=S", "?x='&api_key=***"),
            ("?a=1;api_key=S", "?a=1;api_key=***"),
            ("?api_ke%79=S", "?api_ke%79=***"),
            (
                "?api_key[]=S&api_key%5B%5D=S",
                "?api_key[]=***&api_key%5B%5D=***",
            ),
            ("?api_key+=S&API_KEY%20=S", "?api_key+=***&API_KEY%20=***"),
            (
                "?authorization=Bearer%20S&pwd=S",
                "?authorization=***&pwd=***",
            ),
            ("?key=k#frag", "?key=***"),
            ("?api_key=&key", "?api_key=&key"),
        ] {
            assert_eq!(hide_query_secrets(query), shown, "{query}");
        }
        for kept in [
            r#"INFO:     127.0.0.1:5 - "GET /v1/models?limit=2 HTTP/1.1" 200 OK"#,
            "what? key=value is not a query parameter? no",
            "api_key=S outside a query",
            "Loading weights ?",
        ] {
            assert!(
                matches!(hide_query_secrets(kept), Cow::Borrowed(_)),
                "{kept}"
            );
        }
    }

    /// The work is linear in the line: a line of `?` (a URL a client may send) costs no more
    /// than one pass.
    #[test]
    fn a_line_of_question_marks_is_one_pass() {
        let line = format!("GET /v1/models{} HTTP/1.1", "?".repeat(MAX_LINE));
        assert!(matches!(hide_query_secrets(&line), Cow::Borrowed(_)));
        let line = format!("GET /v1/models{}key=S HTTP/1.1", "?".repeat(MAX_LINE));
        assert!(hide_query_secrets(&line).ends_with("key=*** HTTP/1.1"));
    }

    /// Feeds `bytes` through `read_lines` as a pipe would, and returns the lines it emits.
    async fn lines_of(bytes: &[u8]) -> Vec<String> {
        let (receiver, sender) = nix::unistd::pipe().expect("pipe");
        // Within the pipe's capacity, so the write completes before anything reads; dropping the
        // writer closes it, which ends `read_lines`.
        let mut writer = std::fs::File::from(sender);
        std::io::Write::write_all(&mut writer, bytes).expect("write");
        drop(writer);
        let receiver = pipe::Receiver::from_owned_fd(receiver).expect("receiver");
        let (lines_tx, mut lines_rx) = mpsc::channel(QUEUE);
        read_lines(1, Stream::Stdout, receiver, lines_tx).await;
        let mut lines = Vec::new();
        while let Ok((_, line)) = lines_rx.try_recv() {
            lines.push(line);
        }
        lines
    }

    #[tokio::test]
    async fn progress_bar_redraws_become_lines_and_crlf_is_one_break() {
        let lines = lines_of(b"start\r\nLoading: 10%\rLoading: 60%\rLoading: 100%\nlast").await;
        assert_eq!(
            lines,
            [
                "start",
                "Loading: 10%",
                "Loading: 60%",
                "Loading: 100%",
                "last"
            ]
        );
    }

    #[test]
    fn only_a_successful_health_access_line_is_a_probe_line() {
        assert!(is_probe_access_line(
            "INFO:     127.0.0.1:53422 - \"GET /health HTTP/1.1\" 200 OK"
        ));
        assert!(!is_probe_access_line(
            "INFO:     127.0.0.1:53422 - \"GET /health HTTP/1.1\" 503 Service Unavailable"
        ));
        assert!(!is_probe_access_line(
            "INFO:     127.0.0.1:53422 - \"POST /v1/responses HTTP/1.1\" 200 OK"
        ));
    }

    #[tokio::test]
    async fn a_long_line_is_cut_and_marked() {
        let mut long = vec![b'x'; MAX_LINE + 10];
        long.push(b'\n');
        let lines = lines_of(&long).await;
        assert_eq!(lines.len(), 1);
        assert!(lines[0].ends_with(" [line truncated]"));
        assert_eq!(lines[0].len(), MAX_LINE + " [line truncated]".len());
    }
}
