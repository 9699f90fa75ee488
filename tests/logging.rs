//! Logs as an operator reads them. Under systemd the gateway finds the journal through the
//! documented `$JOURNAL_STREAM` check and writes to journald's socket; a datagram socket stands in
//! for journald, mounted at /run/systemd/journal in a mount namespace of the gateway's own.
//! Elsewhere it writes JSON lines. Both carry the same fields, checked by one set of assertions.

mod common;

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use common::*;

/// One log entry as journald stores it: upper-case field names, text values.
type Entry = BTreeMap<String, String>;

/// Hides the host's /run, mounts the stand-in journal directory (`$0`, or none when it is `-`)
/// where journald's socket lives, and sets `$JOURNAL_STREAM` to stderr's device and inode, as
/// systemd does for a unit's stderr.
const IN_JOURNAL_NAMESPACE: &str = r#"set -e
mount -t tmpfs tmpfs /run
if [ "$0" != - ]; then
    mkdir -p /run/systemd/journal
    mount --bind "$0" /run/systemd/journal
fi
export JOURNAL_STREAM="$(stat -L -c %d:%i /proc/self/fd/2)"
exec "$@""#;

/// The command that runs the gateway in a mount namespace of its own with `journal_dir` (holding
/// a `socket`) as journald's directory, or with no journald at all.
fn journal_namespace(journal_dir: Option<&str>) -> Vec<&str> {
    let mut wrapper = vec!["unshare"];
    if !nix::unistd::geteuid().is_root() {
        wrapper.push("--map-root-user");
    }
    wrapper.extend(["--mount", "sh", "-c", IN_JOURNAL_NAMESPACE]);
    wrapper.push(journal_dir.unwrap_or("-"));
    wrapper
}

/// Collects every datagram sent to the stand-in journald socket.
struct Journald {
    entries: Arc<Mutex<Vec<Entry>>>,
    dir: tempfile::TempDir,
}

impl Journald {
    fn listen() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = UnixDatagram::bind(dir.path().join("socket")).expect("bind journal socket");
        let entries = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&entries);
        std::thread::spawn(move || {
            let mut buffer = vec![0u8; 256 * 1024];
            while let Ok(len) = socket.recv(&mut buffer) {
                // tracing-journald sends an empty datagram first, to check the socket.
                if len > 0 {
                    let entry = parse_native_entry(&buffer[..len]);
                    sink.lock().expect("lock").push(entry);
                }
            }
        });
        Journald { entries, dir }
    }

    /// The command that runs the gateway in its own mount namespace with this socket as journald's.
    fn wrapper(&self) -> Vec<&str> {
        journal_namespace(Some(self.dir.path().to_str().expect("utf-8 path")))
    }

    fn entries(&self) -> Vec<Entry> {
        self.entries.lock().expect("lock").clone()
    }
}

/// Parses journald's native protocol: `NAME=value\n`, or `NAME\n` + 64-bit little-endian length +
/// value + `\n` for values that may hold newlines.
fn parse_native_entry(mut bytes: &[u8]) -> Entry {
    let mut entry = Entry::new();
    while !bytes.is_empty() {
        let end = bytes
            .iter()
            .position(|byte| *byte == b'=' || *byte == b'\n')
            .expect("a field name ends with '=' or a newline");
        let name = String::from_utf8(bytes[..end].to_vec()).expect("field name is text");
        let value;
        if bytes[end] == b'=' {
            let rest = &bytes[end + 1..];
            let newline = rest
                .iter()
                .position(|byte| *byte == b'\n')
                .expect("value ends");
            value = &rest[..newline];
            bytes = &rest[newline + 1..];
        } else {
            let rest = &bytes[end + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")) as usize;
            value = &rest[8..8 + len];
            assert_eq!(
                rest[8 + len],
                b'\n',
                "a length-encoded value ends with a newline"
            );
            bytes = &rest[8 + len + 1..];
        }
        entry.insert(name, String::from_utf8_lossy(value).into_owned());
    }
    entry
}

/// The JSON log's lines as journald entries: each line must be a JSON object; its keys are
/// upper-cased and its values written as text.
fn json_entries(log: &str) -> Vec<Entry> {
    log.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("log line is not a JSON object ({error}): {line}"));
            object
                .into_iter()
                .map(|(key, value)| {
                    let text = match value {
                        serde_json::Value::String(text) => text,
                        other => other.to_string(),
                    };
                    (key.to_uppercase(), text)
                })
                .collect()
        })
        .collect()
}

