//! Upgrading the gateway's binary in place: after the file it runs from is replaced, SIGHUP
//! re-executes the new binary under the same PID. vLLM keeps running as its child, the listening
//! socket stays open (connections wait in its backlog), in-flight requests drain first, and
//! systemd hears RELOADING=1, then READY=1 from the new image. A new binary that cannot start, or
//! a hand-over the new image refuses, never costs vLLM. `/livez` names the running version.
//! Real processes: `gateway serve`, run from a copy of the binary, with mock-vllm as its child.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::systemd::Systemd;
use common::*;
use nix::sys::signal::Signal;

/// A copy of the gateway binary in a directory of its own, which a test may replace.
struct Binary {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Binary {
    fn copy() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gateway");
        std::fs::copy(GATEWAY, &path).expect("copy the gateway binary");
        Binary { path, _dir: dir }
    }

    /// Replaces the file with a new copy of the gateway, as a package manager does: written
    /// aside, renamed over.
    fn replace(&self) {
        let aside = self.path.with_extension("new");
        std::fs::copy(GATEWAY, &aside).expect("copy the gateway binary aside");
        std::fs::rename(&aside, &self.path).expect("rename over the binary");
    }

    /// Replaces the file with an executable shell script.
    fn replace_with_script(&self, script: &str) {
        let aside = self.path.with_extension("new");
        std::fs::write(&aside, script).expect("write the script");
        std::fs::set_permissions(&aside, std::fs::Permissions::from_mode(0o755))
            .expect("make the script executable");
        std::fs::rename(&aside, &self.path).expect("rename over the binary");
    }

    fn path(&self) -> &str {
        self.path.to_str().expect("utf-8 path")
    }

    /// The device and inode the path names now.
    fn identity(&self) -> (u64, u64) {
        let metadata = std::fs::metadata(&self.path).expect("the binary's metadata");
        (metadata.dev(), metadata.ino())
    }
}

/// `gateway serve` run from `binary` (a shell wrapper that execs it, so the pid is the
/// gateway's), ready to serve.
fn serve_from(binary: &Binary, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    let script = format!("shift; exec '{}' \"$@\"", binary.path());
    let (gateway, _) = gateway_serve_wrapped(&["sh", "-c", &script, "sh"], 0, extra, env);
    wait_ready(&gateway);
    gateway
}

fn livez(gateway: &Proc) -> serde_json::Value {
    let (status, body) = get(&gateway.url("/livez")).expect("livez answers");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("livez JSON")
}

fn vllm_pid(gateway: &Proc) -> i32 {
    livez(gateway)["pid"].as_i64().expect("vLLM's pid") as i32
}

fn exe_of(pid: i32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).expect("the gateway's exe link")
}

/// The device and inode of the file a process runs.
fn running_identity(pid: i32) -> (u64, u64) {
    let metadata = std::fs::metadata(format!("/proc/{pid}/exe")).expect("the exe's metadata");
    (metadata.dev(), metadata.ino())
}

/// One `/v1/responses` request on a connection of its own; the status, or what went wrong.
fn try_post(port: u16) -> Result<u16, String> {
    let mut stream =
        TcpStream::connect(("127.0.0.1", port)).map_err(|error| format!("connect: {error}"))?;
    stream
        .set_read_timeout(Some(DEADLINE))
        .map_err(|error| error.to_string())?;
    let request = format!(
        "POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{RESPONSES_JSON}",
        RESPONSES_JSON.len()
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|error| format!("write: {error}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|error| format!("read: {error}"))?;
    if raw.is_empty() {
        return Err("closed without an answer".into());
    }
    Ok(parse_response(&raw).status)
}

/// One request on a kept-alive connection, opened first if there is none; the connection is
/// dropped when the answer says `connection: close`, as an HTTP/1.1 client does.
fn try_post_kept_alive(port: u16, connection: &mut Option<TcpStream>) -> Result<u16, String> {
    if connection.is_none() {
        let stream =
            TcpStream::connect(("127.0.0.1", port)).map_err(|error| format!("connect: {error}"))?;
        stream
            .set_read_timeout(Some(DEADLINE))
            .map_err(|error| error.to_string())?;
        *connection = Some(stream);
    }
    let Some(stream) = connection.as_mut() else {
        unreachable!("connected above")
    };
    let request = format!(
        "POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{RESPONSES_JSON}",
        RESPONSES_JSON.len()
    );
    let answer = (|| {
        stream
            .write_all(request.as_bytes())
            .map_err(|error| format!("write: {error}"))?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                Ok(_) => return Err(format!("closed after {} bytes of the head", head.len())),
                Err(error) => return Err(format!("read: {error}")),
            }
        }
        let response = parse_response(&head);
        let length: usize = response
            .header("content-length")
            .and_then(|length| length.parse().ok())
            .ok_or("no content-length")?;
        let mut body = vec![0u8; length];
        stream
            .read_exact(&mut body)
            .map_err(|error| format!("read the body: {error}"))?;
        Ok(response)
    })();
    match answer {
        Ok(response) => {
            if response.header("connection") == Some("close") {
                *connection = None;
            }
            Ok(response.status)
        }
        Err(error) => {
            *connection = None;
            Err(error)
        }
    }
}

