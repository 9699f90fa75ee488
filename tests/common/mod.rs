//! Shared test harness: starts the real `gateway` and `mock-vllm` binaries on loopback port 0 and
//! reads the port each reports it bound (so parallel tests never race for a port), waits on
//! conditions with deadlines (never fixed sleeps), and kills what it started. The constants tests
//! share live here too.

#![allow(dead_code)]

pub mod systemd;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");
pub const MOCK_VLLM: &str = env!("CARGO_BIN_EXE_mock-vllm");

/// How long a test waits for something it expects: long enough for a loaded machine, short
/// enough that a hang fails the test rather than the run.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A non-streaming Responses request for the model every test serves.
pub const RESPONSES_JSON: &str = r#"{"model":"mock-model","input":"hi"}"#;

/// A streaming Responses request for the model every test serves.
pub const RESPONSES_STREAM: &str = r#"{"model":"mock-model","input":"hi","stream":true}"#;

pub fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

/// A port nobody listened on a moment ago. Another process may take it before the caller uses
/// it, so it is only for a test that must name a port before any process exists (to show that a
/// process never listened on it); a process the test starts gets port 0 and reports its port, and
/// a port that must refuse connections is a [`ClosedPort`].
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// A loopback port bound but not listening, for as long as this lives: connections to it are
/// refused, and no other process can take it meanwhile.
pub struct ClosedPort {
    pub port: u16,
    _socket: socket2::Socket,
}

impl ClosedPort {
    pub fn new() -> Self {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("create a socket");
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind an ephemeral port");
        let port = socket
            .local_addr()
            .expect("local address")
            .as_socket()
            .expect("an IP address")
            .port();
        ClosedPort {
            port,
            _socket: socket,
        }
    }
}

/// The value of field `name` on one log line, whether the line is JSON (`"name":value`, as the
/// gateway logs to a file) or text (`name=value`, as it logs to a terminal).
pub fn log_field(line: &str, name: &str) -> Option<String> {
    if let Ok(serde_json::Value::Object(fields)) = serde_json::from_str(line) {
        return match fields.get(name)? {
            serde_json::Value::String(text) => Some(text.clone()),
            other => Some(other.to_string()),
        };
    }
    let prefix = format!("{name}=");
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(&prefix))
        .map(|value| value.trim_matches('"').to_string())
}

/// The port the gateway reports it listens on: the `listen` field it logs once the address is
/// bound (under `serve`, before vLLM starts; standalone, with "gateway listening").
pub fn reported_listen_port(log: &str) -> Option<u16> {
    reported_address_port(log, "listen")
}

/// The health port as the gateway reports it: the `health_listen` field of "health listener open".
pub fn reported_health_port(log: &str) -> Option<u16> {
    reported_address_port(log, "health_listen")
}

/// The port of the first address logged in `field`, unless it is 0.
fn reported_address_port(log: &str, field: &str) -> Option<u16> {
    log.lines()
        .filter_map(|line| log_field(line, field))
        .find_map(|address| address.parse::<SocketAddr>().ok())
        .map(|address| address.port())
        .filter(|port| *port != 0)
}

/// vLLM's port as `gateway serve` reports it: the `vllm_port` field of "starting vLLM" (the port
/// `--vllm-port 0` resolved to), or of the line saying why vLLM was not started.
pub fn reported_vllm_port(log: &str) -> Option<u16> {
    log.lines()
        .filter_map(|line| log_field(line, "vllm_port"))
        .find_map(|port| port.parse::<u16>().ok())
        .filter(|port| *port != 0)
}

/// The port mock-vllm reports in its startup line, as uvicorn does:
/// `Uvicorn running on http://127.0.0.1:PORT (Press CTRL+C to quit)`.
pub fn reported_uvicorn_port(log: &str) -> Option<u16> {
    log.lines().find_map(|line| {
        let url = line.split("Uvicorn running on http://").nth(1)?;
        let authority = url.split(|c: char| c == '/' || c.is_whitespace()).next()?;
        authority.rsplit_once(':')?.1.parse().ok()
    })
}

/// Polls `condition` until it holds or `timeout` passes; panics with `what` on timeout.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

