//! mock-vllm behaves as real vLLM does where a supervisor or a client can tell: its engine runs in
//! processes of its own that outlive a SIGKILL of the server, an engine death ends in "503 for a
//! while, then exit 0" with generation requests refused meanwhile, idle kept-alive connections are
//! closed, SIGHUP kills it, a token limit gives an incomplete answer, and a stop
//! signal ends an in-flight stream cleanly, and several served names, several keys, the context
//! length and the response head come out as vLLM's. Its chat and legacy completions (whole and
//! streamed), `/ping`, `/tokenize` and `/detokenize` have the shapes vLLM 0.32 gave them in the
//! recorded fixtures, honour the same knobs, and the OpenAI SDK parses them; like vLLM, it refuses
//! a body not labelled JSON and a HEAD of its GET routes.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::ExitStatusExt;

use common::*;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// `/proc/<pid>/comm` keeps 15 bytes, so vLLM's `VLLM::EngineCore` shows as this.
const ENGINE_CORE_COMM: &str = "VLLM::EngineCor";
const WORKER_COMM: &str = "VLLM::Worker";

/// Kills whatever is left of a process group when the test ends, however it ends, so that a
/// failing test leaves no orphaned engine behind.
struct KillGroup(i32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.0), Signal::SIGKILL);
    }
}

/// The engine core's and the worker's pids in mock-vllm's group, once both run.
fn engine_processes(server: &Proc) -> (i32, i32) {
    let find = |comm: &str| {
        group_members(server.pid())
            .into_iter()
            .find(|(_, name)| name == comm)
            .map(|(pid, _)| pid)
    };
    wait_until("the engine core and its worker to run", DEADLINE, || {
        find(ENGINE_CORE_COMM).is_some() && find(WORKER_COMM).is_some()
    });
    let engine = find(ENGINE_CORE_COMM).expect("engine core");
    let worker = find(WORKER_COMM).expect("worker");
    (engine, worker)
}

fn health_status(server: &Proc) -> Option<u16> {
    get(&server.url("/health")).map(|(status, _)| status)
}

#[test]
fn the_engine_runs_as_vllms_engine_core_and_worker_processes_in_the_servers_group() {
    let server = mock_vllm_own_group(&[]);
    let _cleanup = KillGroup(server.pid());
    let (engine, worker) = engine_processes(&server);
    assert_eq!(mock_stats_on(server.port)["engine_pid"], engine);
    assert_eq!(
        proc_stat(engine).map(|(_, parent)| parent),
        Some(server.pid())
    );
    assert_eq!(proc_stat(worker).map(|(_, parent)| parent), Some(engine));
    let cmdline = std::fs::read(format!("/proc/{engine}/cmdline")).expect("cmdline");
    assert_eq!(cmdline, b"VLLM::EngineCore\0");
}

#[test]
fn sigkill_of_the_server_alone_leaves_the_engine_orphaned_until_its_group_is_stopped() {
    let mut server = mock_vllm_own_group(&[]);
    let _cleanup = KillGroup(server.pid());
    let (engine, worker) = engine_processes(&server);
    server.signal(Signal::SIGKILL);
    server.wait_exit(DEADLINE);
    assert!(
        alive(engine) && alive(worker),
        "the engine outlives its server"
    );
    assert_ne!(
        proc_stat(engine).map(|(_, parent)| parent),
        Some(server.pid()),
        "the engine core is an orphan"
    );
    killpg(Pid::from_raw(server.pid()), Signal::SIGTERM).expect("signal the group");
    wait_until("the orphaned engine to stop", DEADLINE, || {
        !alive(engine) && !alive(worker)
    });
}

#[test]
fn sigterm_stops_the_server_and_its_engine() {
    let mut server = mock_vllm_own_group(&[]);
    let _cleanup = KillGroup(server.pid());
    let (engine, worker) = engine_processes(&server);
    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait_exit(DEADLINE).code(), Some(0));
    wait_until("the engine to stop with its server", DEADLINE, || {
        !alive(engine) && !alive(worker)
    });
}

#[test]
fn a_dead_engine_makes_health_answer_503_then_the_server_exits_0() {
    let mut server = mock_vllm_own_group(&[("MOCK_VLLM_ENGINE_DEATH_LINGER", "3s")]);
    let _cleanup = KillGroup(server.pid());
    let (engine, worker) = engine_processes(&server);
    assert_eq!(health_status(&server), Some(200));
    kill(Pid::from_raw(engine), Signal::SIGKILL).expect("kill the engine core");
    wait_until("/health to answer 503", DEADLINE, || {
        health_status(&server) == Some(503)
    });
    wait_until("the worker to die with its engine core", DEADLINE, || {
        !alive(worker)
    });
    assert_eq!(server.wait_exit(DEADLINE).code(), Some(0));
}

#[test]
fn the_engine_death_knob_kills_even_an_engine_without_processes() {
    let mut server = mock_vllm_own_group(&[
        ("MOCK_VLLM_ENGINE_PROCESSES", "0"),
        ("MOCK_VLLM_ENGINE_DIE_AFTER", "300ms"),
        ("MOCK_VLLM_ENGINE_DEATH_LINGER", "3s"),
    ]);
    let _cleanup = KillGroup(server.pid());
    assert_eq!(
        mock_stats_on(server.port)["engine_pid"],
        serde_json::Value::Null
    );
    assert_eq!(group_members(server.pid()).len(), 1, "no engine processes");
    wait_until("/health to answer 503", DEADLINE, || {
        health_status(&server) == Some(503)
    });
    assert_eq!(server.wait_exit(DEADLINE).code(), Some(0));
}

/// What vLLM 0.32 answered a generation request once its engine was dead.
const ENGINE_DEAD_FIXTURE: &str = "vllm-0.32-tiny-error-engine-dead.json";

#[test]
fn a_generation_request_to_a_dead_engine_gets_vllms_500_and_ends_the_linger() {
    // A linger far beyond the deadline: only the request can end it.
    let mut server = mock_vllm_own_group(&[("MOCK_VLLM_ENGINE_DEATH_LINGER", "1h")]);
    let _cleanup = KillGroup(server.pid());
    let (engine, _) = engine_processes(&server);
    kill(Pid::from_raw(engine), Signal::SIGKILL).expect("kill the engine core");
    wait_until("/health to answer 503", DEADLINE, || {
        health_status(&server) == Some(503)
    });
    // What needs no engine answers as before: the model list, and the model check that vLLM
    // makes before it looks at its engine.
    let models = raw_request(server.port, "GET /v1/models HTTP/1.1", b"");
    assert_eq!(models.status, 200);
    let unknown = r#"{"model":"no-such-model","input":"hi","stream":true}"#;
    assert_eq!(
        post_json(server.port, "/v1/responses", unknown, "").status,
        404
    );
    // A stream too is refused before it starts.
    let response = post_json(server.port, "/v1/responses", RESPONSES_STREAM, "");
    assert_eq!(response.status, 500);
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(response.body, fixture(ENGINE_DEAD_FIXTURE));
    assert_eq!(server.wait_exit(DEADLINE).code(), Some(0));
}

#[test]
fn a_chat_completion_to_a_dead_engine_gets_vllms_500() {
    let mut server = mock_vllm_own_group(&[
        ("MOCK_VLLM_ENGINE_PROCESSES", "0"),
        ("MOCK_VLLM_ENGINE_DIE_AFTER", "100ms"),
        ("MOCK_VLLM_ENGINE_DEATH_LINGER", "1h"),
    ]);
    let _cleanup = KillGroup(server.pid());
    wait_until("/health to answer 503", DEADLINE, || {
        health_status(&server) == Some(503)
    });
    let response = post_json(
        server.port,
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi"}]}"#,
        "",
    );
    assert_eq!(response.status, 500);
    assert_eq!(response.body, fixture(ENGINE_DEAD_FIXTURE));
    assert_eq!(response.json()["error"]["type"], "InternalServerError");
    assert_eq!(server.wait_exit(DEADLINE).code(), Some(0));
}