/// Clients that send requests one after another until stopped, each on a new connection, or
/// each on its connection kept alive.
struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    clients: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(port: u16, clients: usize) -> Self {
        Self::start_with(port, clients, false)
    }

    fn start_with(port: u16, clients: usize, keep_alive: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let clients = (0..clients)
            .map(|_| {
                let stop = Arc::clone(&stop);
                let answered = Arc::clone(&answered);
                std::thread::spawn(move || {
                    let mut failures = Vec::new();
                    let mut connection = None;
                    while !stop.load(Ordering::SeqCst) {
                        let answer = if keep_alive {
                            try_post_kept_alive(port, &mut connection)
                        } else {
                            try_post(port)
                        };
                        match answer {
                            Ok(200) => {}
                            Ok(status) => failures.push(format!("status {status}")),
                            Err(error) => failures.push(error),
                        }
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    failures
                })
            })
            .collect();
        Load {
            stop,
            answered,
            clients,
        }
    }

    /// Waits until `more` further requests have been answered.
    fn wait_for(&self, more: usize) {
        let target = self.answered.load(Ordering::SeqCst) + more;
        wait_until("the clients' requests", DEADLINE, || {
            self.answered.load(Ordering::SeqCst) >= target
        });
    }

    /// Stops the clients; returns every failure they saw.
    fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.clients
            .into_iter()
            .flat_map(|client| client.join().expect("client thread"))
            .collect()
    }
}

/// Waits until the gateway has run the new image for a while: it says so, and serves.
fn wait_upgraded(gateway: &Proc) {
    wait_until("the new image to take over", DEADLINE, || {
        !lines_with_message(
            gateway,
            "upgraded in place: took over the listening socket and vLLM from the previous image",
        )
        .is_empty()
    });
    wait_ready(gateway);
}

/// The threads of a process by name, each with whether it blocks every signal the gateway
/// handles (`Some(true)`), none of them (`Some(false)`), or only some (`None`).
fn signal_masks(pid: i32) -> Vec<(String, Option<bool>)> {
    let handled = [
        Signal::SIGHUP,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGTERM,
    ]
    .iter()
    .fold(0u64, |mask, signal| mask | 1 << (*signal as i32 - 1));
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the gateway's threads");
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("status")).ok())
        .map(|status| {
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix(name))
                    .map(str::trim)
                    .unwrap_or_default()
                    .to_owned()
            };
            let blocked = u64::from_str_radix(&field("SigBlk:"), 16).expect("a hex mask") & handled;
            let blocks = match blocked {
                0 => Some(false),
                all if all == handled => Some(true),
                _ => None,
            };
            (field("Name:"), blocks)
        })
        .collect()
}

/// Every thread of the gateway blocks the signals it handles but the one that takes them.
fn assert_one_thread_takes_the_signals(gateway: &Proc) {
    let threads = signal_masks(gateway.pid());
    let takers: Vec<_> = threads
        .iter()
        .filter(|(_, blocks)| *blocks != Some(true))
        .collect();
    assert_eq!(
        takers,
        [&("gateway-signals".to_owned(), Some(false))],
        "threads: {threads:?}"
    );
    assert!(
        threads.len() > 3,
        "the runtime's and the workers' threads too: {threads:?}"
    );
}