fn find<'a>(entries: &'a [Entry], fields: &[(&str, &str)]) -> Option<&'a Entry> {
    entries.iter().find(|entry| {
        fields
            .iter()
            .all(|(name, value)| entry.get(*name).map(String::as_str) == Some(*value))
    })
}

fn expect<'a>(entries: &'a [Entry], fields: &[(&str, &str)]) -> &'a Entry {
    find(entries, fields).unwrap_or_else(|| {
        panic!("no log entry with {fields:?}; entries:\n{entries:#?}");
    })
}

/// One life of `gateway serve`: vLLM becomes ready, one request is answered, vLLM exits with code 3
/// and is restarted, SIGTERM stops everything. Then the entries the operator reads must show each
/// step with its fields. Returns the entries for format-specific checks.
fn check_one_life(
    gateway: &mut Proc,
    vllm_port: u16,
    entries: &dyn Fn(&Proc) -> Vec<Entry>,
) -> Vec<Entry> {
    wait_until("the gateway to listen", DEADLINE, || {
        accepts_connections(gateway.port)
    });
    let response = post_json(
        gateway.port,
        "/v1/responses",
        RESPONSES_JSON,
        "\r\nX-Request-Id: log-test-1",
    );
    assert_eq!(response.status, 200);
    wait_until("the access log entry", DEADLINE, || {
        find(&entries(gateway), &[("REQUEST_ID", "log-test-1")]).is_some()
    });
    let first = entries(gateway);
    let started = expect(
        &first,
        &[("MESSAGE", "vLLM state changed"), ("STATE", "starting")],
    );
    let first_pid = started["PID"].clone();
    expect(
        &first,
        &[
            ("STATE", "ready"),
            ("PID", &first_pid),
            ("PREVIOUS", "starting"),
        ],
    );
    let access = expect(&first, &[("REQUEST_ID", "log-test-1")]);
    assert_eq!(access["TARGET"], "gateway::access");
    assert_eq!(access["STATUS"], "200");
    assert_eq!(access["METHOD"], "POST");
    assert_eq!(access["ROUTE"], "/v1/responses");
    let vllm_line = expect(
        &first,
        &[(
            "MESSAGE",
            &format!("INFO:     Started server process [{first_pid}]"),
        )],
    );
    assert_eq!(vllm_line["TARGET"], "vllm");
    assert_eq!(vllm_line["PID"], first_pid);
    assert_eq!(vllm_line["STREAM"], "stdout");

    let exit = raw_request(vllm_port, "POST /_mock/exit?code=3 HTTP/1.1", b"");
    assert_eq!(exit.status, 200);
    wait_until("vLLM to be restarted and ready", DEADLINE, || {
        entries(gateway)
            .iter()
            .filter(|entry| entry.get("STATE").map(String::as_str) == Some("ready"))
            .count()
            == 2
    });
    gateway.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(0));

    let all = entries(gateway);
    let exited = expect(&all, &[("MESSAGE", "vLLM exited on its own")]);
    assert_eq!(exited["EXIT_CODE"], "3");
    assert_eq!(exited["PID"], first_pid);
    let restarting = expect(&all, &[("STATE", "restarting"), ("PREVIOUS", "ready")]);
    assert!(
        !restarting.contains_key("PID"),
        "no vLLM runs while it waits to restart"
    );
    let restarted = all
        .iter()
        .filter(|entry| entry.get("STATE").map(String::as_str) == Some("starting"))
        .nth(1)
        .expect("a second start");
    assert_ne!(restarted["PID"], first_pid, "the restart is a new process");
    expect(&all, &[("STATE", "stopped"), ("PREVIOUS", "stopping")]);
    all
}