pub fn accepts_connections(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// A process that is killed (and reaped) when dropped.
pub struct Proc {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal)
            .expect("signal the process");
    }

    /// Waits for the process to exit, panicking after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "process {} did not exit within {timeout:?}; log:\n{}",
                    self.pid(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log shows what `read` looks for (a port the process reports), or the
    /// process exits first (`None`); panics after [`DEADLINE`].
    pub fn wait_report(&mut self, what: &str, read: impl Fn(&str) -> Option<u16>) -> Option<u16> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let exited = self.child.try_wait().expect("try_wait").is_some();
            // Read after checking for an exit, so that a report logged just before it counts.
            if let Some(port) = read(&self.log_text()) {
                return Some(port);
            }
            if exited {
                return None;
            }
            if Instant::now() > deadline {
                panic!(
                    "process {} did not report {what} within {DEADLINE:?}; log:\n{}",
                    self.pid(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`Proc::wait_report`] for a process that must report before anything else can happen.
    pub fn expect_report(&mut self, what: &str, read: impl Fn(&str) -> Option<u16>) -> u16 {
        self.wait_report(what, read).unwrap_or_else(|| {
            panic!(
                "process {} exited before reporting {what}; log:\n{}",
                self.pid(),
                self.log_text()
            )
        })
    }
}

impl Drop for Proc {
    /// Stops gracefully first, so a gateway can take its child's whole process group down with it;
    /// SIGKILL only if that does not happen in time.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid()),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spawn(program: &str, args: &[String], env: &[(&str, &str)], port: u16) -> Proc {
    spawn_wrapped(&[], program, args, env, port)
}

/// Runs `wrapper... program args...`: the wrapper (a shell, `unshare`) must end by exec'ing the
/// program, so that the pid is the program's own.
fn spawn_wrapped(
    wrapper: &[&str],
    program: &str,
    args: &[String],
    env: &[(&str, &str)],
    port: u16,
) -> Proc {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("output.log");
    let file = std::fs::File::create(&log).expect("log file");
    let mut command = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut command = Command::new(first);
            command.args(rest).arg(program);
            command
        }
        None => Command::new(program),
    };
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("clone log"))
        .stderr(file)
        .env_remove("OPENAI_API_KEY")
        .env_remove("VLLM_API_KEY")
        .env_remove("NOTIFY_SOCKET")
        .env("RUST_LOG", "info");
    for (name, value) in env {
        command.env(name, value);
    }
    let child = command
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {program}: {error}"));
    Proc {
        child,
        port,
        log,
        _dir: dir,
    }
}

/// Starts mock-vllm on port 0 and waits until it reports the port it listens on.
pub fn mock_vllm(env: &[(&str, &str)]) -> Proc {
    mock_vllm_wrapped(&[], env)
}

/// Starts the standalone gateway on port 0 in front of `upstream_port`, and waits until it reports
/// the port it listens on (it accepts connections from then on).
pub fn gateway(upstream_port: u16, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut args = vec![
        "--llm-api-base".to_string(),
        format!("http://127.0.0.1:{upstream_port}/v1"),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        "0".into(),
    ];
    args.extend(extra.iter().map(|arg| arg.to_string()));
    let mut proc = spawn(GATEWAY, &args, env, 0);
    proc.port = proc.expect_report("the port it listens on", reported_listen_port);
    proc
}

/// Starts `gateway serve mock-model` with mock-vllm as the child, both on port 0; returns once
/// the gateway has reported both ports (before vLLM is ready), with vLLM's.
pub fn gateway_serve(extra: &[&str], env: &[(&str, &str)]) -> (Proc, u16) {
    gateway_serve_on(0, extra, env)
}

/// `gateway_serve` listening on `port` (0: the port the gateway reports).
pub fn gateway_serve_on(port: u16, extra: &[&str], env: &[(&str, &str)]) -> (Proc, u16) {
    gateway_serve_wrapped(&[], port, extra, env)
}

/// `gateway_serve_on`, started through a wrapper command (see [`spawn_wrapped`]).
pub fn gateway_serve_wrapped(
    wrapper: &[&str],
    port: u16,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Proc, u16) {
    gateway_serve_child(wrapper, port, MOCK_VLLM, 0, extra, env)
}

/// `gateway_serve_wrapped` with vLLM's executable and port chosen by the caller. A port of 0 is
/// the one the gateway reports; one the gateway exits without reporting stays 0, for the test to
/// see the exit.
pub fn gateway_serve_child(
    wrapper: &[&str],
    port: u16,
    vllm_bin: &str,
    vllm_port: u16,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Proc, u16) {
    let mut proc = spawn_gateway_serve(wrapper, port, vllm_bin, vllm_port, extra, env);
    if port == 0 {
        proc.port = proc
            .wait_report("the port it listens on", reported_listen_port)
            .unwrap_or(0);
    }
    let vllm_port = match vllm_port {
        0 => proc
            .wait_report("vLLM's port", reported_vllm_port)
            .unwrap_or(0),
        chosen => chosen,
    };
    (proc, vllm_port)
}