#[test]
fn livez_names_the_version_of_the_running_binary() {
    let binary = Binary::copy();
    let gateway = serve_from(&binary, &[], &[]);
    assert_eq!(
        livez(&gateway)["version"].as_str(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(exe_of(gateway.pid()), Path::new(binary.path()));
}

#[test]
fn an_upgrade_under_load_refuses_no_connection_keeps_vllm_and_runs_the_new_binary() {
    let systemd = Systemd::listen(false);
    let binary = Binary::copy();
    let gateway = serve_from(
        &binary,
        &["--drain-timeout", "1s"],
        &[
            ("NOTIFY_SOCKET", &systemd.socket_env),
            // Streams send three events, then stall: the one below is still running when the
            // drain times out.
            ("MOCK_VLLM_STALL_MID_STREAM", "3"),
        ],
    );
    systemd.set_proxy_port(gateway.port);
    systemd.wait_count("READY=1", 1);
    let vllm = vllm_pid(&gateway);
    let stream = start_stream(&gateway);
    let load = Load::start(gateway.port, 4);
    load.wait_for(20);

    binary.replace();
    let new_binary = binary.identity();
    gateway.signal(Signal::SIGHUP);
    wait_upgraded(&gateway);
    load.wait_for(50);
    let failures = load.stop();

    assert!(failures.is_empty(), "clients saw failures: {failures:?}");
    let cut = stream.join().expect("stream thread");
    assert_eq!(cut.status, 200);
    let body = String::from_utf8_lossy(&cut.body);
    assert!(
        body.contains("event: error") && body.contains("\"code\":\"drain_timeout\""),
        "the stream still running at drain_timeout ends with the error event: {body}"
    );
    // And its access line says so (it blamed the client).
    let id = cut.header("x-request-id").expect("the stream's request id");
    let lines = lines_with_message(&gateway, "request finished");
    let line = lines
        .iter()
        .find(|line| line["request_id"] == id)
        .expect("the stream's access line");
    assert_eq!(line["error"], "drain_timeout", "{line}");
    assert_eq!(
        running_identity(gateway.pid()),
        new_binary,
        "the gateway runs the new file"
    );
    assert_eq!(exe_of(gateway.pid()), Path::new(binary.path()));
    assert_eq!(vllm_pid(&gateway), vllm, "vLLM was not restarted");
    assert!(alive(vllm));
    assert_eq!(
        proc_stat(vllm).map(|(_, parent)| parent),
        Some(gateway.pid()),
        "vLLM is still the gateway's child"
    );

    let messages = systemd.messages();
    let reloading = systemd
        .position(|message| message == "RELOADING=1")
        .expect("RELOADING=1");
    assert!(
        messages[reloading + 1].starts_with("MONOTONIC_USEC="),
        "{messages:?}"
    );
    let ready_again = messages[reloading..]
        .iter()
        .position(|message| message == "READY=1")
        .expect("READY=1 after RELOADING=1");
    assert!(ready_again > 1, "{messages:?}");
    assert!(
        !messages
            .iter()
            .any(|message| message.starts_with("STOPPING=1")),
        "an upgrade is not a stop: {messages:?}"
    );
}

/// Regression: the drain closed a kept-alive connection at once when it was between two
/// requests, and a client that sent its next one just then lost it (a reset, or the connection
/// closed without an answer): in a loop, a few requests an upgrade. Such a connection is now
/// given its next request, answered with `connection: close`.
#[test]
fn an_upgrade_fails_no_request_of_clients_that_keep_their_connections_alive() {
    let binary = Binary::copy();
    let gateway = serve_from(&binary, &[], &[]);
    wait_ready(&gateway);
    let load = Load::start_with(gateway.port, 4, true);
    load.wait_for(200);

    binary.replace();
    gateway.signal(Signal::SIGHUP);
    wait_upgraded(&gateway);
    load.wait_for(200);
    let failures = load.stop();
    assert!(failures.is_empty(), "clients saw failures: {failures:?}");
}

#[test]
fn a_refused_hand_over_keeps_vllm_alive_and_the_gateway_serving() {
    let binary = Binary::copy();
    let gateway = serve_from(&binary, &[], &[]);
    let vllm = vllm_pid(&gateway);

    // A new binary that reads another version of the description than the old one writes.
    binary.replace_with_script(&format!(
        "#!/bin/sh\n\
         if [ -n \"$GATEWAY_HANDOVER\" ]; then\n\
         GATEWAY_HANDOVER=$(printf '%s' \"$GATEWAY_HANDOVER\" | sed 's/\"version\":1,/\"version\":99,/')\n\
         export GATEWAY_HANDOVER\n\
         fi\n\
         exec '{GATEWAY}' \"$@\"\n"
    ));
    gateway.signal(Signal::SIGHUP);
    wait_until("the refusal to be logged", DEADLINE, || {
        !lines_with_message(
            &gateway,
            "refused the previous image's hand-over; serving with what could still be taken (vLLM, if adopted, is probed as if loading)",
        )
        .is_empty()
    });
    wait_ready(&gateway);

    assert_eq!(
        exe_of(gateway.pid()),
        Path::new(GATEWAY),
        "the new image runs"
    );
    assert_eq!(vllm_pid(&gateway), vllm, "vLLM was adopted, not restarted");
    assert!(alive(vllm));
    let response = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
    assert_eq!(response.status, 200);
    // vLLM's output still reaches the log: its pipes were taken over too.
    wait_until("vLLM's access line for the request", DEADLINE, || {
        gateway.log_text().lines().any(|line| {
            serde_json::from_str::<serde_json::Value>(line).is_ok_and(|line| {
                line["target"] == "vllm"
                    && line["pid"].as_i64() == Some(i64::from(vllm))
                    && line["message"]
                        .as_str()
                        .is_some_and(|message| message.contains("POST /v1/responses"))
            })
        })
    });
}

#[test]
fn a_new_binary_that_cannot_start_leaves_the_running_image_serving() {
    let systemd = Systemd::listen(false);
    let binary = Binary::copy();
    let gateway = serve_from(&binary, &[], &[("NOTIFY_SOCKET", &systemd.socket_env)]);
    systemd.set_proxy_port(gateway.port);
    systemd.wait_count("READY=1", 1);
    let vllm = vllm_pid(&gateway);

    binary.replace_with_script("#!/bin/sh\necho 'missing library: libfuture.so' >&2\nexit 127\n");
    gateway.signal(Signal::SIGHUP);
    systemd.wait_count("READY=1", 2);

    let refusals = lines_with_message(
        &gateway,
        "not upgrading in place; this binary keeps serving, and the configuration is reloaded",
    );
    assert_eq!(refusals.len(), 1, "{}", gateway.log_text());
    let reason = refusals[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("missing library: libfuture.so"),
        "the reason quotes the new binary: {reason}"
    );
    assert!(
        exe_of(gateway.pid())
            .to_string_lossy()
            .ends_with(" (deleted)"),
        "the old image still runs"
    );
    assert_eq!(vllm_pid(&gateway), vllm);
    assert!(ready(&gateway));
    assert_eq!(
        post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "").status,
        200
    );
}

/// The inode of the socket listening on loopback `port`, from /proc/net/tcp.
fn listening_socket(port: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // local address, remote address, state (0A: LISTEN), ..., inode
        (fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A"))
            .then(|| fields.get(9).map(|inode| inode.to_string()))
            .flatten()
    })
}

