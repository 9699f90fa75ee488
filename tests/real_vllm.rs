//! `gateway serve` supervising a real vLLM (the CPU build of 0.32.0) on a tiny random-weight model,
//! as a user runs it: `gateway serve <model dir> -- --served-model-name tiny --max-model-len 1024
//! --enforce-eager` with vLLM on PATH. The setup (a venv and the model) is made by
//! tests/vllm/setup.sh; `make test-vllm` makes it and points GATEWAY_TEST_VLLM at it.
//!
//! Under a plain `cargo test` GATEWAY_TEST_VLLM is unset and every test returns at once with a
//! notice. When it is set, a missing setup fails the test, so `make test-vllm` never skips.
//!
//! A vLLM start costs 25 to 50 s of both cores, so each test is one vLLM lifetime and checks
//! everything that lifetime can show; `make test-vllm` runs them one at a time.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::systemd::Systemd;
use common::*;

/// A vLLM start on 2 busy cores, with room to spare.
const START_DEADLINE: Duration = Duration::from_secs(300);
const DEADLINE: Duration = Duration::from_secs(30);
/// The gateway's `--stop-timeout` in these tests.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// A chat stream that keeps the tiny model's engine busy for about 8 s on 2 idle cores: 16 choices
/// of a thousand tokens each, each token with its 20 most likely alternatives, and no stop at the
/// end-of-text token. vLLM counts each choice as a running request.
const LONG_CHAT_STREAM: &str = r#"{"model":"tiny","messages":[{"role":"user","content":"hi"}],"n":16,"max_tokens":1000,"ignore_eos":true,"logprobs":true,"top_logprobs":20,"stream":true}"#;

/// Where tests/vllm/setup.sh put vLLM and the model.
struct Setup {
    bin: PathBuf,
    model: PathBuf,
    python: PathBuf,
}

/// The setup named by GATEWAY_TEST_VLLM; `None` (the test skips) when the variable is unset.
fn setup() -> Option<Setup> {
    let Some(dir) = std::env::var_os("GATEWAY_TEST_VLLM") else {
        eprintln!("skipped: GATEWAY_TEST_VLLM is not set; `make test-vllm` sets up and runs these");
        return None;
    };
    let dir = PathBuf::from(dir);
    let setup = Setup {
        bin: dir.join("venv/bin"),
        model: dir.join("model"),
        python: dir.join("venv/bin/python"),
    };
    assert!(
        setup.bin.join("vllm").is_file() && setup.model.join("config.json").is_file(),
        "GATEWAY_TEST_VLLM={} holds no vLLM setup: run `make vllm-setup`",
        dir.display()
    );
    Some(setup)
}

/// `gateway serve <model> --port <port> [extra] -- <vllm args>` with vLLM found on PATH; returns
/// the gateway and vLLM's port without waiting.
fn serve(setup: &Setup, extra: &[&str], env: &[(&str, &str)]) -> (Proc, u16) {
    serve_from(GATEWAY, setup, extra, env)
}

