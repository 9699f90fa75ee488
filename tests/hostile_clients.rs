//! Careless and hostile clients, end to end: slow heads, idle connections, clients that stop
//! reading, huge heads and connection floods against the real gateway binary. None of them may
//! hold the gateway (or vLLM's generation) for long, and none may cost vLLM its life.
//!
//! The timeouts are set through their `GATEWAY_*` variables.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

/// Connects to the gateway with a read deadline, so that a connection the gateway keeps open
/// fails the test instead of hanging it.
fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stream
}

/// What the peer did once we stopped sending: the bytes it sent, and whether it then closed the
/// connection (end of stream or reset) rather than leaving it open past the read deadline.
fn read_until_closed(stream: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut received = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return (received, true),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(error) if error.kind() == ErrorKind::ConnectionReset => return (received, true),
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return (received, false);
            }
            Err(error) => panic!("reading from the gateway: {error}"),
        }
    }
}

/// `gateway_client_timeouts_total{kind}` from the gateway's /metrics.
fn client_timeouts(gateway: &Proc, kind: &str) -> u64 {
    let (_, metrics) = get(&gateway.url("/metrics")).expect("metrics");
    let series = format!("gateway_client_timeouts_total{{kind=\"{kind}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0, |value| value.trim().parse().expect("a count"))
}

fn livez_request() -> &'static [u8] {
    b"GET /livez HTTP/1.1\r\nHost: gateway\r\n\r\n"
}

#[test]
fn a_client_that_sends_half_its_headers_gets_408_and_is_closed() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(
        mock.port,
        &[],
        &[("GATEWAY_CLIENT_HEADER_TIMEOUT", "500ms")],
    );
    let mut stream = connect(gateway.port);
    stream
        .write_all(b"GET /livez HTTP/1.1\r\nHost: gateway\r\n")
        .expect("write half a head");
    let (received, closed) = read_until_closed(&mut stream);
    assert!(closed, "the connection is still open");
    assert_eq!(
        parse_response(&received).status,
        408,
        "{}",
        String::from_utf8_lossy(&received)
    );
    assert_eq!(client_timeouts(&gateway, "header"), 1);
}

#[test]
fn headers_trickled_a_byte_at_a_time_are_cut_off_at_the_header_timeout() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(
        mock.port,
        &[],
        &[("GATEWAY_CLIENT_HEADER_TIMEOUT", "500ms")],
    );
    let mut stream = connect(gateway.port);
    stream
        .write_all(b"GET /livez HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")
        .expect("write the start of a head");
    // A byte every 50 ms keeps every single read short; only a deadline on the whole head ends it.
    let mut writer = stream.try_clone().expect("clone the socket");
    let trickle = std::thread::spawn(move || {
        for _ in 0..400 {
            if writer.write_all(b"a").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let (received, closed) = read_until_closed(&mut stream);
    assert!(closed, "the connection is still open");
    // The writer may still send a byte after the gateway closed, which resets the connection and
    // can swallow the 408; whatever did arrive must be that 408.
    if !received.is_empty() {
        assert_eq!(parse_response(&received).status, 408);
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    trickle.join().expect("trickle thread");
}

#[test]
fn an_idle_kept_alive_connection_is_closed_at_the_idle_timeout() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &[], &[("GATEWAY_CLIENT_IDLE_TIMEOUT", "2s")]);
    let mut stream = connect(gateway.port);
    // Two requests in a row: the connection is kept alive between them (2 s leaves a busy machine
    // time to send the second).
    for _ in 0..2 {
        stream.write_all(livez_request()).expect("write a request");
        assert_eq!(read_response(&mut stream).status, 200);
    }
    // Then idle: closed long before the 10 s read deadline (and the 30 s header timeout).
    let (received, closed) = read_until_closed(&mut stream);
    assert!(closed, "the idle connection is still open");
    assert!(
        received.is_empty(),
        "an idle connection was sent {}",
        String::from_utf8_lossy(&received)
    );
    assert_eq!(client_timeouts(&gateway, "idle"), 1);
    assert_eq!(client_timeouts(&gateway, "header"), 0);
}

#[test]
fn a_kept_alive_connection_may_idle_longer_than_the_header_timeout() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(
        mock.port,
        &[],
        &[
            ("GATEWAY_CLIENT_HEADER_TIMEOUT", "500ms"),
            ("GATEWAY_CLIENT_IDLE_TIMEOUT", "60s"),
        ],
    );
    let mut kept = connect(gateway.port);
    kept.write_all(livez_request()).expect("write a request");
    assert_eq!(read_response(&mut kept).status, 200);
    // A connection opened after the kept one went idle, sending nothing, is closed at the header
    // timeout: by then the kept connection has been idle at least as long.
    let mut silent = connect(gateway.port);
    let (_, closed) = read_until_closed(&mut silent);
    assert!(closed, "a connection that sent nothing is still open");
    kept.write_all(livez_request())
        .expect("write a second request");
    assert_eq!(read_response(&mut kept).status, 200);
}