#[test]
fn the_health_port_is_handed_over_and_answers_all_through_an_upgrade() {
    let binary = Binary::copy();
    let mut gateway = serve_from(&binary, &["--health-port", "0"], &[]);
    let health = gateway.expect_report("the health port", reported_health_port);
    let socket = listening_socket(health).expect("the health port listens");
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let prober = {
        let (stop, answered) = (Arc::clone(&stop), Arc::clone(&answered));
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match get(&format!("http://127.0.0.1:{health}/livez")) {
                    Some((200, _)) => {}
                    other => failures.push(format!("{other:?}")),
                }
                answered.fetch_add(1, Ordering::SeqCst);
            }
            failures
        })
    };
    wait_until("probes", DEADLINE, || answered.load(Ordering::SeqCst) >= 10);

    binary.replace();
    gateway.signal(Signal::SIGHUP);
    wait_upgraded(&gateway);
    let after = answered.load(Ordering::SeqCst);
    wait_until("probes to the new image", DEADLINE, || {
        answered.load(Ordering::SeqCst) >= after + 10
    });
    stop.store(true, Ordering::SeqCst);
    let failures = prober.join().expect("prober thread");

    assert!(failures.is_empty(), "probes failed: {failures:?}");
    assert_eq!(
        listening_socket(health),
        Some(socket),
        "the new image serves the same socket"
    );
    assert!(
        lines_with_message(
            &gateway,
            "health listener open: /livez, /readyz, /health, /metrics"
        )
        .len()
            >= 2,
        "the new image serves it"
    );
}