#[test]
fn an_idle_kept_alive_connection_is_closed_after_the_keep_alive_timeout() {
    let server = mock_vllm(&[("MOCK_VLLM_KEEP_ALIVE_TIMEOUT", "300ms")]);
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: vllm\r\n\r\n")
        .expect("write");
    let response = read_response(&mut stream);
    assert_eq!(response.status, 200);
    assert_eq!(response.header("connection"), None, "kept alive");
    // As uvicorn does, the server closes the connection without a word once it has been idle.
    let mut rest = Vec::new();
    let read = stream.read_to_end(&mut rest);
    assert!(
        matches!(read, Ok(0)),
        "the server closes the idle connection: {read:?}, {rest:?}"
    );
    assert_eq!(mock_stats_on(server.port)["keep_alive_closes"], 1);
}

#[test]
fn sighup_kills_the_server_as_it_kills_vllm_and_leaves_the_engine_behind() {
    let mut server = mock_vllm_own_group(&[]);
    let _cleanup = KillGroup(server.pid());
    let (engine, worker) = engine_processes(&server);
    server.signal(Signal::SIGHUP);
    let status = server.wait_exit(DEADLINE);
    assert_eq!(status.signal(), Some(Signal::SIGHUP as i32), "{status:?}");
    assert!(
        alive(engine) && alive(worker),
        "the engine outlives its server"
    );
}

#[test]
fn sighup_to_the_whole_group_leaves_nothing() {
    let mut server = mock_vllm_own_group(&[]);
    let _cleanup = KillGroup(server.pid());
    let (engine, worker) = engine_processes(&server);
    killpg(Pid::from_raw(server.pid()), Signal::SIGHUP).expect("signal the group");
    assert_eq!(
        server.wait_exit(DEADLINE).signal(),
        Some(Signal::SIGHUP as i32)
    );
    wait_until("the engine to die of the hang-up", DEADLINE, || {
        !alive(engine) && !alive(worker)
    });
}

/// vLLM installs no SIGHUP handler, so it keeps the action its parent left: under `nohup` it
/// survives a hang-up.
#[test]
fn a_sighup_its_parent_ignored_stays_ignored() {
    let server = mock_vllm_wrapped(&["setsid", "nohup"], &[("MOCK_VLLM_HANDLE_SIGUSR", "1")]);
    let _cleanup = KillGroup(server.pid());
    server.signal(Signal::SIGHUP);
    // A signal sent after it is still recorded shows that the hang-up went by.
    server.signal(Signal::SIGUSR1);
    wait_until("the server to record SIGUSR1", DEADLINE, || {
        mock_stats_on(server.port)["signals"] == serde_json::json!(["SIGUSR1"])
    });
    assert_eq!(health_status(&server), Some(200));
}

/// As vLLM, which installs no handler for them: sent to its group (`kill -USR1 -<pgid>`), every
/// process of a CPU vLLM 0.32 was gone within seconds.
#[test]
fn sigusr1_and_sigusr2_kill_the_server_as_they_kill_vllm() {
    for signal in [Signal::SIGUSR1, Signal::SIGUSR2] {
        let mut server = mock_vllm_own_group(&[]);
        let _cleanup = KillGroup(server.pid());
        server.signal(signal);
        let status = server.wait_exit(DEADLINE);
        assert_eq!(status.signal(), Some(signal as i32), "{status:?}");
    }
}

#[test]
fn with_the_ignore_sighup_knob_sighup_is_only_recorded() {
    let server = mock_vllm_own_group(&[("MOCK_VLLM_IGNORE_SIGHUP", "1")]);
    let _cleanup = KillGroup(server.pid());
    server.signal(Signal::SIGHUP);
    wait_until("the server to record SIGHUP", DEADLINE, || {
        mock_stats_on(server.port)["signals"] == serde_json::json!(["SIGHUP"])
    });
    assert_eq!(health_status(&server), Some(200));
}

#[test]
fn the_gateways_stop_leaves_no_engine_process() {
    let (mut gateway, vllm_port) = gateway_serve(&[], &[]);
    wait_ready(&gateway);
    let server = mock_stats_on(vllm_port)["pid"]
        .as_i64()
        .and_then(|pid| i32::try_from(pid).ok())
        .expect("mock-vllm's pid");
    let _cleanup = KillGroup(server);
    wait_until("the engine core and its worker to run", DEADLINE, || {
        group_members(server).len() == 3
    });
    gateway.signal(Signal::SIGTERM);
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(0));
    wait_until("vLLM's whole group to be gone", DEADLINE, || {
        group_members(server).is_empty()
    });
}

/// The JSON data of each event of a Server-Sent Events body, `[DONE]` left out.
fn sse_data(body: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|event| event.lines().find_map(|line| line.strip_prefix("data: ")))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).expect("event data is JSON"))
        .collect()
}

fn chat_content(chunks: &[serde_json::Value]) -> String {
    chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
        .collect()
}

#[test]
fn a_chat_completion_cut_by_max_tokens_finishes_with_length() {
    let server = mock_vllm(&[]);
    let whole = post_json(
        server.port,
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#,
        "",
    );
    assert_eq!(whole.status, 200);
    let json = whole.json();
    assert_eq!(json["choices"][0]["finish_reason"], "length");
    assert_eq!(json["choices"][0]["message"]["content"], "Hello from");
    assert_eq!(json["usage"]["completion_tokens"], 2);

    let stream = post_json(
        server.port,
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi"}],"max_completion_tokens":2,"stream":true}"#,
        "",
    );
    assert_eq!(stream.status, 200);
    assert!(stream.body.ends_with(b"data: [DONE]\n\n"));
    let chunks = sse_data(&stream.body);
    assert_eq!(chat_content(&chunks), "Hello from");
    let finish = chunks.last().expect("a finish chunk");
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
}