/// [`serve`], with the gateway run from `program`.
fn serve_from(program: &str, setup: &Setup, extra: &[&str], env: &[(&str, &str)]) -> (Proc, u16) {
    let stop_timeout = format!("{}s", STOP_TIMEOUT.as_secs());
    let mut args: Vec<String> = vec![
        "serve".into(),
        setup.model.to_str().expect("utf-8 path").into(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        "0".into(),
        "--vllm-port".into(),
        "0".into(),
        "--startup-poll-interval".into(),
        "200ms".into(),
        "--restart-delay".into(),
        "100ms".into(),
        "--stop-timeout".into(),
        stop_timeout,
    ];
    args.extend(extra.iter().map(|arg| arg.to_string()));
    args.extend(
        [
            "--",
            "--served-model-name",
            "tiny",
            "--max-model-len",
            "1024",
            "--enforce-eager",
        ]
        .map(String::from),
    );
    let path = format!(
        "{}:{}",
        setup.bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut all_env = vec![
        ("PATH", path.as_str()),
        ("VLLM_CPU_KVCACHE_SPACE", "1"),
        ("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        ("HF_HUB_OFFLINE", "1"),
        ("VLLM_NO_USAGE_STATS", "1"),
        ("DO_NOT_TRACK", "1"),
    ];
    all_env.extend_from_slice(env);
    let mut gateway = spawn(program, &args, &all_env, 0);
    gateway.port = gateway
        .wait_report("the port it listens on", reported_listen_port)
        .expect("the gateway reports its port");
    let vllm_port = gateway
        .wait_report("vLLM's port", reported_vllm_port)
        .expect("the gateway reports vLLM's port");
    (gateway, vllm_port)
}

/// Waits until the gateway's /readyz answers 200, failing at once if the gateway exits.
fn wait_ready(gateway: &mut Proc) {
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        if let Some(status) = gateway.child.try_wait().expect("try_wait") {
            panic!(
                "the gateway exited ({status}) before vLLM was ready; log:\n{}",
                gateway.log_text()
            );
        }
        if get(&gateway.url("/readyz")).is_some_and(|(status, _)| status == 200) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "vLLM was not ready within {START_DEADLINE:?}; log:\n{}",
            gateway.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One process, from /proc/<pid>/stat.
#[derive(Clone, Debug, PartialEq)]
struct Process {
    pid: i32,
    name: String,
    parent: i32,
    group: i32,
    /// Start time in clock ticks since boot: tells a process from a later one with its pid.
    start: u64,
}

fn read_process(pid: i32) -> Option<Process> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(") ")?;
    let name = head.split_once(" (")?.1.to_string();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first()?.chars().next()?, 'Z' | 'X') {
        return None;
    }
    Some(Process {
        pid,
        name,
        parent: fields.get(1)?.parse().ok()?,
        group: fields.get(2)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

/// Every live (not zombie) process on the machine.
fn processes() -> Vec<Process> {
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter_map(read_process)
        .collect()
}

/// vLLM's API server: the gateway's child that leads a process group of its own and is not the
/// gateway's guard (`gateway __guard`, one per vLLM start).
///
/// Each is checked on what it runs now: a guard between its fork and its exec runs the gateway's
/// own binary, and one that is exiting has dropped its memory, so its command line reads empty
/// and it has no binary left, before /proc shows it as a zombie; neither is vLLM.
fn api_server(gateway: &Proc) -> Option<Process> {
    let exe = |pid: i32| std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let gateway_exe = exe(gateway.pid());
    processes().into_iter().find(|process| {
        if process.parent != gateway.pid() || process.group != process.pid {
            return false;
        }
        // The command line first: a guard that exits after it is read has no binary left either.
        let guard = std::fs::read(format!("/proc/{}/cmdline", process.pid))
            .unwrap_or_default()
            .split(|byte| *byte == 0)
            .any(|arg| arg == b"__guard");
        !guard && exe(process.pid).is_some_and(|path| Some(&path) != gateway_exe.as_ref())
    })
}

/// The API server's generation: every process in its group or descended from it (the engine
/// core, its workers, multiprocessing's resource tracker).
fn generation(api: &Process) -> Vec<Process> {
    let all = processes();
    let mut members: Vec<Process> = all
        .iter()
        .filter(|process| process.group == api.group)
        .cloned()
        .collect();
    let mut frontier = vec![api.pid];
    while let Some(parent) = frontier.pop() {
        for process in all.iter().filter(|process| process.parent == parent) {
            if !members.contains(process) {
                members.push(process.clone());
            }
            frontier.push(process.pid);
        }
    }
    members
}

/// Those of `processes` that are still running (same pid, same start time, not a zombie).
fn still_running(processes: &[Process]) -> Vec<Process> {
    processes
        .iter()
        .filter(|process| read_process(process.pid).is_some_and(|now| now.start == process.start))
        .cloned()
        .collect()
}

fn names(processes: &[Process]) -> Vec<String> {
    processes
        .iter()
        .map(|process| format!("{} {}", process.pid, process.name))
        .collect()
}

/// A generation of a loaded vLLM has its engine core and a worker (`/proc` truncates names to 15
/// bytes: `VLLM::EngineCor`).
fn assert_whole_generation(generation: &[Process]) {
    for name in ["VLLM::EngineCor", "VLLM::Worker"] {
        assert!(
            generation.iter().any(|process| process.name == name),
            "no {name} among {:?}",
            names(generation)
        );
    }
}

/// The value of the first sample of vLLM's own /metrics whose line starts with `name{` and holds
/// every one of `labels` (`key="value"`).
fn vllm_metric(vllm_port: u16, name: &str, labels: &[&str]) -> Option<f64> {
    let (status, body) = get(&format!("http://127.0.0.1:{vllm_port}/metrics"))?;
    if status != 200 {
        return None;
    }
    body.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit_once(' '))
        .and_then(|(_, value)| value.parse().ok())
}

fn running_requests(vllm_port: u16) -> Option<f64> {
    vllm_metric(vllm_port, "vllm:num_requests_running", &[])
}

/// Runs a Python script from the setup's venv (it holds the OpenAI SDK and prometheus_client).
fn run_python(setup: &Setup, script: &str, args: &[&str], stdin: &[u8]) -> serde_json::Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(script);
    let mut child = Command::new(&setup.python)
        .arg(&script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the setup's python runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    let output = child.wait_with_output().expect("python output");
    assert!(
        output.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("a JSON summary")
}

/// A short chat completion through the gateway answers 200: the vLLM behind it serves.
fn assert_answers_a_chat(gateway: &Proc) {
    let answer = post_json(
        gateway.port,
        "/v1/chat/completions",
        r#"{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#,
        "",
    );
    assert_eq!(answer.status, 200);
}

#[test]
fn serve_opens_only_once_real_vllm_is_ready_serves_the_openai_sdk_and_stops_cleanly_on_sigterm() {
    let Some(setup) = setup() else { return };
    let systemd = Systemd::listen(false);
    // A copy, which the in-place upgrade below replaces.
    let binary_dir = tempfile::tempdir().expect("tempdir");
    let binary = binary_dir.path().join("gateway");
    std::fs::copy(GATEWAY, &binary).expect("copy the gateway");
    let (mut gateway, vllm_port) = serve_from(
        binary.to_str().expect("utf-8 path"),
        &setup,
        &[
            "--metrics-merge-upstream",
            "true",
            "--drain-timeout",
            "300s",
            "--health-port",
            "0",
        ],
        &[("NOTIFY_SOCKET", &systemd.socket_env)],
    );
    // Reported when the port is reserved, long before vLLM is ready and READY=1 can come.
    systemd.set_proxy_port(gateway.port);
    let health_port = gateway.expect_report("the health port", reported_health_port);
    let on_health_port = |path: &str| {
        get(&format!("http://127.0.0.1:{health_port}{path}")).map(|(status, _)| status)
    };

    // While vLLM loads, its port refuses connections and so does the gateway's; the gateway's
    // opens only once vLLM answers /health. The health port answers all along.
    let deadline = Instant::now() + START_DEADLINE;
    let mut saw_loading = false;
    let mut health_port_while_loading = None;
    loop {
        if let Some(status) = gateway.child.try_wait().expect("try_wait") {
            panic!(
                "the gateway exited ({status}); log:\n{}",
                gateway.log_text()
            );
        }
        if accepts_connections(gateway.port) {
            let health = get(&format!("http://127.0.0.1:{vllm_port}/health"));
            assert_eq!(
                health.map(|(status, _)| status),
                Some(200),
                "the gateway listened before vLLM was ready"
            );
            break;
        }
        if !accepts_connections(vllm_port) {
            saw_loading = true;
            health_port_while_loading
                .get_or_insert((on_health_port("/livez"), on_health_port("/readyz")));
        }
        assert!(Instant::now() < deadline, "{}", gateway.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(saw_loading, "the loading phase was never seen");
    assert_eq!(
        health_port_while_loading,
        Some((Some(200), Some(503))),
        "/livez and /readyz on the health port while vLLM loads"
    );
    wait_until("/readyz 200", DEADLINE, || {
        get(&gateway.url("/readyz")).is_some_and(|(status, _)| status == 200)
    });
    assert_eq!(on_health_port("/readyz"), Some(200));
    wait_until("READY=1", DEADLINE, || {
        systemd
            .messages()
            .iter()
            .any(|message| message.starts_with("READY=1"))
    });
    let messages = systemd.messages();
    let ready = messages
        .iter()
        .position(|message| message.starts_with("READY=1"))
        .expect("ready");
    assert_eq!(messages[ready], "READY=1", "{messages:?}");
    let loading = messages
        .iter()
        .position(|message| message.starts_with("STATUS=loading model: waiting for vLLM /health"))
        .unwrap_or_else(|| panic!("no loading status: {messages:?}"));
    assert!(loading < ready, "{messages:?}");

    the_openai_sdk_gets_vllms_answers_and_errors(&setup, &gateway, vllm_port);
    a_key_in_a_url_does_not_reach_the_log_through_vllms_access_line(&gateway);
    a_client_that_disconnects_mid_stream_makes_vllm_abort_the_request(&gateway, vllm_port);
    merged_metrics_hold_vllms_own_and_parse(&setup, &gateway);
    an_upgrade_in_place_keeps_every_vllm_process(&gateway, &binary, &systemd);

    // SIGTERM with a stream in flight: the stream ends properly, then vLLM and all its processes.
    let api = api_server(&gateway).expect("vLLM's API server");
    let vllm = generation(&api);
    assert_whole_generation(&vllm);
    let port = gateway.port;
    let stream =
        std::thread::spawn(move || post_json(port, "/v1/chat/completions", LONG_CHAT_STREAM, ""));
    wait_until("the stream to run in vLLM", DEADLINE, || {
        running_requests(vllm_port) >= Some(1.0)
    });
    gateway.signal(Signal::SIGTERM);
    let stream = stream.join().expect("stream thread");
    assert_eq!(stream.status, 200);
    let body = String::from_utf8_lossy(&stream.body);
    assert!(
        body.ends_with("data: [DONE]\n\n") && body.contains(r#""finish_reason":"length""#),
        "the stream was not completed: ...{}",
        String::from_utf8_lossy(&stream.body[stream.body.len().saturating_sub(400)..])
    );
    assert_eq!(gateway.wait_exit(DEADLINE).code(), Some(0));
    wait_until("no vLLM process left", DEADLINE, || {
        still_running(&vllm).is_empty()
    });
    wait_until("STOPPING=1", DEADLINE, || {
        systemd
            .messages()
            .iter()
            .any(|message| message == "STOPPING=1")
    });
}

/// uvicorn's access line repeats the request target as the client sent it, key and all; the
/// gateway relays vLLM's output with the key's value hidden.
fn a_key_in_a_url_does_not_reach_the_log_through_vllms_access_line(gateway: &Proc) {
    let (status, _) = get(&gateway.url("/v1/models?api_key=sk-IN-THE-URL")).expect("vLLM answers");
    assert_eq!(status, 200);
    wait_until("vLLM's access line for the request", DEADLINE, || {
        gateway
            .log_text()
            .contains("GET /v1/models?api_key=*** HTTP/1.1")
    });
    assert!(!gateway.log_text().contains("sk-IN-THE-URL"));
}

fn the_openai_sdk_gets_vllms_answers_and_errors(setup: &Setup, gateway: &Proc, vllm_port: u16) {
    let result = run_python(setup, "tests/vllm/client.py", &[&gateway.url("/v1")], b"");
    let plain = &result["plain"];
    assert_eq!(plain["status"], "incomplete", "{result}");
    assert_eq!(plain["incomplete_reason"], "max_output_tokens", "{result}");
    assert_eq!(
        plain["output_types"],
        serde_json::json!(["message"]),
        "{result}"
    );
    assert_eq!(plain["output_tokens"], 8, "{result}");

    let events: Vec<&str> = result["streamed"]["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|event| event.as_str().expect("event type"))
        .collect();
    assert_eq!(events.first(), Some(&"response.created"), "{result}");
    assert_eq!(events.last(), Some(&"response.completed"), "{result}");
    assert!(events.contains(&"response.output_text.delta"), "{result}");
    assert_eq!(result["streamed"]["final_status"], "incomplete", "{result}");

    assert_eq!(
        result["chat"]["finish_reasons"],
        serde_json::json!(["length"]),
        "{result}"
    );
    assert!(result["chat"]["chunks"].as_u64() > Some(1), "{result}");

    assert_eq!(
        result["unknown_model"]["class"], "NotFoundError",
        "{result}"
    );
    assert_eq!(result["unknown_model"]["status"], 404, "{result}");
    assert_eq!(result["too_long"]["class"], "BadRequestError", "{result}");
    assert_eq!(result["too_long"]["status"], 400, "{result}");

    // The same errors, byte for byte as vLLM sends them.
    let too_long = format!(
        r#"{{"model":"tiny","input":"{}","max_output_tokens":8}}"#,
        "hello ".repeat(2000)
    );
    for (body, status) in [
        (
            r#"{"model":"no-such-model","input":"Hello"}"#.to_string(),
            404,
        ),
        (too_long, 400),
    ] {
        let through = post_json(gateway.port, "/v1/responses", &body, "");
        let direct = post_json(vllm_port, "/v1/responses", &body, "");
        assert_eq!(direct.status, status);
        assert_eq!(through.status, direct.status);
        assert_eq!(
            String::from_utf8_lossy(&through.body),
            String::from_utf8_lossy(&direct.body)
        );
        assert_eq!(
            through.header("content-type"),
            direct.header("content-type")
        );
    }
}

fn a_client_that_disconnects_mid_stream_makes_vllm_abort_the_request(
    gateway: &Proc,
    vllm_port: u16,
) {
    // vLLM counts a request that reached its token limit under finished_reason="length", and an
    // aborted one nowhere.
    let finished = || {
        vllm_metric(
            vllm_port,
            "vllm:request_success_total",
            &[r#"finished_reason="length""#],
        )
    };
    let finished_before = finished().expect("vLLM's finished-request counter");
    let mut client = TcpStream::connect(("127.0.0.1", gateway.port)).expect("connect");
    client
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    write!(
        client,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{LONG_CHAT_STREAM}",
        LONG_CHAT_STREAM.len()
    )
    .expect("send the request");
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&received).contains("data: {") {
        let read = client.read(&mut buffer).expect("the stream's first chunks");
        assert!(read > 0, "the stream ended early");
        received.extend_from_slice(&buffer[..read]);
    }
    assert!(running_requests(vllm_port) >= Some(1.0));
    drop(client);
    // Left alone the request keeps the engine busy for several seconds more, then counts as
    // finished; aborted, it leaves at once and is not counted.
    wait_until("vLLM to abort the request", Duration::from_secs(5), || {
        running_requests(vllm_port) == Some(0.0)
    });
    assert_eq!(
        finished(),
        Some(finished_before),
        "the request ran to its token limit"
    );
}

/// The gateway's binary replaced, then SIGHUP: the new image serves, with the same vLLM (every
/// process of it), whose output still reaches the log.
fn an_upgrade_in_place_keeps_every_vllm_process(
    gateway: &Proc,
    binary: &std::path::Path,
    systemd: &Systemd,
) {
    let api = api_server(gateway).expect("vLLM's API server");
    let vllm = generation(&api);
    assert_whole_generation(&vllm);
    let aside = binary.with_extension("new");
    std::fs::copy(GATEWAY, &aside).expect("copy the gateway aside");
    std::fs::rename(&aside, binary).expect("rename over the binary");
    let readies = systemd.count("READY=1");
    gateway.signal(Signal::SIGHUP);
    systemd.wait_count("READY=1", readies + 1);
    assert!(
        !lines_with_message(
            gateway,
            "upgraded in place: took over the listening socket and vLLM from the previous image"
        )
        .is_empty(),
        "{}",
        gateway.log_text()
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/exe", gateway.pid())).expect("exe link"),
        binary,
        "the new binary runs"
    );
    assert_eq!(
        still_running(&vllm),
        vllm,
        "every vLLM process kept running"
    );
    assert_answers_a_chat(gateway);
    // uvicorn's access line for that chat, relayed from the pipe the new image took over.
    wait_until("vLLM's access line after the upgrade", DEADLINE, || {
        gateway.log_text().lines().any(|line| {
            serde_json::from_str::<serde_json::Value>(line).is_ok_and(|line| {
                line["target"] == "vllm"
                    && line["pid"].as_i64() == Some(i64::from(api.pid))
                    && line["message"]
                        .as_str()
                        .is_some_and(|message| message.contains("POST /v1/chat/completions"))
            })
        })
    });
}

fn merged_metrics_hold_vllms_own_and_parse(setup: &Setup, gateway: &Proc) {
    let (status, body) = get(&gateway.url("/metrics")).expect("metrics");
    assert_eq!(status, 200);
    let samples = run_python(setup, "tests/sdk/parse_metrics.py", &[], body.as_bytes());
    let names: Vec<&str> = samples
        .as_array()
        .expect("samples")
        .iter()
        .map(|sample| sample["name"].as_str().expect("name"))
        .collect();
    for name in [
        "gateway_requests_total",
        "vllm:num_requests_running",
        "vllm:request_success_total",
    ] {
        assert!(names.contains(&name), "no {name} in:\n{body}");
    }
}

#[test]
fn a_killed_api_server_leaves_no_engine_behind_before_the_restart_and_a_killed_gateway_leaves_no_vllm()
 {
    let Some(setup) = setup() else { return };
    let (mut gateway, _) = serve(&setup, &[], &[]);
    wait_ready(&mut gateway);
    let api = api_server(&gateway).expect("vLLM's API server");
    let old = generation(&api);
    assert_whole_generation(&old);

    // SIGKILL of the API server alone orphans its engine core and workers; none of them may be
    // running once the next API server exists.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(api.pid), Signal::SIGKILL)
        .expect("kill the API server");
    let deadline = Instant::now() + START_DEADLINE;
    let new = loop {
        if let Some(status) = gateway.child.try_wait().expect("try_wait") {
            panic!(
                "the gateway exited ({status}); log:\n{}",
                gateway.log_text()
            );
        }
        let new = api_server(&gateway).filter(|process| process.pid != api.pid);
        let left = still_running(&old);
        if let Some(new) = new {
            assert!(
                left.is_empty(),
                "a new vLLM ({}) started while the old one's processes ran: {:?}",
                new.pid,
                names(&left)
            );
            break new;
        }
        assert!(Instant::now() < deadline, "{}", gateway.log_text());
        std::thread::sleep(Duration::from_millis(10));
    };
    wait_ready(&mut gateway);
    assert_answers_a_chat(&gateway);

    // SIGKILL of the gateway: its guard stops vLLM's whole group within stop_timeout.
    let vllm = generation(&new);
    assert_whole_generation(&vllm);
    gateway.signal(Signal::SIGKILL);
    gateway.wait_exit(DEADLINE);
    wait_until(
        "no vLLM process left after the gateway was killed",
        STOP_TIMEOUT + Duration::from_secs(5),
        || still_running(&vllm).is_empty(),
    );
}

#[test]
fn an_engine_death_that_vllm_answers_with_exit_0_is_restarted_under_on_failure() {
    let Some(setup) = setup() else { return };
    let (mut gateway, _) = serve(&setup, &["--restart", "on-failure"], &[]);
    wait_ready(&mut gateway);
    let api = api_server(&gateway).expect("vLLM's API server");
    let old = generation(&api);
    assert_whole_generation(&old);
    let engine = old
        .iter()
        .find(|process| process.name == "VLLM::EngineCor")
        .expect("the engine core");

    // As after a CUDA error: the engine dies, the API server answers /health 503 for a few
    // seconds, then exits with code 0 on its own.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(engine.pid), Signal::SIGKILL)
        .expect("kill the engine core");
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        if let Some(status) = gateway.child.try_wait().expect("try_wait") {
            panic!(
                "the gateway exited ({status}) instead of restarting vLLM; log:\n{}",
                gateway.log_text()
            );
        }
        if api_server(&gateway).is_some_and(|process| process.pid != api.pid) {
            break;
        }
        assert!(Instant::now() < deadline, "{}", gateway.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_ready(&mut gateway);
    assert_answers_a_chat(&gateway);
    let (_, metrics) = get(&gateway.url("/metrics")).expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("gateway_child_restarts_total") && line.ends_with(" 1")),
        "one restart counted:\n{metrics}"
    );
}