/// An upgrade never costs vLLM, not even when the configuration it starts with asks for a health
/// port that something else holds: the new image serves without it.
#[test]
fn a_health_port_in_use_after_an_upgrade_leaves_the_gateway_serving_without_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, "").expect("write the config");
    let binary = Binary::copy();
    let gateway = serve_from(&binary, &["--config", config.to_str().expect("utf-8")], &[]);
    let vllm = vllm_pid(&gateway);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = taken.local_addr().expect("address").port();
    std::fs::write(&config, format!("health_port = {busy}\n")).expect("write the config");

    binary.replace();
    gateway.signal(Signal::SIGHUP);
    wait_upgraded(&gateway);

    assert_eq!(vllm_pid(&gateway), vllm, "vLLM was not restarted");
    assert!(alive(vllm));
    assert!(
        gateway.log_text().contains(&format!(
            "the health listener (`health_port`): cannot listen on 127.0.0.1:{busy}"
        )),
        "{}",
        gateway.log_text()
    );
    drop(taken);
}

#[test]
fn sighup_with_the_binary_unchanged_only_reloads_the_configuration() {
    let binary = Binary::copy();
    let gateway = serve_from(&binary, &[], &[]);
    let vllm = vllm_pid(&gateway);
    let before = running_identity(gateway.pid());

    gateway.signal(Signal::SIGHUP);
    wait_until("the reload to be logged", DEADLINE, || {
        !lines_with_message(&gateway, "configuration reloaded").is_empty()
    });

    assert!(
        lines_with_message(
            &gateway,
            "the gateway's binary was replaced; trying the new one before upgrading in place"
        )
        .is_empty()
    );
    assert_eq!(running_identity(gateway.pid()), before);
    assert_eq!(vllm_pid(&gateway), vllm);
    assert!(ready(&gateway));
}

/// Regression: a key rotation in the file (vLLM's `--api-key` and `upstream_api_key` together)
/// waits for a restart, as the reload says; but a later upgrade's new image read the new upstream
/// key and sent it to the vLLM still running with the old one, and every request got 401. Such
/// an upgrade is now refused, and the running image keeps serving with the key in force.
#[test]
fn an_upgrade_is_refused_while_a_changed_upstream_key_waits_for_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("gateway.toml");
    let write = |key: &str| {
        let aside = config.with_extension("next");
        std::fs::write(
            &aside,
            format!("upstream_api_key = \"{key}\"\nvllm_args = [\"--api-key\", \"{key}\"]\n"),
        )
        .expect("write config");
        std::fs::rename(&aside, &config).expect("replace config");
    };
    write("sk-old");
    let binary = Binary::copy();
    let gateway = serve_from(&binary, &["--config", config.to_str().expect("utf-8")], &[]);
    let vllm = vllm_pid(&gateway);
    let before = running_identity(gateway.pid());
    let status = || post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "").status;
    assert_eq!(status(), 200);

    write("sk-new");
    binary.replace();
    gateway.signal(Signal::SIGHUP);
    wait_until("the upgrade to be refused", DEADLINE, || {
        lines_with_message(
            &gateway,
            "not upgrading in place; this binary keeps serving, and the configuration is reloaded",
        )
        .iter()
        .any(|line| {
            line["reason"]
                .as_str()
                .is_some_and(|reason| reason.contains("`upstream_api_key` has changed"))
        })
    });
    assert_eq!(
        running_identity(gateway.pid()),
        before,
        "the old image runs"
    );
    assert_eq!(vllm_pid(&gateway), vllm);
    assert_eq!(status(), 200, "the key in force still reaches vLLM");
    assert!(!gateway.log_text().contains("sk-new"), "no key in the log");
}