#[test]
fn a_chat_completion_within_its_token_limit_finishes_with_stop() {
    let server = mock_vllm(&[]);
    let response = post_json(
        server.port,
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":100}"#,
        "",
    );
    let json = response.json();
    assert_eq!(json["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        json["choices"][0]["message"]["content"],
        "Hello from mock-vllm."
    );
}

#[test]
fn a_token_limit_below_one_is_vllms_400() {
    let server = mock_vllm(&[]);
    let chat = post_json(
        server.port,
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":0}"#,
        "",
    );
    assert_eq!(chat.status, 400);
    assert_eq!(chat.json()["error"]["type"], "BadRequestError");
    let responses = post_json(
        server.port,
        "/v1/responses",
        r#"{"input":"hi","max_output_tokens":-1}"#,
        "",
    );
    assert_eq!(responses.status, 400);
}

#[test]
fn a_response_cut_by_max_output_tokens_is_incomplete() {
    let server = mock_vllm(&[]);
    let response = post_json(
        server.port,
        "/v1/responses",
        r#"{"model":"mock-model","input":"hi","max_output_tokens":3}"#,
        "",
    );
    assert_eq!(response.status, 200);
    let json = response.json();
    assert_eq!(json["status"], "incomplete");
    assert_eq!(
        json["incomplete_details"],
        serde_json::json!({"reason": "max_output_tokens"})
    );
    assert_eq!(json["max_output_tokens"], 3);
    assert_eq!(json["usage"]["output_tokens"], 3);
    let kinds: Vec<_> = json["output"]
        .as_array()
        .expect("output")
        .iter()
        .map(|item| item["type"].clone())
        .collect();
    assert_eq!(kinds, ["reasoning"], "a cut answer has no function call");
}

#[test]
fn a_streamed_response_cut_by_max_output_tokens_ends_with_an_incomplete_response() {
    let server = mock_vllm(&[]);
    let stream = post_json(
        server.port,
        "/v1/responses",
        r#"{"model":"mock-model","input":"hi","stream":true,"max_output_tokens":127}"#,
        "",
    );
    assert_eq!(stream.status, 200);
    let events = sse_data(&stream.body);
    for (index, event) in events.iter().enumerate() {
        assert_eq!(event["sequence_number"], index, "no gap in the sequence");
    }
    let deltas = events
        .iter()
        .filter(|event| {
            event["type"]
                .as_str()
                .is_some_and(|kind| kind.ends_with("_text.delta"))
        })
        .count();
    assert_eq!(deltas, 127, "one event per token, up to the limit");
    let last = events.last().expect("a last event");
    assert_eq!(last["type"], "response.completed", "vLLM's last event");
    assert_eq!(last["response"]["status"], "incomplete");
    assert_eq!(
        last["response"]["incomplete_details"]["reason"],
        "max_output_tokens"
    );
    let message = &last["response"]["output"][1];
    assert_eq!(message["content"][0]["text"], "HEL");
    assert_eq!(message["status"], "incomplete");
}

/// Sends a streaming request to mock-vllm on another thread and returns once the response has
/// begun (its access line is logged when its headers go out).
fn start_stream_on(
    server: &Proc,
    path: &'static str,
    body: &'static str,
) -> std::thread::JoinHandle<RawResponse> {
    let port = server.port;
    let stream = std::thread::spawn(move || post_json(port, path, body, ""));
    wait_until("the stream to begin", DEADLINE, || {
        server
            .log_text()
            .contains(&format!("POST {path} HTTP/1.1\" 200"))
    });
    stream
}

/// Starts a streaming request on another thread, returning once the server has begun answering
/// it; the thread returns the raw bytes that came until the connection closed, cleanly or not.
fn start_raw_stream_on(
    server: &Proc,
    path: &'static str,
    body: &'static str,
) -> std::thread::JoinHandle<Vec<u8>> {
    let port = server.port;
    let stream = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: vllm\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).expect("write");
        let mut raw = Vec::new();
        let mut buffer = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut buffer) {
                Ok(0) => return raw,
                Ok(n) => raw.extend_from_slice(&buffer[..n]),
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return raw,
                Err(error) => panic!("reading the stream: {error}"),
            }
        }
    });
    wait_until("the stream to begin", DEADLINE, || {
        server
            .log_text()
            .contains(&format!("POST {path} HTTP/1.1\" 200"))
    });
    stream
}

/// Starts a stream of `body` at `path`, kills the engine core under it, and checks that the
/// stream ends as vLLM's did in `recording`: with its error chunk and `[DONE]`, byte for byte.
fn assert_engine_death_ends_stream_as_recorded(
    path: &'static str,
    body: &'static str,
    recording: &str,
) {
    let server = mock_vllm_own_group(&[
        ("MOCK_VLLM_STREAM_DELAY", "1s"),
        ("MOCK_VLLM_ENGINE_DEATH_LINGER", "1h"),
    ]);
    let _cleanup = KillGroup(server.pid());
    let (engine, _) = engine_processes(&server);
    let stream = start_raw_stream_on(&server, path, body);
    kill(Pid::from_raw(engine), Signal::SIGKILL).expect("kill the engine core");
    let response = parse_response(&stream.join().expect("the stream thread"));
    assert_eq!(response.status, 200);
    let recorded = fixture(recording);
    let error_start = b"data: {\"error\"";
    let error_at = recorded
        .windows(error_start.len())
        .position(|window| window == error_start)
        .expect("the recording ends with an error chunk");
    let body = String::from_utf8_lossy(&response.body);
    assert!(
        response.body.ends_with(&recorded[error_at..]),
        "the stream ends as vLLM's: {body}"
    );
    assert!(
        !body.contains("finish_reason\":\"stop"),
        "cut short: {body}"
    );
}

#[test]
fn a_chat_stream_in_flight_when_the_engine_dies_ends_with_vllms_error_chunk() {
    assert_engine_death_ends_stream_as_recorded(
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        "vllm-0.32-tiny-chat-stream-engine-dead.sse",
    );
}

#[test]
fn a_responses_stream_in_flight_when_the_engine_dies_is_cut_off_as_vllm_cuts_it() {
    let server = mock_vllm_own_group(&[
        ("MOCK_VLLM_STREAM_DELAY", "1s"),
        ("MOCK_VLLM_ENGINE_DEATH_LINGER", "1h"),
    ]);
    let _cleanup = KillGroup(server.pid());
    let (engine, _) = engine_processes(&server);
    let stream = start_raw_stream_on(&server, "/v1/responses", RESPONSES_STREAM);
    kill(Pid::from_raw(engine), Signal::SIGKILL).expect("kill the engine core");
    let raw = stream.join().expect("the stream thread");
    // The recording has no `response.completed` and its connection was cut: so here, the
    // connection closes without the chunked body's last chunk.
    let recorded =
        String::from_utf8_lossy(&fixture("vllm-0.32-tiny-responses-stream-engine-dead.sse"))
            .into_owned();
    assert!(!recorded.contains("response.completed"));
    let response = parse_response(&raw);
    assert_eq!(response.status, 200);
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    assert!(!raw.ends_with(b"0\r\n\r\n"), "the body never ends");
    let body = String::from_utf8_lossy(&response.body);
    assert!(body.starts_with("event: response.created"), "{body}");
    assert!(!body.contains("response.completed"), "{body}");
}

#[test]
fn sigterm_ends_an_in_flight_chat_stream_with_finish_reason_abort() {
    let mut server = mock_vllm(&[("MOCK_VLLM_STREAM_DELAY", "1s")]);
    let stream = start_stream_on(
        &server,
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#,
    );
    server.signal(Signal::SIGTERM);
    let response = stream.join().expect("the stream thread");
    assert!(response.body.ends_with(b"data: [DONE]\n\n"), "a clean end");
    let chunks = sse_data(&response.body);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "abort");
    let content = chat_content(&chunks);
    assert!(content.len() < "Hello from mock-vllm.".len(), "{content:?}");
    let pieces = chunks
        .iter()
        .filter(|chunk| {
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|piece| !piece.is_empty())
        })
        .count();
    assert_eq!(
        chunks[chunks.len() - 1]["usage"]["completion_tokens"],
        pieces
    );
    assert_eq!(server.wait_exit(DEADLINE).code(), Some(0));
}

#[test]
fn sigterm_ends_an_in_flight_responses_stream_with_a_cancelled_response() {
    let mut server = mock_vllm(&[("MOCK_VLLM_STREAM_DELAY", "1s")]);
    let stream = start_stream_on(&server, "/v1/responses", RESPONSES_STREAM);
    server.signal(Signal::SIGTERM);
    let response = stream.join().expect("the stream thread");
    let events = sse_data(&response.body);
    assert!(events.len() < 141, "the stream was cut short");
    for (index, event) in events.iter().enumerate() {
        assert_eq!(event["sequence_number"], index, "no gap in the sequence");
    }
    let last = events.last().expect("a last event");
    assert_eq!(last["type"], "response.completed");
    assert_eq!(last["response"]["status"], "cancelled");
    assert_eq!(server.wait_exit(DEADLINE).code(), Some(0));
}

/// The engine core's pid of each start recorded in a `MOCK_VLLM_PID_FILE` (its third field).
fn engine_cores(path: &std::path::Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().nth(2)?.parse().ok())
        .collect()
}