#[test]
fn a_request_head_over_64_kib_gets_431() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &[], &[]);
    // Just under the bound passes.
    let mut stream = connect(gateway.port);
    let big = "a".repeat(60 * 1024);
    write!(
        stream,
        "GET /livez HTTP/1.1\r\nHost: gateway\r\nX-Big: {big}\r\n\r\n"
    )
    .expect("write a 60 KiB head");
    assert_eq!(read_response(&mut stream).status, 200);
    // Exactly 64 KiB of a head that has not ended yet: the gateway reads all of it (so that
    // closing does not reset the connection) and refuses.
    let mut stream = connect(gateway.port);
    let start = "GET /livez HTTP/1.1\r\nHost: gateway\r\nX-Big: ";
    let head = format!("{start}{}", "a".repeat(64 * 1024 - start.len()));
    stream.write_all(head.as_bytes()).expect("write 64 KiB");
    let (received, closed) = read_until_closed(&mut stream);
    assert!(closed, "the connection is still open");
    assert_eq!(
        parse_response(&received).status,
        431,
        "{}",
        String::from_utf8_lossy(&received)
    );
}

/// A stand-in for vLLM that answers `/health` and streams events without end (mock-vllm's streams
/// are short enough to vanish into socket buffers). Sends on the channel, once per stream, when the
/// gateway dropped it: its write failed because the gateway closed the connection.
fn endless_upstream() -> (u16, mpsc::Receiver<std::io::Error>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let (dropped_tx, dropped) = mpsc::channel();
    std::thread::spawn(move || {
        for connection in listener.incoming() {
            let Ok(mut connection) = connection else {
                continue;
            };
            let dropped_tx = dropped_tx.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match connection.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                if head.starts_with(b"GET /health ") {
                    let _ = connection.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    );
                    return;
                }
                let event = format!("data: {}\n\n", "x".repeat(16 * 1024));
                let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                let _ = connection.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
                );
                loop {
                    if let Err(error) = connection.write_all(chunk.as_bytes()) {
                        let _ = dropped_tx.send(error);
                        return;
                    }
                }
            });
        }
    });
    (port, dropped)
}

/// A client that sends a streaming request `body` and reads nothing, with a small receive buffer:
/// its window closes and stays closed.
fn stalled_stream_client(port: u16, body: &str) -> TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    socket.connect(&address.into()).expect("connect");
    let mut client: TcpStream = socket.into();
    write!(
        client,
        "POST /v1/responses HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write the request");
    client
}

#[test]
fn a_client_that_stops_reading_a_stream_is_cut_off_and_the_upstream_request_dropped() {
    let (upstream_port, dropped) = endless_upstream();
    let gateway = gateway(
        upstream_port,
        &[],
        &[("GATEWAY_CLIENT_SEND_TIMEOUT", "500ms")],
    );
    wait_until("the upstream to be healthy", DEADLINE, || {
        get(&gateway.url("/readyz")).is_some_and(|(status, _)| status == 200)
    });
    let mut client =
        stalled_stream_client(gateway.port, r#"{"model":"m","input":"hi","stream":true}"#);
    let error = dropped
        .recv_timeout(DEADLINE)
        .expect("the upstream stream was never dropped");
    assert!(
        matches!(
            error.kind(),
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset
        ),
        "{error}"
    );
    // The client's connection is gone too.
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let (_, closed) = read_until_closed(&mut client);
    assert!(closed, "the stalled client's connection is still open");
    wait_until("the access log to blame the client", DEADLINE, || {
        gateway.log_text().contains("client_disconnect")
    });
    assert_eq!(client_timeouts(&gateway, "send"), 1);
}

/// Regression: the send deadline started only once the kernel refused a write, and the kernel's
/// send buffer grows to megabytes, so a stream of a few dozen kilobytes (most generations) went
/// whole into it for a client that read nothing, and vLLM generated it to its end. Here mock-vllm
/// sends 130 events (about 29 KB) and then nothing: the client must be cut off at the send
/// timeout, and vLLM see the disconnect.
#[test]
fn a_client_that_stops_reading_is_cut_off_before_the_kernel_takes_the_whole_stream() {
    let mock = mock_vllm(&[("MOCK_VLLM_STALL_MID_STREAM", "130")]);
    let gateway = gateway(mock.port, &[], &[("GATEWAY_CLIENT_SEND_TIMEOUT", "500ms")]);
    let _client = stalled_stream_client(gateway.port, RESPONSES_STREAM);
    wait_until("the client to be cut off", DEADLINE, || {
        client_timeouts(&gateway, "send") == 1
    });
    wait_until("vLLM to see the disconnect", DEADLINE, || {
        let (_, stats) = get(&mock.url("/_mock/stats")).expect("stats");
        serde_json::from_str::<serde_json::Value>(&stats).expect("JSON")["disconnects"] == 1
    });
}

#[test]
fn a_slow_model_is_not_mistaken_for_a_slow_client() {
    // vLLM takes longer to answer than every client timeout, and the client reads as it should.
    let mock = mock_vllm(&[("MOCK_VLLM_HEADERS_DELAY", "1500ms")]);
    let gateway = gateway(
        mock.port,
        &[],
        &[
            ("GATEWAY_CLIENT_HEADER_TIMEOUT", "300ms"),
            ("GATEWAY_CLIENT_IDLE_TIMEOUT", "300ms"),
            ("GATEWAY_CLIENT_SEND_TIMEOUT", "300ms"),
        ],
    );
    let response = post_json(gateway.port, "/v1/responses", RESPONSES_STREAM, "");
    assert_eq!(response.status, 200);
    assert_eq!(
        response.body,
        fixture("vllm-responses-stream-gpt-oss-20b.sse")
    );
}

/// How many `/health` probes vLLM (mock-vllm, whose access log the gateway relays) has answered.
fn probes_answered(gateway: &Proc) -> usize {
    gateway
        .log_text()
        .matches("GET /health HTTP/1.1\\\" 200")
        .count()
}

fn vllm_pid(gateway: &Proc) -> u64 {
    let (status, body) = get(&gateway.url("/livez")).expect("livez answers");
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).expect("livez JSON");
    report["pid"].as_u64().expect("a child pid")
}