#[test]
fn a_vllm_started_by_the_new_image_stops_at_the_first_sigterm() {
    let binary = Binary::copy();
    let mut gateway = serve_from(&binary, &[], &[]);
    binary.replace();
    gateway.signal(Signal::SIGHUP);
    wait_upgraded(&gateway);
    let adopted = vllm_pid(&gateway);
    // The new image starts the next vLLM itself, from threads that began with signals blocked.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(adopted), Signal::SIGKILL)
        .expect("kill vLLM");
    wait_until("a new vLLM to serve", DEADLINE, || {
        let serving = livez(&gateway)["pid"].as_i64();
        ready(&gateway) && serving.is_some_and(|pid| pid != i64::from(adopted))
    });
    let restarted = vllm_pid(&gateway);

    gateway.signal(Signal::SIGTERM);
    let status = gateway.wait_exit(DEADLINE);

    assert!(status.success(), "{status:?}\n{}", gateway.log_text());
    assert!(
        lines_with_message(
            &gateway,
            "vLLM did not stop in time; sending SIGKILL to its group"
        )
        .is_empty(),
        "vLLM stopped at SIGTERM: {}",
        gateway.log_text()
    );
    assert!(!alive(restarted));
}

#[test]
fn only_one_thread_takes_signals_so_an_upgrade_can_hold_them_for_the_new_image() {
    let binary = Binary::copy();
    let mut gateway = serve_from(&binary, &[], &[]);
    assert_one_thread_takes_the_signals(&gateway);

    binary.replace();
    gateway.signal(Signal::SIGHUP);
    wait_upgraded(&gateway);
    // The new image started with them blocked (the old one's mask across the exec).
    assert_one_thread_takes_the_signals(&gateway);
    gateway.signal(Signal::SIGTERM);
    let status = gateway.wait_exit(DEADLINE);
    assert!(status.success(), "{status:?}\n{}", gateway.log_text());
}

#[test]
fn requests_still_waiting_when_an_upgrades_drain_times_out_get_a_503_answer() {
    let binary = Binary::copy();
    let gateway = serve_from(
        &binary,
        &["--drain-timeout", "1s", "--max-concurrent-requests", "1"],
        // vLLM takes its time over every answer: the first request holds the one turn, the
        // second waits for it.
        &[("MOCK_VLLM_HEADERS_DELAY", "1h")],
    );
    let port = gateway.port;
    let in_flight =
        std::thread::spawn(move || post_json(port, "/v1/responses", RESPONSES_JSON, ""));
    wait_until("the first request to reach vLLM", DEADLINE, || {
        get(&gateway.url("/metrics"))
            .is_some_and(|(_, body)| body.contains("\ngateway_requests_in_flight 1\n"))
    });
    let queued = std::thread::spawn(move || post_json(port, "/v1/responses", RESPONSES_JSON, ""));
    wait_until("the second request to queue", DEADLINE, || {
        get(&gateway.url("/metrics"))
            .is_some_and(|(_, body)| body.contains("\ngateway_queue_depth 1\n"))
    });

    binary.replace();
    gateway.signal(Signal::SIGHUP);
    let in_flight = in_flight.join().expect("first request");
    let queued = queued.join().expect("second request");
    wait_upgraded(&gateway);

    assert_eq!(in_flight.status, 503);
    assert_eq!(in_flight.json()["error"]["code"], "drain_timeout");
    assert_eq!(queued.status, 503);
    assert_eq!(queued.json()["error"]["code"], "drain_timeout");
}