#[test]
fn the_gateway_stops_an_orphaned_engine_before_it_starts_vllm_again() {
    let (_dir, pids, pids_text) = pid_file();
    let (gateway, _) = gateway_serve(
        &["--restart", "always"],
        &[("MOCK_VLLM_PID_FILE", &pids_text)],
    );
    wait_until("the first start", DEADLINE, || {
        read_pid_file(&pids).len() == 1
    });
    let (server, _) = read_pid_file(&pids)[0];
    let _cleanup = KillGroup(server);
    let first_engine = engine_cores(&pids)[0];
    assert!(first_engine > 0 && alive(first_engine));
    kill(Pid::from_raw(server), Signal::SIGKILL).expect("kill vLLM's API server");
    wait_until("the second start", DEADLINE, || {
        read_pid_file(&pids).len() == 2
    });
    assert!(!alive(first_engine), "the old engine core is gone");
    let second_engine = engine_cores(&pids)[1];
    let (second_server, _) = read_pid_file(&pids)[1];
    let _cleanup_second = KillGroup(second_server);
    assert!(alive(second_engine));
    drop(gateway);
    wait_until(
        "the second engine to stop with the gateway",
        DEADLINE,
        || !alive(second_engine),
    );
}

/// mock-vllm serving `model` with these further vLLM options, without engine processes.
fn serving(model: &str, options: &[&str]) -> Proc {
    mock_vllm_serving(model, options, &[("MOCK_VLLM_ENGINE_PROCESSES", "0")])
}

/// Regression: only the first of `--served-model-name tiny alias2` was kept, each card's `root`
/// was the served name and `max_model_len` was always 8192. vLLM 0.32 lists a card per name, each
/// rooted at the model as given, with the flag's context length.
#[test]
fn every_served_name_gets_a_model_card_rooted_at_the_model_as_given() {
    let server = serving(
        "/models/tiny-llama",
        &[
            "--served-model-name",
            "tiny",
            "alias2",
            "--max-model-len",
            "1k",
        ],
    );
    let models = raw_request(server.port, "GET /v1/models HTTP/1.1", b"").json();
    let cards = models["data"].as_array().expect("a list of cards");
    let ids: Vec<_> = cards.iter().map(|card| card["id"].clone()).collect();
    assert_eq!(ids, ["tiny", "alias2"]);
    for card in cards {
        assert_eq!(card["root"], "/models/tiny-llama", "{card}");
        assert_eq!(card["max_model_len"], 1000, "{card}");
    }
}

#[test]
fn a_request_for_any_served_name_is_answered_as_the_first_name() {
    let server = serving(
        "/models/tiny-llama",
        &["--served-model-name", "tiny", "alias2"],
    );
    for model in [r#""model":"alias2","#, r#""model":"","#, ""] {
        let body = format!(r#"{{{model}"messages":[{{"role":"user","content":"hi"}}]}}"#);
        let response = post_json(server.port, "/v1/chat/completions", &body, "");
        assert_eq!(response.status, 200, "{body}");
        // vLLM reports its first served name, whichever the request used.
        assert_eq!(response.json()["model"], "tiny", "{body}");
    }
    let stream = post_json(
        server.port,
        "/v1/chat/completions",
        r#"{"model":"alias2","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        "",
    );
    assert!(
        sse_data(&stream.body)
            .iter()
            .all(|chunk| chunk["model"] == "tiny")
    );
    let response = post_json(
        server.port,
        "/v1/responses",
        r#"{"model":"alias2","input":"hi"}"#,
        "",
    );
    assert_eq!(response.status, 200);
}

/// Regression: the 404's keys came out sorted and without the served names. vLLM 0.32's body,
/// recorded while it served `tiny` alone, comes out byte for byte.
#[test]
fn an_unknown_model_gets_vllms_404_naming_the_valid_aliases() {
    let server = serving("/models/tiny-llama", &["--served-model-name", "tiny"]);
    let request = fixture("vllm-0.32-tiny-error-unknown-model.request.json");
    let request = String::from_utf8(request).expect("a UTF-8 request");
    let response = post_json(server.port, "/v1/responses", &request, "");
    assert_eq!(response.status, 404);
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(
        String::from_utf8_lossy(&response.body),
        String::from_utf8_lossy(&fixture("vllm-0.32-tiny-error-unknown-model.json"))
    );

    let server = serving(
        "/models/tiny-llama",
        &["--served-model-name", "tiny", "alias2"],
    );
    let response = post_json(
        server.port,
        "/v1/chat/completions",
        r#"{"model":"nope","messages":[{"role":"user","content":"hi"}]}"#,
        "",
    );
    assert_eq!(response.status, 404);
    assert_eq!(
        String::from_utf8_lossy(&response.body),
        "{\"error\":{\"message\":\"The model `nope` does not exist. Valid aliases: tiny, alias2.\",\
         \"type\":\"NotFoundError\",\"param\":\"model\",\"code\":404}}"
    );
}

/// Regression: only the first of `--api-key k1 k2` was accepted.
#[test]
fn any_of_several_api_keys_is_accepted() {
    let server = serving("m", &["--api-key", "k1", "k2", "--enforce-eager"]);
    for key in ["k1", "k2"] {
        let head = format!("GET /v1/models HTTP/1.1\r\nAuthorization: Bearer {key}");
        assert_eq!(raw_request(server.port, &head, b"").status, 200, "{key}");
    }
    let wrong = "GET /v1/models HTTP/1.1\r\nAuthorization: Bearer k3";
    assert_eq!(raw_request(server.port, wrong, b"").status, 401);
}

/// Checked against vLLM 0.32: uvicorn names itself on every answer, and its CORS middleware adds
/// `vary: Origin` to every answer but the key check's 401, which is sent before it.
#[test]
fn answers_carry_uvicorns_server_header_and_vary_origin_except_the_401() {
    let server = serving("m", &["--api-key", "k"]);
    let authorized = |path: &str| format!("GET {path} HTTP/1.1\r\nAuthorization: Bearer k");
    let answers = [
        raw_request(server.port, &authorized("/v1/models"), b""),
        raw_request(server.port, "GET /health HTTP/1.1", b""),
        raw_request(server.port, &authorized("/v1/nothing"), b""),
        post_json(
            server.port,
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hi"}],"stream":true}"#,
            "\r\nAuthorization: Bearer k",
        ),
    ];
    for answer in &answers {
        assert_eq!(
            answer.header("server"),
            Some("uvicorn"),
            "{}",
            answer.status
        );
        assert_eq!(answer.header("vary"), Some("Origin"), "{}", answer.status);
    }
    let unauthorized = raw_request(server.port, "GET /v1/models HTTP/1.1", b"");
    assert_eq!(unauthorized.status, 401);
    assert_eq!(unauthorized.header("server"), Some("uvicorn"));
    assert_eq!(unauthorized.header("vary"), None);
}

/// vLLM exits 2 on a `--max-model-len` it cannot read, with argparse's message.
#[test]
fn a_bad_max_model_len_exits_2_with_argparses_message() {
    let args = ["serve", "m", "--port", "0", "--max-model-len", "lots"].map(String::from);
    let mut server = spawn(MOCK_VLLM, &args, &[], 0);
    assert_eq!(server.wait_exit(DEADLINE).code(), Some(2));
    assert!(
        server
            .log_text()
            .contains("argument --max-model-len: invalid human_readable_int_or_auto value: 'lots'"),
        "{}",
        server.log_text()
    );
}

/// The options vLLM 0.32 served the tiny model with when the `vllm-0.32-tiny-*` fixtures were
/// recorded.
const TINY: &[&str] = &["--served-model-name", "tiny", "--max-model-len", "1024"];

/// mock-vllm serving the tiny model as it was recorded, with these knobs, without engine
/// processes.
fn tiny_with(env: &[(&str, &str)]) -> Proc {
    let mut env = env.to_vec();
    env.push(("MOCK_VLLM_ENGINE_PROCESSES", "0"));
    mock_vllm_serving("/models/tiny-llama", TINY, &env)
}

fn fixture_text(name: &str) -> String {
    String::from_utf8(fixture(name)).expect("a UTF-8 fixture")
}

/// A JSON text's shape: each object's keys in their order with their values' shapes, and the
/// kind of each plain value; a run of list items of one shape counts once. Two answers of one
/// shape differ only in their values (the model's words, ids, times, counts).
fn json_shape(text: &[u8]) -> String {
    let shape: Shape = serde_json::from_slice(text)
        .unwrap_or_else(|error| panic!("not JSON ({error}): {}", String::from_utf8_lossy(text)));
    shape.0
}

struct Shape(String);

impl<'de> serde::Deserialize<'de> for Shape {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ShapeVisitor)
    }
}

