//! The `MOCK_VLLM_*` knobs: their table (which `--help` prints), and reading them from the
//! environment once at start, reporting every bad or unknown one at once.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use axum::http::StatusCode;

/// Every knob with an example value and its help line; `--help` prints it and a unit test checks
/// that the parser accepts every name in it.
pub(crate) const KNOBS: &[(&str, &str, &str)] = &[
    (
        "MOCK_VLLM_STARTUP_DELAY",
        "2s",
        "duration: hold the port but refuse connections this long before listening (default 0)",
    ),
    (
        "MOCK_VLLM_STREAM_DELAY",
        "50ms",
        "duration: pause between stream events (default 0)",
    ),
    (
        "MOCK_VLLM_HEADERS_DELAY",
        "1s",
        "duration: wait before answering /v1/responses, /v1/chat/completions and /v1/completions \
         (default 0)",
    ),
    (
        "MOCK_VLLM_FAIL_STATUS",
        "503",
        "400-599: answer /v1/responses, /v1/chat/completions and /v1/completions with this status \
         and an error body",
    ),
    (
        "MOCK_VLLM_DIE_MID_STREAM",
        "3",
        "N: once a stream has sent N events, exit at once with code 1",
    ),
    (
        "MOCK_VLLM_STALL_MID_STREAM",
        "3",
        "N: once a stream has sent N events, send nothing more and never end it",
    ),
    (
        "MOCK_VLLM_CRASH_AFTER",
        "5s",
        "duration: this long after listening, exit with MOCK_VLLM_EXIT_CODE",
    ),
    (
        "MOCK_VLLM_EXIT_CODE",
        "3",
        "0-255: exit code for MOCK_VLLM_CRASH_AFTER (default 1)",
    ),
    (
        "MOCK_VLLM_EXIT_AT_START",
        "1",
        "0-255: exit with this code before binding, like vLLM rejecting an argument",
    ),
    (
        "MOCK_VLLM_HANG_HEALTH_AFTER",
        "5s",
        "duration: this long after listening, /health (and /ping) stops answering",
    ),
    (
        "MOCK_VLLM_IGNORE_SIGTERM",
        "1",
        "bool: log and ignore SIGTERM and SIGINT (SIGQUIT and SIGKILL still stop it)",
    ),
    (
        "MOCK_VLLM_IGNORE_SIGHUP",
        "1",
        "bool: log and ignore SIGHUP (by default it kills the process, as it kills vLLM)",
    ),
    (
        "MOCK_VLLM_HANDLE_SIGUSR",
        "1",
        "bool: log and record SIGUSR1 and SIGUSR2 (by default they kill the process, as they kill vLLM)",
    ),
    (
        "MOCK_VLLM_ENGINE_PROCESSES",
        "0",
        "bool: start VLLM::EngineCore and VLLM::Worker processes in this process group, as vLLM \
         does (default 1)",
    ),
    (
        "MOCK_VLLM_ENGINE_DIE_AFTER",
        "5s",
        "duration: this long after listening, the engine dies (EngineCore is killed)",
    ),
    (
        "MOCK_VLLM_ENGINE_DEATH_LINGER",
        "200ms",
        "duration: once the engine is dead, /health answers 503 (and generation requests 500, the \
         first of which ends the wait) this long, then the server exits 0 (default 5s, as vLLM)",
    ),
    (
        "MOCK_VLLM_SPAWN_GRANDCHILD",
        "1",
        "bool: start `sleep 100000` in this process group, a descendant this process never stops",
    ),
    (
        "MOCK_VLLM_DETACH_GRANDCHILD",
        "1",
        "bool: start that grandchild in a process group of its own instead",
    ),
    (
        "MOCK_VLLM_PID_FILE",
        "/tmp/mock-vllm.pids",
        "path: append '<pid> <grandchild pid or 0> <engine core pid or 0>' to this file at start",
    ),
    (
        "MOCK_VLLM_FLOOD",
        "1",
        "bool: write a 1 MiB line to stderr, then log lines to stdout as fast as the pipe takes them",
    ),
    (
        "MOCK_VLLM_SHUTDOWN_GRACE",
        "1s",
        "duration: how long a graceful shutdown waits for open responses (default 3s)",
    ),
    (
        "MOCK_VLLM_KEEP_ALIVE_TIMEOUT",
        "1s",
        "duration: close a kept-alive connection idle this long after its last response (default \
         5s, as vLLM: uvicorn's timeout_keep_alive, VLLM_HTTP_TIMEOUT_KEEP_ALIVE)",
    ),
];