/// Starts `gateway serve` as [`gateway_serve_child`] does, without waiting for anything: for a
/// gateway that reports its ports somewhere else than its output (the journal), where the test
/// reads them and sets `port` itself.
pub fn spawn_gateway_serve(
    wrapper: &[&str],
    port: u16,
    vllm_bin: &str,
    vllm_port: u16,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let mut args = vec![
        "serve".to_string(),
        "mock-model".into(),
        "--vllm-bin".into(),
        vllm_bin.into(),
        "--vllm-port".into(),
        vllm_port.to_string(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
        "--startup-poll-interval".into(),
        "50ms".into(),
        "--restart-delay".into(),
        "100ms".into(),
    ];
    args.extend(extra.iter().map(|arg| arg.to_string()));
    spawn_wrapped(wrapper, GATEWAY, &args, env, port)
}

/// A minimal HTTP/1.1 exchange over a raw socket, for tests that must see exact bytes and headers.
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "body is not JSON ({error}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Sends `head` (request line and headers, without the final blank line) plus `body`, with
/// `Connection: close`, and reads the whole response.
pub fn raw_request(port: u16, head: &str, body: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let request = format!(
        "{head}\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("write head");
    stream.write_all(body).expect("write body");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    parse_response(&raw)
}

/// Reads one response with a `content-length` body from a kept-alive connection.
pub fn read_response(stream: &mut TcpStream) -> RawResponse {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).expect("read the response head");
        assert_eq!(n, 1, "the connection closed mid-head");
        raw.push(byte[0]);
    }
    let head = parse_response(&raw);
    let length: usize = head
        .header("content-length")
        .expect("content-length")
        .parse()
        .expect("numeric content-length");
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).expect("read the body");
    raw.extend_from_slice(&body);
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> RawResponse {
    let split = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("response has a header block");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(name, value)| name == "transfer-encoding" && value.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    RawResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = data.windows(2).position(|window| window == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        data = &data[line_end + 2..];
        if size == 0 || data.len() < size {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
}

/// GET a URL with a short timeout; returns (status, body) or None when nothing answered.
pub fn get(url: &str) -> Option<(u16, String)> {
    let url = url.strip_prefix("http://").expect("http URL");
    let (authority, path) = url
        .split_once('/')
        .map(|(a, p)| (a, format!("/{p}")))
        .unwrap_or((url, "/".into()));
    let mut stream = TcpStream::connect(authority).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    if raw.is_empty() {
        return None;
    }
    let response = parse_response(&raw);
    Some((
        response.status,
        String::from_utf8_lossy(&response.body).to_string(),
    ))
}

pub fn post_json(port: u16, path: &str, body: &str, extra_headers: &str) -> RawResponse {
    let head = format!("POST {path} HTTP/1.1\r\nContent-Type: application/json{extra_headers}");
    raw_request(port, &head, body.as_bytes())
}

/// A process's state letter and parent pid, from /proc; `None` once it is gone.
pub fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; state and parent pid follow it.
    let mut fields = stat.rsplit_once(") ")?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((state, parent))
}

/// Whether a process with this pid exists (zombies count as gone).
pub fn alive(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| !matches!(state, 'Z' | 'X'))
}

/// Whether the gateway's `/readyz` answers 200.
pub fn ready(gateway: &Proc) -> bool {
    get(&gateway.url("/readyz")).is_some_and(|(status, _)| status == 200)
}

/// Waits until the gateway's `/readyz` answers 200; on timeout, panics with the gateway's log.
pub fn wait_ready(gateway: &Proc) {
    let deadline = Instant::now() + DEADLINE;
    while !ready(gateway) {
        assert!(
            Instant::now() < deadline,
            "the gateway was not ready within {DEADLINE:?}; its log:\n{}",
            gateway.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A file mock-vllm appends `<pid> <grandchild pid>` to at each start (`MOCK_VLLM_PID_FILE`): the
/// directory guard, the path, and the path as the text an environment variable takes.
pub fn pid_file() -> (tempfile::TempDir, std::path::PathBuf, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pids");
    let text = path.to_str().expect("utf-8 path").to_string();
    (dir, path, text)
}

/// Waits until the pid file shows `count` starts, and returns them.
pub fn wait_for_starts(path: &std::path::Path, count: usize) -> Vec<(i32, i32)> {
    wait_until(&format!("{count} child start(s)"), DEADLINE, || {
        read_pid_file(path).len() >= count
    });
    read_pid_file(path)
}

/// Reads the pid file mock-vllm appends to: one `(pid, grandchild pid)` per start.
pub fn read_pid_file(path: &std::path::Path) -> Vec<(i32, i32)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace().map(|word| word.parse::<i32>().ok());
            Some((words.next()??, words.next()??))
        })
        .collect()
}