struct ShapeVisitor;

impl<'de> serde::de::Visitor<'de> for ShapeVisitor {
    type Value = Shape;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Shape, E> {
        Ok(Shape("bool".into()))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Shape, E> {
        Ok(Shape("num".into()))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Shape, E> {
        Ok(Shape("num".into()))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Shape, E> {
        Ok(Shape("num".into()))
    }

    fn visit_str<E>(self, _: &str) -> Result<Shape, E> {
        Ok(Shape("str".into()))
    }

    fn visit_unit<E>(self) -> Result<Shape, E> {
        Ok(Shape("null".into()))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        let mut items: Vec<String> = Vec::new();
        while let Some(Shape(item)) = seq.next_element()? {
            if items.last() != Some(&item) {
                items.push(item);
            }
        }
        Ok(Shape(format!("[{}]", items.join(","))))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        let mut fields = Vec::new();
        while let Some((key, Shape(value))) = map.next_entry::<String, Shape>()? {
            fields.push(format!("{key}:{value}"));
        }
        Ok(Shape(format!("{{{}}}", fields.join(","))))
    }
}

/// The shape of each event of a stream of one-line `data:` events, `[DONE]` as itself; a run
/// of events of one shape counts once.
fn sse_shapes(body: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(body);
    assert!(text.ends_with("\n\n"), "whole events: {text}");
    let mut shapes: Vec<String> = Vec::new();
    for event in text.split_terminator("\n\n") {
        let data = event
            .strip_prefix("data: ")
            .filter(|data| !data.contains('\n'))
            .unwrap_or_else(|| panic!("a one-line data event: {event:?}"));
        let shape = match data {
            "[DONE]" => data.to_owned(),
            json => json_shape(json.as_bytes()),
        };
        if shapes.last() != Some(&shape) {
            shapes.push(shape);
        }
    }
    shapes
}

/// Sends the recorded request `tests/fixtures/{recording}.request.json` to `path` and checks that
/// the answer is 200 JSON shaped as vLLM's, `{recording}.json`: the answer and vLLM's, parsed.
fn answer_shaped_as_recorded(
    server: &Proc,
    path: &str,
    recording: &str,
) -> (serde_json::Value, serde_json::Value) {
    let request = fixture_text(&format!("{recording}.request.json"));
    let response = post_json(server.port, path, &request, "");
    assert_eq!(response.status, 200, "{path}");
    assert_eq!(response.header("content-type"), Some("application/json"));
    let recorded = fixture(&format!("{recording}.json"));
    assert_eq!(
        json_shape(&response.body),
        json_shape(&recorded),
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    let recorded = serde_json::from_slice(&recorded).expect("JSON");
    (response.json(), recorded)
}

/// A recorded answer whose head matters as much as its body (`HTTP <status>`, the content type
/// when there was one, a blank line, the body): its status, content type and body.
fn recorded_with_head(name: &str) -> (u16, Option<String>, Vec<u8>) {
    let recorded = fixture(name);
    let split = recorded
        .windows(2)
        .position(|pair| pair == b"\n\n")
        .expect("a blank line after the head");
    let head = String::from_utf8_lossy(&recorded[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.strip_prefix("HTTP "))
        .and_then(|status| status.parse().ok())
        .expect("a status line");
    let content_type = lines
        .find_map(|line| line.strip_prefix("content-type: "))
        .map(str::to_owned);
    (status, content_type, recorded[split + 2..].to_vec())
}

fn completion_text(chunks: &[serde_json::Value]) -> String {
    chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["text"].as_str())
        .collect()
}

#[test]
fn a_completion_has_the_shape_vllm_gave_it() {
    let server = tiny_with(&[]);
    let (json, recorded) =
        answer_shaped_as_recorded(&server, "/v1/completions", "vllm-0.32-tiny-completions");
    for field in ["object", "model"] {
        assert_eq!(json[field], recorded[field], "{field}");
    }
    assert!(
        json["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("cmpl-"))
    );
    assert!(
        json["system_fingerprint"]
            .as_str()
            .is_some_and(|fingerprint| fingerprint.starts_with("vllm-")),
        "{json}"
    );
    let choice = &json["choices"][0];
    assert_eq!(choice["text"], "Hello from mock-vllm.");
    assert_eq!(choice["finish_reason"], "stop");
    // One word, one token, as the tiny model's tokenizer counted "Hello" too.
    assert_eq!(
        json["usage"]["prompt_tokens"],
        recorded["usage"]["prompt_tokens"]
    );
    assert_eq!(json["usage"]["completion_tokens"], 5);
    assert_eq!(json["usage"]["total_tokens"], 6);
}

#[test]
fn a_completion_stream_has_the_shape_vllm_gave_it_with_and_without_a_usage_chunk() {
    let server = tiny_with(&[]);
    for name in [
        "vllm-0.32-tiny-completions-stream",
        "vllm-0.32-tiny-completions-stream-usage",
    ] {
        let request = fixture_text(&format!("{name}.request.json"));
        let response = post_json(server.port, "/v1/completions", &request, "");
        assert_eq!(response.status, 200, "{name}");
        assert_eq!(
            response.header("content-type"),
            Some("text/event-stream; charset=utf-8"),
            "{name}"
        );
        assert_eq!(response.header("transfer-encoding"), Some("chunked"));
        assert_eq!(
            sse_shapes(&response.body),
            sse_shapes(&fixture(&format!("{name}.sse"))),
            "{name}: {}",
            String::from_utf8_lossy(&response.body)
        );
        assert!(response.body.ends_with(b"data: [DONE]\n\n"));
        let chunks = sse_data(&response.body);
        assert_eq!(completion_text(&chunks), "Hello from mock-vllm.");
        // A whole answer ends as vLLM's does when the model ends its text: an empty chunk.
        let finish = chunks
            .iter()
            .find(|chunk| !chunk["choices"][0]["finish_reason"].is_null())
            .expect("a finishing chunk");
        assert_eq!(finish["choices"][0]["text"], "");
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    }
}

#[test]
fn a_completion_cut_by_max_tokens_finishes_with_length_on_its_last_token() {
    let server = tiny_with(&[]);
    let whole = post_json(
        server.port,
        "/v1/completions",
        r#"{"prompt":"hi","max_tokens":2}"#,
        "",
    );
    let json = whole.json();
    assert_eq!(json["choices"][0]["text"], "Hello from");
    assert_eq!(json["choices"][0]["finish_reason"], "length");
    assert_eq!(json["usage"]["completion_tokens"], 2);

    let stream = post_json(
        server.port,
        "/v1/completions",
        r#"{"prompt":"hi","max_tokens":2,"stream":true,"stream_options":{"include_usage":true}}"#,
        "",
    );
    let chunks = sse_data(&stream.body);
    assert_eq!(chunks.len(), 3, "two tokens and the usage chunk");
    assert_eq!(chunks[1]["choices"][0]["text"], " from");
    assert_eq!(chunks[1]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[2]["choices"], serde_json::json!([]));
    assert_eq!(
        chunks[2]["usage"],
        serde_json::json!({"prompt_tokens": 1, "total_tokens": 3, "completion_tokens": 2})
    );
}

/// vLLM 0.32 names a completion after the request's `x-request-id` (the gateway sends one, so
/// its recordings' ids are 32 hex digits long).
#[test]
fn a_completion_is_named_after_the_request_id() {
    let server = tiny_with(&[]);
    let header = "\r\nX-Request-Id: job-382";
    let whole = post_json(server.port, "/v1/completions", r#"{"prompt":"hi"}"#, header);
    assert_eq!(whole.json()["id"], "cmpl-job-382");
    assert_eq!(whole.header("x-request-id"), Some("job-382"));
    let stream = post_json(
        server.port,
        "/v1/completions",
        r#"{"prompt":"hi","stream":true}"#,
        header,
    );
    let chunks = sse_data(&stream.body);
    assert!(!chunks.is_empty());
    assert!(chunks.iter().all(|chunk| chunk["id"] == "cmpl-job-382"));
}

/// Checked against vLLM 0.32: its bodies, byte for byte.
#[test]
fn completions_refuse_a_missing_prompt_a_bad_token_limit_and_an_unknown_model_as_vllm_does() {
    let server = tiny_with(&[]);
    let missing = post_json(server.port, "/v1/completions", r#"{"model":"tiny"}"#, "");
    assert_eq!(missing.status, 400);
    assert_eq!(
        String::from_utf8_lossy(&missing.body),
        "{\"error\":{\"message\":\"Either prompt or prompt_embeds must be provided and non-empty. \
         (parameter=prompt)\",\"type\":\"BadRequestError\",\"param\":\"prompt\",\"code\":400}}"
    );
    let limit = post_json(
        server.port,
        "/v1/completions",
        r#"{"model":"tiny","prompt":"x","max_tokens":0}"#,
        "",
    );
    assert_eq!(limit.status, 400);
    assert_eq!(
        String::from_utf8_lossy(&limit.body),
        "{\"error\":{\"message\":\"max_tokens must be at least 1, got 0. \
         (parameter=max_tokens, value=0)\",\"type\":\"BadRequestError\",\"param\":\"max_tokens\",\
         \"code\":400}}"
    );
    let unknown = post_json(
        server.port,
        "/v1/completions",
        r#"{"model":"no-such-model","prompt":"Hello"}"#,
        "",
    );
    assert_eq!(unknown.status, 404);
    assert_eq!(
        unknown.body,
        fixture("vllm-0.32-tiny-error-unknown-model.json")
    );
}

#[test]
fn the_fail_status_knob_fails_completions_too() {
    let server = tiny_with(&[("MOCK_VLLM_FAIL_STATUS", "503")]);
    let response = post_json(server.port, "/v1/completions", r#"{"prompt":"hi"}"#, "");
    assert_eq!(response.status, 503);
    assert_eq!(response.json()["error"]["type"], "ServiceUnavailableError");
}

#[test]
fn a_completions_stream_dies_after_as_many_events_as_the_die_knob_says() {
    let mut server = tiny_with(&[("MOCK_VLLM_DIE_MID_STREAM", "2")]);
    let stream = start_raw_stream_on(
        &server,
        "/v1/completions",
        r#"{"prompt":"hi","stream":true}"#,
    );
    let raw = stream.join().expect("the stream thread");
    let response = parse_response(&raw);
    assert_eq!(response.status, 200);
    let events = sse_data(&response.body);
    assert_eq!(
        events.len(),
        2,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert!(!raw.ends_with(b"0\r\n\r\n"), "the body never ends");
    assert_eq!(server.wait_exit(DEADLINE).code(), Some(1));
}

#[test]
fn a_completions_stream_sends_nothing_after_as_many_events_as_the_stall_knob_says() {
    let server = tiny_with(&[("MOCK_VLLM_STALL_MID_STREAM", "2")]);
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    let body = r#"{"prompt":"hi","stream":true}"#;
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: vllm\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut raw = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    let events = |raw: &[u8]| raw.windows(2).filter(|pair| pair == b"\n\n").count();
    while events(&raw) < 2 {
        let n = stream.read(&mut buffer).expect("the first two events");
        assert!(n > 0, "the stream ended early");
        raw.extend_from_slice(&buffer[..n]);
    }
    // Without a delay the rest would follow at once; nothing does, and the stream stays open.
    stream
        .set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .expect("timeout");
    let read = stream.read(&mut buffer);
    assert!(
        matches!(&read, Err(error) if error.kind() == std::io::ErrorKind::WouldBlock),
        "nothing more: {read:?}"
    );
    assert_eq!(events(&raw), 2);
    let stats = mock_stats_on(server.port);
    assert_eq!(
        (stats["completed"].as_u64(), stats["disconnects"].as_u64()),
        (Some(0), Some(0))
    );
}

#[test]
fn sigterm_ends_an_in_flight_completions_stream_with_finish_reason_abort() {
    let mut server = tiny_with(&[("MOCK_VLLM_STREAM_DELAY", "1s")]);
    let stream = start_stream_on(
        &server,
        "/v1/completions",
        r#"{"prompt":"hi","stream":true,"stream_options":{"include_usage":true}}"#,
    );
    server.signal(Signal::SIGTERM);
    let response = stream.join().expect("the stream thread");
    assert!(response.body.ends_with(b"data: [DONE]\n\n"), "a clean end");
    let chunks = sse_data(&response.body);
    let abort = &chunks[chunks.len() - 2];
    assert_eq!(abort["choices"][0]["finish_reason"], "abort");
    assert_eq!(abort["choices"][0]["text"], "");
    let text = completion_text(&chunks);
    assert!(text.len() < "Hello from mock-vllm.".len(), "{text:?}");
    let tokens = chunks.len() - 2;
    assert_eq!(
        chunks[chunks.len() - 1]["usage"]["completion_tokens"],
        tokens
    );
    assert_eq!(server.wait_exit(DEADLINE).code(), Some(0));
}

#[test]
fn a_completions_stream_in_flight_when_the_engine_dies_ends_with_vllms_error_chunk() {
    assert_engine_death_ends_stream_as_recorded(
        "/v1/completions",
        r#"{"prompt":"hi","stream":true}"#,
        "vllm-0.32-tiny-completions-stream-engine-dead.sse",
    );
}

/// Checked against vLLM 0.32: once its engine died, `/ping` answers 503 as `/health` does,
/// `/tokenize` (which needs no engine) still answers, and a completion gets the 500.
#[test]
fn a_dead_engine_makes_ping_answer_503_and_completions_500_while_tokenize_still_answers() {
    let mut server = tiny_with(&[
        ("MOCK_VLLM_ENGINE_DIE_AFTER", "100ms"),
        ("MOCK_VLLM_ENGINE_DEATH_LINGER", "1h"),
    ]);
    wait_until("/health to answer 503", DEADLINE, || {
        health_status(&server) == Some(503)
    });
    let (status, content_type, body) = recorded_with_head("vllm-0.32-tiny-ping-engine-dead.txt");
    let ping = raw_request(server.port, "GET /ping HTTP/1.1", b"");
    assert_eq!(ping.status, status);
    assert_eq!(ping.header("content-type").map(str::to_owned), content_type);
    assert_eq!(ping.body, body);
    let request = fixture_text("vllm-0.32-tiny-tokenize-engine-dead.request.json");
    let tokenize = post_json(server.port, "/tokenize", &request, "");
    assert_eq!(tokenize.status, 200);
    assert_eq!(
        json_shape(&tokenize.body),
        json_shape(&fixture("vllm-0.32-tiny-tokenize-engine-dead.json"))
    );
    let completion = post_json(server.port, "/v1/completions", r#"{"prompt":"hi"}"#, "");
    assert_eq!(completion.status, 500);
    assert_eq!(completion.body, fixture(ENGINE_DEAD_FIXTURE));
    assert_eq!(server.wait_exit(DEADLINE).code(), Some(0));
}

/// vLLM 0.32 serves `/ping`, SageMaker's health route, for GET and POST.
#[test]
fn ping_answers_get_and_post_as_vllm_does() {
    let server = tiny_with(&[]);
    for (head, name) in [
        ("GET /ping HTTP/1.1", "vllm-0.32-tiny-ping-get.txt"),
        ("POST /ping HTTP/1.1", "vllm-0.32-tiny-ping-post.txt"),
    ] {
        let (status, content_type, body) = recorded_with_head(name);
        let ping = raw_request(server.port, head, b"");
        assert_eq!(ping.status, status, "{head}");
        assert_eq!(
            ping.header("content-type").map(str::to_owned),
            content_type,
            "{head}"
        );
        assert_eq!(ping.body, body, "{head}");
        assert_eq!(ping.header("server"), Some("uvicorn"));
    }
}

#[test]
fn tokenize_and_detokenize_have_vllms_shapes_and_give_back_the_prompt() {
    let server = tiny_with(&[]);
    let (json, recorded) =
        answer_shaped_as_recorded(&server, "/tokenize", "vllm-0.32-tiny-tokenize");
    assert_eq!(json["max_model_len"], recorded["max_model_len"]);
    let tokens = json["tokens"].as_array().expect("tokens");
    assert_eq!(json["count"], tokens.len());

    // The ids the mock handed out give back the prompt, as vLLM's gave back "Hello world".
    let detokenize_request = serde_json::json!({"model": "tiny", "tokens": tokens}).to_string();
    let detokenize = post_json(server.port, "/detokenize", &detokenize_request, "");
    assert_eq!(detokenize.status, 200);
    assert_eq!(detokenize.header("content-type"), Some("application/json"));
    assert_eq!(detokenize.body, fixture("vllm-0.32-tiny-detokenize.json"));

    // The same words get the same ids, and a completion counts as many prompt tokens.
    let again = post_json(
        server.port,
        "/tokenize",
        r#"{"prompt":"world Hello","return_token_strs":true}"#,
        "",
    )
    .json();
    assert_eq!(again["tokens"], serde_json::json!([tokens[1], tokens[0]]));
    assert_eq!(again["token_strs"], serde_json::json!(["world", "Hello"]));
    let completion = post_json(
        server.port,
        "/v1/completions",
        r#"{"prompt":"Hello world"}"#,
        "",
    );
    assert_eq!(completion.json()["usage"]["prompt_tokens"], json["count"]);
}

#[test]
fn tokenize_and_detokenize_check_the_model_and_their_fields_as_vllm_does() {
    let server = tiny_with(&[]);
    let unknown_model = fixture("vllm-0.32-tiny-error-unknown-model.json");
    for (path, body) in [
        ("/tokenize", r#"{"model":"no-such-model","prompt":"Hello"}"#),
        ("/detokenize", r#"{"model":"no-such-model","tokens":[1]}"#),
    ] {
        let response = post_json(server.port, path, body, "");
        assert_eq!(response.status, 404, "{path}");
        assert_eq!(response.body, unknown_model, "{path}");
    }
    // Checked against vLLM 0.32: pydantic's errors, as vLLM words them.
    let missing = post_json(server.port, "/tokenize", r#"{"model":"tiny"}"#, "");
    assert_eq!(missing.status, 400);
    assert_eq!(
        String::from_utf8_lossy(&missing.body),
        "{\"error\":{\"message\":\"2 validation errors:\\n  {'type': 'missing', 'loc': \
         'body.prompt', 'msg': 'Field required', 'input': '<dict of 1 items>'}\\n  {'type': \
         'missing', 'loc': 'body.messages', 'msg': 'Field required', 'input': '<dict of 1 \
         items>'}\",\"type\":\"Bad Request\",\"param\":\"body.prompt\",\"code\":400}}"
    );
    let negative = post_json(
        server.port,
        "/detokenize",
        r#"{"model":"tiny","tokens":[-1]}"#,
        "",
    );
    assert_eq!(negative.status, 400);
    assert_eq!(
        String::from_utf8_lossy(&negative.body),
        "{\"error\":{\"message\":\"1 validation error:\\n  {'type': 'greater_than_equal', \
         'loc': 'body.tokens.0', 'msg': 'Input should be greater than or equal to 0', 'input': \
         '-1', 'ctx': {'ge': 0}}\",\"type\":\"Bad Request\",\"param\":\"body.tokens.0\",\
         \"code\":400}}"
    );
    // An id never handed out gives nothing, as an id outside vLLM's vocabulary does.
    let unknown_id = post_json(server.port, "/detokenize", r#"{"tokens":[99999999]}"#, "");
    assert_eq!(
        String::from_utf8_lossy(&unknown_id.body),
        r#"{"prompt":""}"#
    );
}

/// As in vLLM, the key guards only `/v1` paths.
#[test]
fn completions_need_the_api_key_but_tokenize_detokenize_and_ping_do_not() {
    let server = mock_vllm_serving(
        "/models/tiny-llama",
        &["--served-model-name", "tiny", "--api-key", "k"],
        &[("MOCK_VLLM_ENGINE_PROCESSES", "0")],
    );
    let without = post_json(server.port, "/v1/completions", r#"{"prompt":"hi"}"#, "");
    assert_eq!(without.status, 401);
    assert_eq!(without.body, br#"{"error":"Unauthorized"}"#);
    let with = post_json(
        server.port,
        "/v1/completions",
        r#"{"prompt":"hi"}"#,
        "\r\nAuthorization: Bearer k",
    );
    assert_eq!(with.status, 200);
    let tokenize = post_json(server.port, "/tokenize", r#"{"prompt":"hi"}"#, "");
    assert_eq!(tokenize.status, 200);
    let detokenize = post_json(server.port, "/detokenize", r#"{"tokens":[0]}"#, "");
    assert_eq!(detokenize.status, 200);
    assert_eq!(
        raw_request(server.port, "GET /ping HTTP/1.1", b"").status,
        200
    );
}

#[test]
fn the_openai_sdk_parses_chat_and_text_completions_whole_and_streamed() {
    let server = tiny_with(&[]);
    let summary = run_sdk_client("completions_client.py", &server.url("/v1"));
    let usage = |completion_tokens: u64| {
        serde_json::json!({
            "prompt_tokens": 2,
            "completion_tokens": completion_tokens,
            "total_tokens": 2 + completion_tokens,
        })
    };
    for (api, id_prefix, object, chunks, pieces) in [
        (
            "chat",
            "chatcmpl-",
            "chat.completion",
            4,
            serde_json::json!([
                {"role": "assistant", "text": ""},
                {"role": null, "text": "Hello"},
                {"role": null, "text": " from"},
            ]),
        ),
        (
            "text",
            "cmpl-",
            "text_completion",
            3,
            serde_json::json!([{"text": "Hello"}, {"text": " from"}]),
        ),
    ] {
        let plain = &summary[api]["plain"];
        assert!(
            plain["id"]
                .as_str()
                .is_some_and(|id| id.starts_with(id_prefix)),
            "{api}: {plain}"
        );
        assert_eq!(plain["object"], object);
        assert_eq!(plain["model"], "tiny");
        assert_eq!(plain["text"], "Hello from mock-vllm.", "{api}");
        assert_eq!(plain["finish_reason"], "stop", "{api}");
        assert!(
            plain["system_fingerprint"]
                .as_str()
                .is_some_and(|fingerprint| fingerprint.starts_with("vllm-")),
            "{api}: {plain}"
        );
        assert_eq!(plain["usage"], usage(5), "{api}");
        // Two tokens, then the usage chunk, whose fingerprint is the answer's.
        let streamed = &summary[api]["streamed"];
        assert_eq!(streamed["count"], chunks, "{api}: {streamed}");
        assert_eq!(streamed["pieces"], pieces, "{api}");
        assert_eq!(streamed["ids"].as_array().map(Vec::len), Some(1), "one id");
        assert_eq!(streamed["finish_reasons"], serde_json::json!(["length"]));
        assert_eq!(streamed["last_choices"], 0, "{api}");
        assert_eq!(streamed["last_usage"], usage(2), "{api}");
        assert_eq!(streamed["last_fingerprint"], plain["system_fingerprint"]);
    }
    let chat = &summary["chat"]["plain"];
    assert_eq!(chat["role"], "assistant");
    assert_eq!(chat["tool_calls"], serde_json::Value::Null);
}

fn chat_request(name: &str) -> String {
    fixture_text(&format!("vllm-0.32-tiny-{name}.request.json"))
}

/// Regression: the message had `tool_calls` and `reasoning_content` where vLLM 0.32 has
/// `reasoning`, and the body lacked the fingerprint and vLLM's fields after `usage`.
#[test]
fn a_chat_completion_has_the_shape_vllm_gave_it() {
    let server = tiny_with(&[]);
    let (json, recorded) =
        answer_shaped_as_recorded(&server, "/v1/chat/completions", "vllm-0.32-tiny-chat");
    for field in ["object", "model"] {
        assert_eq!(json[field], recorded[field], "{field}");
    }
    assert!(
        json["system_fingerprint"]
            .as_str()
            .is_some_and(|fingerprint| fingerprint.starts_with("vllm-")),
        "{json}"
    );
    let choice = &json["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "Hello from mock-vllm.");
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(json["usage"]["completion_tokens"], 5);
}

/// Regression: the mock sent a separate finish chunk where vLLM 0.32 puts the finish reason on
/// the last token's chunk with its fingerprint; its role and content chunks lacked vLLM's fields;
/// and its usage chunk had a `null` that vLLM leaves out.
#[test]
fn a_chat_stream_has_the_shape_vllm_gave_it_with_and_without_a_usage_chunk() {
    let server = tiny_with(&[]);
    for name in ["chat-stream", "chat-stream-usage"] {
        let response = post_json(server.port, "/v1/chat/completions", &chat_request(name), "");
        assert_eq!(response.status, 200, "{name}");
        assert_eq!(
            response.header("content-type"),
            Some("text/event-stream; charset=utf-8"),
            "{name}"
        );
        let recorded = fixture(&format!("vllm-0.32-tiny-{name}.sse"));
        assert_eq!(
            sse_shapes(&response.body),
            sse_shapes(&recorded),
            "{name}: {}",
            String::from_utf8_lossy(&response.body)
        );
        let chunks = sse_data(&response.body);
        assert_eq!(chat_content(&chunks), "Hello from mock-vllm.");
        let finish = chunks
            .iter()
            .find(|chunk| !chunk["choices"][0]["finish_reason"].is_null())
            .expect("a finishing chunk");
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    }
    // Cut by the limit, the stream ends as the recording does: `length` on the last token.
    let cut = post_json(
        server.port,
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,"stream":true}"#,
        "",
    );
    let chunks = sse_data(&cut.body);
    assert_eq!(chunks.len(), 3, "the role chunk and two tokens");
    let last = &chunks[2];
    assert_eq!(last["choices"][0]["delta"]["content"], " from");
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert!(last["system_fingerprint"].is_string(), "{last}");
}

/// vLLM 0.32 names a chat completion after the request's `x-request-id`, as it names a text
/// completion.
#[test]
fn a_chat_completion_is_named_after_the_request_id() {
    let server = tiny_with(&[]);
    let header = "\r\nX-Request-Id: job-382";
    let chat = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
    let whole = post_json(server.port, "/v1/chat/completions", chat, header);
    assert_eq!(whole.json()["id"], "chatcmpl-job-382");
    let stream = post_json(
        server.port,
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        header,
    );
    let chunks = sse_data(&stream.body);
    assert!(!chunks.is_empty());
    assert!(chunks.iter().all(|chunk| chunk["id"] == "chatcmpl-job-382"));
    // Without the header, vLLM makes up an id.
    let unnamed = post_json(server.port, "/v1/chat/completions", chat, "").json();
    assert!(
        unnamed["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chatcmpl-") && id != "chatcmpl-job-382"),
        "{unnamed}"
    );
}

/// Sends `body` to `path` labelled with `content_type` (no label when `None`).
fn post_labelled(port: u16, path: &str, body: &str, content_type: Option<&str>) -> RawResponse {
    let label = content_type.map_or_else(String::new, |label| format!("\r\nContent-Type: {label}"));
    raw_request(
        port,
        &format!("POST {path} HTTP/1.1{label}"),
        body.as_bytes(),
    )
}

/// Checked against vLLM 0.32: its JSON endpoints refuse a body labelled as anything else, even a
/// well-formed one, before they look at it.
#[test]
fn a_body_not_labelled_json_gets_vllms_400_on_every_json_endpoint() {
    let server = tiny_with(&[]);
    let recorded = fixture("vllm-0.32-tiny-error-content-type.json");
    let chat = chat_request("error-content-type");
    for (path, body) in [
        ("/v1/chat/completions", chat.as_str()),
        ("/v1/completions", r#"{"prompt":"Hello"}"#),
        ("/v1/responses", r#"{"input":"Hello"}"#),
        ("/tokenize", r#"{"prompt":"Hello"}"#),
        ("/detokenize", r#"{"tokens":[1]}"#),
    ] {
        for content_type in [Some("text/plain"), Some("application/jsonx"), None] {
            let response = post_labelled(server.port, path, body, content_type);
            assert_eq!(response.status, 400, "{path} {content_type:?}");
            assert_eq!(response.header("content-type"), Some("application/json"));
            assert_eq!(
                String::from_utf8_lossy(&response.body),
                String::from_utf8_lossy(&recorded),
                "{path} {content_type:?}"
            );
        }
        // JSON in any case and with parameters passes the check.
        for content_type in ["APPLICATION/JSON", "application/json; charset=utf-8"] {
            let response = post_labelled(server.port, path, body, Some(content_type));
            assert_eq!(response.status, 200, "{path} {content_type}");
        }
    }
    // `/ping` takes any body.
    assert_eq!(
        post_labelled(server.port, "/ping", "x", Some("text/plain")).status,
        200
    );
}

/// Checked against vLLM 0.32: FastAPI's routes answer no HEAD, not even the health routes, which
/// answer GET.
#[test]
fn head_of_vllms_get_routes_is_refused_with_405_allowing_get_as_vllm_does() {
    let server = tiny_with(&[]);
    for (path, name) in [
        ("/health", "vllm-0.32-tiny-health-head.txt"),
        ("/ping", "vllm-0.32-tiny-ping-head.txt"),
    ] {
        let recorded = fixture_text(name);
        let head = raw_request(server.port, &format!("HEAD {path} HTTP/1.1"), b"");
        let (status, content_type, _) = recorded_with_head(name);
        assert_eq!(head.status, status, "{path}");
        assert_eq!(
            head.header("content-type").map(str::to_owned),
            content_type,
            "{path}"
        );
        let allow = recorded
            .lines()
            .find_map(|line| line.strip_prefix("allow: "))
            .expect("the recording has an allow header");
        assert_eq!(head.header("allow"), Some(allow), "{path}");
        assert!(head.body.is_empty(), "{path}");
    }
    // So vLLM 0.32 answered other methods too: the 405 allows GET alone, HEAD not being served
    // (and `/ping`'s GET route coming before its POST one).
    for head in ["PUT /health HTTP/1.1", "DELETE /ping HTTP/1.1"] {
        let refused = raw_request(server.port, head, b"");
        assert_eq!(refused.status, 405, "{head}");
        assert_eq!(refused.header("allow"), Some("GET"), "{head}");
        assert_eq!(
            refused.body, br#"{"detail":"Method Not Allowed"}"#,
            "{head}"
        );
    }
    // As it answered a HEAD of its other GET routes.
    for path in ["/version", "/v1/models"] {
        let head = raw_request(server.port, &format!("HEAD {path} HTTP/1.1"), b"");
        assert_eq!(head.status, 405, "{path}");
        assert_eq!(head.header("allow"), Some("GET"), "{path}");
    }
    // `/metrics`, an app of its own in vLLM, answers HEAD.
    let metrics = raw_request(server.port, "HEAD /metrics HTTP/1.1", b"");
    assert_eq!(metrics.status, 200);
}