#[test]
fn a_connection_flood_past_the_open_files_limit_leaves_vllm_alone_and_the_gateway_serving() {
    const OPEN_FILES: usize = 256;
    let (gateway, _) = gateway_serve_wrapped(
        &[
            "prlimit",
            &format!("--nofile={OPEN_FILES}:{OPEN_FILES}"),
            "--",
        ],
        0,
        &["--health-interval", "100ms"],
        // vLLM's access lines for the probe are logged at debug.
        &[("RUST_LOG", "info,vllm=debug")],
    );
    wait_ready(&gateway);
    let pid = vllm_pid(&gateway);

    // More idle connections than the gateway has descriptors, as far as the listen backlog takes
    // them (a connection it has no room for is not answered at all).
    let address: SocketAddr = ([127, 0, 0, 1], gateway.port).into();
    let flood: Vec<TcpStream> = (0..OPEN_FILES * 2)
        .map_while(|_| TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok())
        .collect();
    assert!(!flood.is_empty(), "no flood connection got through");
    // It has filled what the gateway accepts: its connection limit, or (without one) its
    // descriptors.
    wait_until("the flood to reach the gateway's limit", DEADLINE, || {
        let log = gateway.log_text();
        log.contains("at max_connections") || log.contains("Too many open files")
    });
    // While it lasts, vLLM's health probe goes on succeeding.
    let before = probes_answered(&gateway);
    wait_until("ten probes answered during the flood", DEADLINE, || {
        probes_answered(&gateway) >= before + 10
    });
    drop(flood);

    wait_until("the gateway to serve again", DEADLINE, || {
        get(&gateway.url("/readyz")).is_some_and(|(status, _)| status == 200)
    });
    let response = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
    assert_eq!(response.status, 200);
    assert_eq!(vllm_pid(&gateway), pid, "vLLM was restarted");
    let log = gateway.log_text();
    assert!(
        !log.contains("Too many open files"),
        "the gateway ran out of descriptors:\n{log}"
    );
}

/// How many connections wait in the accept queue of the socket listening on `port` (for a
/// listening socket, /proc/net/tcp's rx_queue is that count).
fn accept_queue(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (_, local_port) = fields.get(1)?.split_once(':')?;
        let listening = *fields.get(3)? == "0A";
        if !listening || u16::from_str_radix(local_port, 16).ok()? != port {
            return None;
        }
        let (_, queued) = fields.get(4)?.split_once(':')?;
        u64::from_str_radix(queued, 16).ok()
    })
}

#[test]
fn past_max_connections_a_new_connection_waits_until_one_closes() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &[], &[("GATEWAY_MAX_CONNECTIONS", "2")]);
    let mut first = connect(gateway.port);
    let mut second = connect(gateway.port);
    wait_until("both connections to be accepted", DEADLINE, || {
        accept_queue(gateway.port) == Some(0)
    });
    let mut third = connect(gateway.port);
    third.write_all(livez_request()).expect("write a request");
    // The gateway goes on serving the two it holds, while the third waits, unaccepted.
    for stream in [&mut first, &mut second] {
        stream.write_all(livez_request()).expect("write a request");
        assert_eq!(read_response(stream).status, 200);
    }
    assert_eq!(
        accept_queue(gateway.port),
        Some(1),
        "the third was accepted"
    );
    drop(first);
    assert_eq!(read_response(&mut third).status, 200);
}