#[test]
fn under_systemd_logs_go_to_journald_with_fields_and_vllm_under_its_own_identifier() {
    let journald = Journald::listen();
    let wrapper = journald.wrapper();
    // The gateway reports its ports to the journal here, not to its output.
    let mut gateway = spawn_gateway_serve(&wrapper, 0, MOCK_VLLM, 0, &[], &[]);
    let mut vllm_port = 0;
    wait_until("the gateway to journal its ports", DEADLINE, || {
        let entries = journald.entries();
        let field = |name: &str| entries.iter().find_map(|entry| entry.get(name).cloned());
        gateway.port = field("LISTEN")
            .and_then(|listen| listen.parse::<std::net::SocketAddr>().ok())
            .map_or(0, |address| address.port());
        vllm_port = field("VLLM_PORT")
            .and_then(|port| port.parse().ok())
            .unwrap_or(0);
        gateway.port != 0 && vllm_port != 0
    });

    let entries = check_one_life(&mut gateway, vllm_port, &|_| journald.entries());

    for entry in &entries {
        let expected = if entry["TARGET"] == "vllm" {
            "vllm"
        } else {
            "gateway"
        };
        assert_eq!(entry["SYSLOG_IDENTIFIER"], expected, "{entry:#?}");
    }
    let ready = expect(&entries, &[("STATE", "ready")]);
    assert_eq!(ready["PRIORITY"], "6", "info is syslog's informational");
    let exited = expect(&entries, &[("MESSAGE", "vLLM exited on its own")]);
    assert_eq!(exited["PRIORITY"], "4", "warn is syslog's warning");
    let stderr = gateway.log_text();
    assert!(
        !stderr.contains("vLLM state changed") && !stderr.contains("Started server process"),
        "with the journal detected nothing is logged twice to stderr:\n{stderr}"
    );
}

#[test]
fn without_a_journal_logs_are_json_lines_with_the_same_fields() {
    let (mut gateway, vllm_port) = gateway_serve(&[], &[("JOURNAL_STREAM", "1:1")]);

    let entries = check_one_life(&mut gateway, vllm_port, &|gateway| {
        json_entries(&gateway.log_text())
    });

    let exited = expect(&entries, &[("MESSAGE", "vLLM exited on its own")]);
    assert_eq!(exited["LEVEL"], "WARN");
    assert!(entries.iter().all(|entry| entry.contains_key("TIMESTAMP")));
}

#[test]
fn when_stderr_is_the_journal_but_journald_is_unreachable_logs_fall_back_to_json() {
    let wrapper = journal_namespace(None);
    let (mut gateway, _) = gateway_serve_wrapped(&wrapper, 0, &[], &[]);
    wait_until("the gateway to listen", DEADLINE, || {
        accepts_connections(gateway.port)
    });
    gateway.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(0));

    let entries = json_entries(&gateway.log_text());
    let warning = expect(&entries, &[("LEVEL", "WARN")]);
    assert!(
        warning["MESSAGE"].contains("journald's socket cannot be opened"),
        "{warning:#?}"
    );
    expect(&entries, &[("STATE", "ready")]);
}

#[test]
fn an_explicit_journald_format_without_journald_is_a_start_up_error() {
    let mut command = journal_namespace(None).into_iter();
    let output = std::process::Command::new(command.next().expect("unshare"))
        .args(command)
        .args([
            GATEWAY,
            "--llm-api-base",
            "http://127.0.0.1:9",
            "--log-format",
            "journald",
        ])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot set up logging: log_format = \"journald\", but journald's socket"),
        "{stderr}"
    );
}

/// A client may put its key in the URL; vLLM's access line repeats the URL as it came, and the
/// gateway relays vLLM's output into its log: the key must not get there.
#[test]
fn a_key_in_a_query_string_does_not_reach_the_log_through_vllms_access_line() {
    let (gateway, _) = gateway_serve(&[], &[]);
    wait_ready(&gateway);
    let (status, _) =
        get(&gateway.url("/v1/models?limit=5&api_key=sk-IN-THE-URL")).expect("an answer");
    assert_eq!(status, 200);
    wait_until("vLLM's access line for the request", DEADLINE, || {
        gateway
            .log_text()
            .contains("GET /v1/models?limit=5&api_key=*** HTTP/1.1")
    });
    assert!(
        !gateway.log_text().contains("sk-IN-THE-URL"),
        "{}",
        gateway.log_text()
    );
}