/// vLLM's keep-alive timeout: `VLLM_HTTP_TIMEOUT_KEEP_ALIVE` defaults to 5 (seconds), which vLLM
/// passes to uvicorn as `timeout_keep_alive` (whose own default is 5 too).
pub(crate) const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Behaviour knobs, read once from the environment at start.
#[derive(Debug, Clone)]
pub(crate) struct Knobs {
    /// Mirrors vLLM loading its weights: the port is taken but connects are refused meanwhile.
    pub(crate) startup_delay: Duration,
    pub(crate) stream_delay: Duration,
    /// Makes response headers late, to exercise the gateway's time-to-first-byte handling.
    pub(crate) headers_delay: Duration,
    pub(crate) fail_status: Option<StatusCode>,
    pub(crate) die_mid_stream: Option<usize>,
    pub(crate) stall_mid_stream: Option<usize>,
    pub(crate) crash_after: Option<Duration>,
    pub(crate) exit_code: u8,
    pub(crate) exit_at_start: Option<u8>,
    pub(crate) hang_health_after: Option<Duration>,
    pub(crate) ignore_sigterm: bool,
    /// Off by default: vLLM installs no SIGHUP handler, so a hang-up kills it.
    pub(crate) ignore_sighup: bool,
    /// Off by default: vLLM installs no SIGUSR1 or SIGUSR2 handler either.
    pub(crate) handle_sigusr: bool,
    /// Whether to run the engine as vLLM does, in processes of its own in our process group, which
    /// a SIGKILL of this process alone leaves behind.
    pub(crate) engine_processes: bool,
    pub(crate) engine_die_after: Option<Duration>,
    /// How long a server whose engine died keeps answering `/health` with 503 before it exits 0,
    /// unless a generation request meets the dead engine first.
    pub(crate) engine_death_linger: Duration,
    pub(crate) spawn_grandchild: bool,
    pub(crate) detach_grandchild: bool,
    pub(crate) pid_file: Option<PathBuf>,
    pub(crate) flood: bool,
    /// Bounds a graceful shutdown, which would otherwise wait for a stalled stream forever.
    pub(crate) shutdown_grace: Duration,
    /// uvicorn closes a kept-alive connection idle this long; a client that pools connections
    /// must drop them first, or send a request down a connection being closed.
    pub(crate) keep_alive_timeout: Duration,
}

impl Knobs {
    /// Reads every `MOCK_VLLM_*` variable, reporting every bad or unknown one at once.
    pub(crate) fn from_vars(
        vars: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<Self, Vec<String>> {
        let mut reader = KnobReader::default();
        for (name, value) in vars {
            let Some(name) = name.to_str().filter(|name| name.starts_with("MOCK_VLLM_")) else {
                continue;
            };
            match value.into_string() {
                Ok(value) if value.is_empty() => {}
                Ok(value) => {
                    reader.vars.insert(name.to_owned(), value);
                }
                Err(_) => reader
                    .errors
                    .push(format!("{name}: the value is not valid UTF-8")),
            }
        }
        let knobs = Knobs {
            startup_delay: reader
                .duration("MOCK_VLLM_STARTUP_DELAY")
                .unwrap_or_default(),
            stream_delay: reader
                .duration("MOCK_VLLM_STREAM_DELAY")
                .unwrap_or_default(),
            headers_delay: reader
                .duration("MOCK_VLLM_HEADERS_DELAY")
                .unwrap_or_default(),
            fail_status: reader.fail_status("MOCK_VLLM_FAIL_STATUS"),
            die_mid_stream: reader.count("MOCK_VLLM_DIE_MID_STREAM"),
            stall_mid_stream: reader.count("MOCK_VLLM_STALL_MID_STREAM"),
            crash_after: reader.duration("MOCK_VLLM_CRASH_AFTER"),
            exit_code: reader.exit_code("MOCK_VLLM_EXIT_CODE").unwrap_or(1),
            exit_at_start: reader.exit_code("MOCK_VLLM_EXIT_AT_START"),
            hang_health_after: reader.duration("MOCK_VLLM_HANG_HEALTH_AFTER"),
            ignore_sigterm: reader.flag("MOCK_VLLM_IGNORE_SIGTERM").unwrap_or(false),
            ignore_sighup: reader.flag("MOCK_VLLM_IGNORE_SIGHUP").unwrap_or(false),
            handle_sigusr: reader.flag("MOCK_VLLM_HANDLE_SIGUSR").unwrap_or(false),
            engine_processes: reader.flag("MOCK_VLLM_ENGINE_PROCESSES").unwrap_or(true),
            engine_die_after: reader.duration("MOCK_VLLM_ENGINE_DIE_AFTER"),
            engine_death_linger: reader
                .duration("MOCK_VLLM_ENGINE_DEATH_LINGER")
                .unwrap_or(Duration::from_secs(5)),
            spawn_grandchild: reader.flag("MOCK_VLLM_SPAWN_GRANDCHILD").unwrap_or(false),
            detach_grandchild: reader.flag("MOCK_VLLM_DETACH_GRANDCHILD").unwrap_or(false),
            pid_file: reader.take("MOCK_VLLM_PID_FILE").map(PathBuf::from),
            flood: reader.flag("MOCK_VLLM_FLOOD").unwrap_or(false),
            shutdown_grace: reader
                .duration("MOCK_VLLM_SHUTDOWN_GRACE")
                .unwrap_or(Duration::from_secs(3)),
            keep_alive_timeout: reader
                .duration("MOCK_VLLM_KEEP_ALIVE_TIMEOUT")
                .unwrap_or(KEEP_ALIVE_TIMEOUT),
        };
        let KnobReader { vars, mut errors } = reader;
        for name in vars.keys() {
            errors.push(format!(
                "{name}: unknown variable (see mock-vllm --help for the knobs)"
            ));
        }
        if errors.is_empty() {
            Ok(knobs)
        } else {
            Err(errors)
        }
    }
}

/// Takes knob values out of the environment one by one, so that whatever is left is unknown, and
/// collects every error instead of stopping at the first.
#[derive(Default)]
pub(crate) struct KnobReader {
    pub(crate) vars: BTreeMap<String, String>,
    pub(crate) errors: Vec<String>,
}

impl KnobReader {
    pub(crate) fn take(&mut self, name: &str) -> Option<String> {
        self.vars.remove(name)
    }