/// Starts a streaming `/v1/responses` request through `gateway` on another thread, and returns
/// once the gateway counts it among its active streams (vLLM has answered and the response is
/// under way).
pub fn start_stream(gateway: &Proc) -> std::thread::JoinHandle<RawResponse> {
    let port = gateway.port;
    let stream = std::thread::spawn(move || post_json(port, "/v1/responses", RESPONSES_STREAM, ""));
    wait_until("the stream to start", DEADLINE, || {
        get(&gateway.url("/metrics"))
            .is_some_and(|(_, body)| body.contains("\ngateway_streams_active 1\n"))
    });
    stream
}

/// Starts mock-vllm as `mock_vllm` does, but as the leader of a process group (and session) of
/// its own, as a supervisor starts vLLM, so that a test may signal its whole group.
pub fn mock_vllm_own_group(env: &[(&str, &str)]) -> Proc {
    // setsid(1) execs in place when its caller leads no group, so the pid stays mock-vllm's.
    mock_vllm_wrapped(&["setsid"], env)
}

/// Starts mock-vllm on port 0 through a wrapper that execs it (see [`spawn_wrapped`]), such as
/// `setsid` or `nohup`, and waits until it reports the port it listens on.
pub fn mock_vllm_wrapped(wrapper: &[&str], env: &[(&str, &str)]) -> Proc {
    launch_mock_vllm(wrapper, "mock-model", &[], env)
}

/// Starts mock-vllm on port 0 serving `model` with these further vLLM `options`
/// (`--served-model-name`, `--api-key`, ...), and waits until it reports the port it listens on.
pub fn mock_vllm_serving(model: &str, options: &[&str], env: &[(&str, &str)]) -> Proc {
    launch_mock_vllm(&[], model, options, env)
}

fn launch_mock_vllm(wrapper: &[&str], model: &str, options: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut args: Vec<String> = ["serve", model, "--host", "127.0.0.1", "--port", "0"]
        .map(String::from)
        .into();
    args.extend(options.iter().map(|option| option.to_string()));
    let mut proc = spawn_wrapped(wrapper, MOCK_VLLM, &args, env, 0);
    proc.port = proc.expect_report("the port it listens on", reported_uvicorn_port);
    proc
}

/// The live members of process group `pgid`, each with the name `/proc/<pid>/comm` shows (vLLM's
/// helpers show `VLLM::EngineCor` and `VLLM::Worker`); zombies are left out.
pub fn group_members(pgid: i32) -> Vec<(i32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| alive(*pid) && process_group(*pid) == Some(pgid))
        .filter_map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            Some((pid, comm.trim_end().to_string()))
        })
        .collect()
}

/// A process's process group, from /proc; `None` once it is gone.
pub fn process_group(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the parenthesised command name: state, parent pid, process group.
    stat.rsplit_once(") ")?
        .1
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

/// GETs `/_mock/stats` from a mock-vllm on `port`.
pub fn mock_stats_on(port: u16) -> serde_json::Value {
    let (_, body) = get(&format!("http://127.0.0.1:{port}/_mock/stats")).expect("mock stats");
    serde_json::from_str(&body).expect("stats are JSON")
}

/// The Python that runs the test clients: `make test` points GATEWAY_TEST_PYTHON at a venv holding
/// the pinned packages of tests/requirements.txt; without it, `python3` from PATH.
pub fn python() -> String {
    std::env::var("GATEWAY_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs the SDK client `tests/sdk/<script>` against `base_url` and returns the JSON summary it
/// prints; panics with its stderr when it fails.
pub fn run_sdk_client(script: &str, base_url: &str) -> serde_json::Value {
    let path = format!("{}/tests/sdk/{script}", env!("CARGO_MANIFEST_DIR"));
    let output = std::process::Command::new(python())
        .arg(&path)
        .arg(base_url)
        .output()
        .expect("python runs (`make test` installs the test clients)");
    assert!(
        output.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("a JSON summary")
}

/// The gateway's own JSON log lines (not vLLM's relayed output).
pub fn gateway_lines(gateway: &Proc) -> Vec<serde_json::Value> {
    gateway
        .log_text()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["target"] != "vllm")
        .collect()
}

/// The gateway's own JSON log lines with this message.
pub fn lines_with_message(gateway: &Proc, message: &str) -> Vec<serde_json::Value> {
    gateway_lines(gateway)
        .into_iter()
        .filter(|line| line["message"] == message)
        .collect()
}

/// Writes an executable script into `dir` and returns its path (a stand-in `vllm_bin`).
pub fn script(dir: &std::path::Path, name: &str, text: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path.to_str().expect("utf-8 path").to_string()
}