    pub(crate) fn parse<T>(
        &mut self,
        name: &str,
        expected: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Option<T> {
        let value = self.take(name)?;
        let parsed = parse(value.trim());
        if parsed.is_none() {
            self.errors
                .push(format!("{name}={value:?}: expected {expected}"));
        }
        parsed
    }

    pub(crate) fn duration(&mut self, name: &str) -> Option<Duration> {
        self.parse(name, "a duration such as 500ms or 2s", |value| {
            humantime::parse_duration(value).ok()
        })
    }

    pub(crate) fn count(&mut self, name: &str) -> Option<usize> {
        self.parse(name, "a number of events", |value| value.parse().ok())
    }

    pub(crate) fn exit_code(&mut self, name: &str) -> Option<u8> {
        self.parse(name, "an exit code from 0 to 255", |value| {
            value.parse().ok()
        })
    }

    pub(crate) fn fail_status(&mut self, name: &str) -> Option<StatusCode> {
        self.parse(name, "an HTTP status from 400 to 599", |value| {
            let status = StatusCode::from_bytes(value.as_bytes()).ok()?;
            (status.is_client_error() || status.is_server_error()).then_some(status)
        })
    }

    pub(crate) fn flag(&mut self, name: &str) -> Option<bool> {
        self.parse(
            name,
            "1 or 0 (or true/false, yes/no, on/off)",
            |value| match value.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Some(true),
                "0" | "false" | "no" | "off" => Some(false),
                _ => None,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(name, value)| (OsString::from(name), OsString::from(value)))
            .collect()
    }

    #[test]
    fn every_documented_knob_parses_its_example() {
        let pairs: Vec<_> = KNOBS
            .iter()
            .map(|(name, example, _)| (*name, *example))
            .collect();
        let knobs = Knobs::from_vars(vars(&pairs)).expect("every example value is valid");
        assert_eq!(knobs.fail_status, Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(knobs.die_mid_stream, Some(3));
        assert!(knobs.ignore_sigterm && knobs.spawn_grandchild && knobs.flood);
    }

    #[test]
    fn bad_and_unknown_knobs_are_all_reported() {
        let errors = Knobs::from_vars(vars(&[
            ("MOCK_VLLM_STREAM_DELAY", "soon"),
            ("MOCK_VLLM_FAIL_STATUS", "200"),
            ("MOCK_VLLM_FLOOD", "maybe"),
            ("MOCK_VLLM_TYPO", "1"),
            ("UNRELATED", "x"),
        ]))
        .expect_err("the values are bad");
        assert_eq!(errors.len(), 4, "{errors:?}");
    }

    #[test]
    fn empty_knobs_mean_unset() {
        let knobs = Knobs::from_vars(vars(&[("MOCK_VLLM_EXIT_CODE", "")])).expect("empty is unset");
        assert_eq!(knobs.exit_code, 1);
        assert_eq!(knobs.shutdown_grace, Duration::from_secs(3));
        assert_eq!(knobs.keep_alive_timeout, Duration::from_secs(5));
    }
}
