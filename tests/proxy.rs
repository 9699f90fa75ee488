//! The standalone proxy, end to end: the real gateway binary in front of a real mock-vllm process.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::*;

fn mock_stats(mock: &Proc) -> serde_json::Value {
    let (_, body) = get(&mock.url("/_mock/stats")).expect("mock stats");
    serde_json::from_str(&body).expect("stats JSON")
}

fn last_request(mock: &Proc) -> serde_json::Value {
    let (_, body) = get(&mock.url("/_mock/last-request")).expect("last request");
    serde_json::from_str(&body).expect("last-request JSON")
}

/// Opens a stream request and returns the socket, positioned after the response headers.
fn open_stream(port: u16) -> (BufReader<TcpStream>, Vec<String>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(
        stream,
        "POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{RESPONSES_STREAM}",
        RESPONSES_STREAM.len()
    )
    .expect("write");
    let mut reader = BufReader::new(stream);
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("read header line");
        if line == "\r\n" || line.is_empty() {
            break;
        }
        head.push(line.trim_end().to_string());
    }
    (reader, head)
}

/// Reads chunked-encoded body data until `done` says enough.
fn read_chunks_until(
    reader: &mut BufReader<TcpStream>,
    mut done: impl FnMut(&[u8]) -> bool,
) -> Vec<u8> {
    let mut body = Vec::new();
    while !done(&body) {
        let mut size_line = String::new();
        reader.read_line(&mut size_line).expect("chunk size");
        let size = usize::from_str_radix(size_line.trim(), 16).expect("hex chunk size");
        if size == 0 {
            break;
        }
        let mut chunk = vec![0; size + 2];
        reader.read_exact(&mut chunk).expect("chunk");
        body.extend_from_slice(&chunk[..size]);
    }
    body
}

fn event_count(body: &[u8]) -> usize {
    String::from_utf8_lossy(body).matches("\n\n").count()
}

#[test]
fn non_streaming_responses_pass_through_byte_for_byte() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &[], &[]);
    let response = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(
        response.body,
        fixture("vllm-responses-toolcall-gpt-oss-20b.json")
    );
}

#[test]
fn streaming_responses_pass_through_byte_for_byte_in_event_order() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &[], &[]);
    let response = post_json(gateway.port, "/v1/responses", RESPONSES_STREAM, "");
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    assert_eq!(response.header("x-accel-buffering"), Some("no"));
    assert_eq!(
        response.body,
        fixture("vllm-responses-stream-gpt-oss-20b.sse")
    );
    let text = String::from_utf8(response.body).expect("utf-8");
    let sequence: Vec<u64> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| {
            serde_json::from_str::<serde_json::Value>(data).expect("event JSON")["sequence_number"]
                .as_u64()
                .expect("seq")
        })
        .collect();
    assert_eq!(
        sequence,
        (0..sequence.len() as u64).collect::<Vec<_>>(),
        "events in order, none lost"
    );
}

#[test]
fn each_stream_chunk_is_forwarded_before_the_next_is_produced() {
    // The upstream sends three events, then nothing more: a buffering proxy would hold them.
    let mock = mock_vllm(&[("MOCK_VLLM_STALL_MID_STREAM", "3")]);
    let gateway = gateway(mock.port, &[], &[]);
    let (mut reader, head) = open_stream(gateway.port);
    assert!(head[0].contains("200"), "{head:?}");
    let body = read_chunks_until(&mut reader, |body| event_count(body) >= 3);
    let expected = fixture("vllm-responses-stream-gpt-oss-20b.sse");
    assert_eq!(
        body,
        expected[..body.len()],
        "the first three events, unchanged"
    );
}

#[test]
fn hop_by_hop_request_headers_are_removed_and_others_kept() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &[], &[]);
    let head = "POST /v1/responses?trace=1 HTTP/1.1\r\nContent-Type: application/json\r\nConnection: keep-alive, X-Hop-Nominated\r\nX-Hop-Nominated: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic Zm9v\r\nProxy-Connection: keep-alive\r\nX-Custom-Header: kept";
    let response = raw_request(gateway.port, head, RESPONSES_JSON.as_bytes());
    assert_eq!(response.status, 200);
    let seen = last_request(&mock);
    let headers = seen["headers"].as_object().expect("headers");
    for removed in [
        "x-hop-nominated",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(
            !headers.contains_key(removed),
            "{removed} reached the upstream: {headers:?}"
        );
    }
    assert_ne!(
        headers.get("connection").and_then(|v| v.as_str()),
        Some("keep-alive, X-Hop-Nominated")
    );
    assert_eq!(headers["x-custom-header"], "kept");
    assert_eq!(
        headers["host"],
        format!("127.0.0.1:{}", mock.port),
        "Host is rewritten for the upstream"
    );
    assert_eq!(seen["query"], "trace=1", "query strings are kept");
}

/// Regression: a `Content-Length` the client's `Connection` named was left out upstream like any
/// nominated header, and the body went after a head with no length: vLLM read it as a second
/// request, whose answer went to whichever request read that connection next (smuggling). The
/// body here is such a request; vLLM must see one POST with the whole body, small (sent whole) or
/// large (streamed).
#[test]
fn a_content_length_the_client_names_in_connection_still_frames_the_body_upstream() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &[], &[]);
    for padding in [0, 100 * 1024] {
        let body = format!(
            "GET /v1/smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: {padding}\r\n\r\n{}",
            " ".repeat(padding)
        );
        let head = "POST /v1/responses HTTP/1.1\r\nContent-Type: application/json\r\nConnection: Content-Length";
        let response = raw_request(gateway.port, head, body.as_bytes());
        assert_eq!(response.status, 400, "vLLM refuses the body as JSON");
        let seen = last_request(&mock);
        assert_eq!(seen["method"], "POST", "{seen}");
        assert_eq!(seen["path"], "/v1/responses", "{seen}");
        assert_eq!(seen["body_len"], body.len(), "{seen}");
        assert_eq!(seen["headers"]["content-length"], body.len().to_string());
    }
}

/// An upstream that answers each of its first four connections (the first may be the gateway's
/// health probe) with `answer`, whatever was asked.
fn upstream_answering(answer: String) -> (u16, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let handle = std::thread::spawn(move || {
        for stream in listener.incoming().take(4) {
            let Ok(mut stream) = stream else { continue };
            let mut buffer = [0u8; 4096];
            let _ = stream.read(&mut buffer);
            let _ = stream.write_all(answer.as_bytes());
        }
    });
    (port, handle)
}

/// An upstream that answers with hop-by-hop headers of its own.
fn upstream_with_hop_headers() -> (u16, std::thread::JoinHandle<()>) {
    let body = "{\"ok\":true}";
    upstream_answering(format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close, X-Upstream-Hop\r\nX-Upstream-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nX-Upstream-Custom: yes\r\n\r\n{body}",
        body.len()
    ))
}

#[test]
fn hop_by_hop_response_headers_are_removed_and_others_kept() {
    let (upstream_port, _upstream) = upstream_with_hop_headers();
    let gateway = gateway(upstream_port, &["--health-interval", "1h"], &[]);
    let response = post_json(gateway.port, "/v1/models", "", "");
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"{\"ok\":true}");
    assert_eq!(response.header("x-upstream-custom"), Some("yes"));
    assert_eq!(response.header("x-upstream-hop"), None);
    assert_eq!(response.header("keep-alive"), None);
    assert_eq!(response.header("proxy-connection"), None);
}

/// A length beside chunked coding is dropped (chunked wins, RFC 9112 section 6.3): the client got
/// vLLM's `content-length: 5` and the first five bytes of the body. Another transfer coding, which
/// the client could not be told of, is a 502; an HTTP/1.0 answer reaches it in HTTP/1.1.
#[test]
fn upstream_framing_and_version_never_reach_the_client_as_they_came() {
    let through = |answer: &str| {
        let (port, upstream) = upstream_answering(answer.into());
        (gateway(port, &["--health-interval", "1h"], &[]), upstream)
    };
    let (proxy, _upstream) = through(
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n",
    );
    let response = post_json(proxy.port, "/v1/models", "", "");
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"hello world");

    let (proxy, _upstream) = through(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    let response = post_json(proxy.port, "/v1/models", "", "");
    assert_eq!(response.status, 502);
    let error = &response.json()["error"];
    assert_eq!(error["code"], "upstream_unavailable");
    assert_eq!(
        error["message"],
        "the model server is unavailable: its response could not be read"
    );

    let (proxy, _upstream) = through("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}");
    let mut stream = TcpStream::connect(("127.0.0.1", proxy.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(stream, "GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut status_line = [0u8; 12];
    stream
        .read_exact(&mut status_line)
        .expect("the status line");
    assert_eq!(&status_line, b"HTTP/1.1 200");
}

#[test]
fn upstream_key_is_injected_when_the_client_sends_none() {
    let mock = mock_vllm(&[("VLLM_API_KEY", "sk-upstream")]);
    let gateway = gateway(mock.port, &[], &[("OPENAI_API_KEY", "sk-upstream")]);
    let response = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
    assert_eq!(response.status, 200);
    assert_eq!(
        last_request(&mock)["headers"]["authorization"],
        "Bearer sk-upstream"
    );
    assert!(
        !gateway.log_text().contains("sk-upstream"),
        "the key never reaches the log"
    );
}

#[test]
fn client_authorization_wins_over_injected_key() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &[], &[("VLLM_API_KEY", "sk-upstream")]);
    let response = post_json(
        gateway.port,
        "/v1/responses",
        RESPONSES_JSON,
        "\r\nAuthorization: Bearer sk-client",
    );
    assert_eq!(response.status, 200);
    assert_eq!(
        last_request(&mock)["headers"]["authorization"],
        "Bearer sk-client"
    );
}

#[test]
fn gateway_api_keys_turn_away_clients_without_one() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(
        mock.port,
        &["--api-key", "gw-key"],
        &[("OPENAI_API_KEY", "sk-upstream")],
    );
    let missing = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
    assert_eq!(missing.status, 401);
    assert_eq!(missing.json()["error"]["code"], "invalid_api_key");
    let wrong = post_json(
        gateway.port,
        "/v1/responses",
        RESPONSES_JSON,
        "\r\nAuthorization: Bearer nope",
    );
    assert_eq!(wrong.status, 401);
    assert_eq!(
        mock_stats(&mock)["requests"],
        0,
        "refused requests never reach vLLM"
    );
    let right = post_json(
        gateway.port,
        "/v1/responses",
        RESPONSES_JSON,
        "\r\nAuthorization: Bearer gw-key",
    );
    assert_eq!(right.status, 200);
    assert_eq!(
        last_request(&mock)["headers"]["authorization"],
        "Bearer sk-upstream",
        "the gateway key is not forwarded"
    );
}

#[test]
fn upstream_errors_pass_through_unchanged() {
    let mock = mock_vllm(&[("MOCK_VLLM_FAIL_STATUS", "503")]);
    let direct = post_json(mock.port, "/v1/responses", RESPONSES_JSON, "");
    let gateway = gateway(mock.port, &[], &[]);
    let proxied = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
    assert_eq!(proxied.status, 503);
    assert_eq!(proxied.body, direct.body);
    assert_eq!(
        proxied.header("content-type"),
        direct.header("content-type")
    );
    let not_found = raw_request(gateway.port, "GET /v1/nothing-here HTTP/1.1", b"");
    assert_eq!(not_found.status, 404);
    assert_eq!(not_found.json()["detail"], "Not Found");
}

#[test]
fn refused_upstream_connection_is_502_upstream_unavailable() {
    let upstream = ClosedPort::new();
    let gateway = gateway(upstream.port, &[], &[]);
    let response = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
    assert_eq!(response.status, 502);
    let error = &response.json()["error"];
    assert_eq!(error["code"], "upstream_unavailable");
    assert_eq!(error["type"], "upstream_error");
    assert!(error["param"].is_null());
    assert!(
        !error["message"]
            .as_str()
            .expect("message")
            .contains("127.0.0.1"),
        "no internals in the message"
    );
}

#[test]
fn slow_response_headers_are_504_upstream_timeout() {
    let mock = mock_vllm(&[("MOCK_VLLM_HEADERS_DELAY", "30s")]);
    for flag in ["--first-byte-timeout", "--request-timeout"] {
        let gateway = gateway(mock.port, &[flag, "300ms"], &[]);
        let response = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
        assert_eq!(response.status, 504, "{flag}");
        assert_eq!(
            response.json()["error"]["code"],
            "upstream_timeout",
            "{flag}"
        );
    }
}

#[test]
fn connect_timeout_is_504_upstream_timeout() {
    // A listener with a full backlog never completes new handshakes, so connecting times out.
    let listener = socket_with_full_backlog();
    let port = listener.local_addr().expect("addr").port();
    let gateway = gateway(
        port,
        &["--connect-timeout", "300ms", "--health-interval", "1h"],
        &[],
    );
    let response = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
    assert_eq!(response.status, 504);
    assert_eq!(response.json()["error"]["code"], "upstream_timeout");
}

fn socket_with_full_backlog() -> TcpListener {
    // Connections nobody accepts fill the accept queue; once it is full, the kernel drops new
    // handshakes and a connect hangs.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut fillers = Vec::new();
    for _ in 0..4096 {
        match TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
        {
            Ok(stream) => fillers.push(stream),
            Err(_) => break,
        }
    }
    std::mem::forget(fillers);
    listener
}

#[test]
fn a_stalled_stream_ends_with_an_error_event_after_the_idle_timeout() {
    let mock = mock_vllm(&[("MOCK_VLLM_STALL_MID_STREAM", "2")]);
    let gateway = gateway(mock.port, &["--stream-idle-timeout", "300ms"], &[]);
    let response = post_json(gateway.port, "/v1/responses", RESPONSES_STREAM, "");
    assert_eq!(response.status, 200);
    let text = String::from_utf8(response.body).expect("utf-8");
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|event| !event.is_empty())
        .collect();
    assert_eq!(events.len(), 3, "two events, then the error: {text}");
    assert!(events[0].starts_with("event: response.created"));
    let error = events[2]
        .strip_prefix("event: error\ndata: ")
        .expect("an SSE error event");
    let error: serde_json::Value = serde_json::from_str(error).expect("JSON");
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["code"], "upstream_timeout");
}

#[test]
fn upstream_death_mid_stream_ends_with_an_error_event() {
    let mock = mock_vllm(&[("MOCK_VLLM_DIE_MID_STREAM", "5")]);
    let gateway = gateway(mock.port, &[], &[]);
    let response = post_json(gateway.port, "/v1/responses", RESPONSES_STREAM, "");
    assert_eq!(response.status, 200);
    let text = String::from_utf8(response.body).expect("utf-8");
    let last = text.trim_end().rsplit("\n\n").next().expect("an event");
    assert!(
        last.starts_with("event: error\ndata: "),
        "ends with an error event: {text}"
    );
    assert!(last.contains("\"code\":\"upstream_unavailable\""), "{last}");
    assert!(
        text.starts_with(
            std::str::from_utf8(&fixture("vllm-responses-stream-gpt-oss-20b.sse")[..100])
                .expect("utf-8")
        )
    );
}

/// An upstream that answers an event stream whose second event, a chunk as vLLM writes each one,
/// is cut off halfway by the upstream's death.
fn upstream_dying_mid_event() -> (u16, std::thread::JoinHandle<()>) {
    let whole = CUT_STREAM_FIRST_EVENT;
    let half = "event: response.output_text.delta\ndata: {\"type\":\"response.output_te";
    upstream_answering(format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n\
         transfer-encoding: chunked\r\n\r\n{:x}\r\n{whole}\r\n{:x}\r\n{half}",
        whole.len(),
        half.len() + 60,
    ))
}

const CUT_STREAM_FIRST_EVENT: &str = "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"created_at\":1,\"model\":\"mock-model\",\"output\":[],\"status\":\"in_progress\"}}\n\n";

#[test]
fn an_event_cut_off_by_the_upstreams_death_is_not_passed_on() {
    let (port, _upstream) = upstream_dying_mid_event();
    let gateway = gateway(port, &["--health-interval", "1h"], &[]);
    let response = post_json(gateway.port, "/v1/responses", RESPONSES_STREAM, "");
    assert_eq!(response.status, 200);
    let text = String::from_utf8(response.body).expect("utf-8");
    let rest = text
        .strip_prefix(CUT_STREAM_FIRST_EVENT)
        .unwrap_or_else(|| panic!("the whole event first: {text}"));
    assert!(
        rest.starts_with("event: error\ndata: {") && rest.ends_with("}\n\n"),
        "then only the error event: {text}"
    );
    assert_eq!(rest.matches("\n\n").count(), 1, "{text}");
    assert!(rest.contains("\"code\":\"upstream_unavailable\""), "{text}");
}

#[test]
fn the_openai_sdk_gets_an_api_error_when_the_upstream_dies_mid_event() {
    let (port, _upstream) = upstream_dying_mid_event();
    let gateway = gateway(port, &["--health-interval", "1h"], &[]);
    let result = run_sdk_client("stream_client.py", &gateway.url("/v1"));
    assert_eq!(result["first"], "response.created");
    assert_eq!(result["count"], 1);
    assert_eq!(result["error"]["code"], "upstream_unavailable", "{result}");
}

#[test]
fn client_disconnect_mid_stream_reaches_the_upstream() {
    let mock = mock_vllm(&[("MOCK_VLLM_STREAM_DELAY", "100ms")]);
    let gateway = gateway(mock.port, &[], &[]);
    let (mut reader, _) = open_stream(gateway.port);
    read_chunks_until(&mut reader, |body| event_count(body) >= 1);
    drop(reader);
    wait_until(
        "the upstream to see the disconnect",
        Duration::from_secs(10),
        || mock_stats(&mock)["disconnects"] == 1,
    );
    assert_eq!(mock_stats(&mock)["completed"], 0);
}

#[test]
fn client_disconnect_while_waiting_for_headers_reaches_the_upstream() {
    let mock = mock_vllm(&[("MOCK_VLLM_HEADERS_DELAY", "30s")]);
    let gateway = gateway(mock.port, &[], &[]);
    let mut stream = TcpStream::connect(("127.0.0.1", gateway.port)).expect("connect");
    write!(
        stream,
        "POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{RESPONSES_JSON}",
        RESPONSES_JSON.len()
    )
    .expect("write");
    wait_until(
        "the request to reach the upstream",
        Duration::from_secs(10),
        || mock_stats(&mock)["requests"] == 1,
    );
    drop(stream);
    wait_until(
        "the upstream to see the disconnect",
        Duration::from_secs(10),
        || mock_stats(&mock)["disconnects"] == 1,
    );
}

#[test]
fn oversized_bodies_get_413_and_never_reach_the_upstream() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &["--max-body-bytes", "1000"], &[]);
    let body = format!(r#"{{"model":"mock-model","input":"{}"}}"#, "x".repeat(2000));
    let response = post_json(gateway.port, "/v1/responses", &body, "");
    assert_eq!(response.status, 413);
    assert_eq!(response.json()["error"]["code"], "request_too_large");
    assert_eq!(mock_stats(&mock)["requests"], 0);
    let small = post_json(gateway.port, "/v1/responses", RESPONSES_JSON, "");
    assert_eq!(small.status, 200);
}

#[test]
fn cors_is_off_by_default() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &[], &[]);
    let preflight = raw_request(
        gateway.port,
        "OPTIONS /v1/responses HTTP/1.1\r\nOrigin: https://app.example\r\nAccess-Control-Request-Method: POST",
        b"",
    );
    assert_eq!(preflight.header("access-control-allow-origin"), None);
}

#[test]
fn cors_answers_preflight_for_allowed_origins() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(
        mock.port,
        &["--cors-allowed-origins", "https://app.example"],
        &[],
    );
    let preflight = raw_request(
        gateway.port,
        "OPTIONS /v1/responses HTTP/1.1\r\nOrigin: https://app.example\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type,authorization",
        b"",
    );
    assert_eq!(preflight.status, 200);
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    // Named, not `*`: a wildcard does not cover Authorization in browsers.
    let allowed = preflight
        .header("access-control-allow-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(allowed.contains("authorization"), "{allowed}");
    assert_eq!(
        mock_stats(&mock)["requests"],
        0,
        "preflight is answered by the gateway"
    );
    let actual = post_json(
        gateway.port,
        "/v1/responses",
        RESPONSES_JSON,
        "\r\nOrigin: https://app.example",
    );
    assert_eq!(actual.status, 200);
    let origins: Vec<_> = actual
        .headers
        .iter()
        .filter(|(name, _)| name == "access-control-allow-origin")
        .collect();
    assert_eq!(
        origins.len(),
        1,
        "exactly one allow-origin header: {origins:?}"
    );
    let other = post_json(
        gateway.port,
        "/v1/responses",
        RESPONSES_JSON,
        "\r\nOrigin: https://evil.example",
    );
    assert_eq!(other.header("access-control-allow-origin"), None);
}

#[test]
fn readiness_follows_the_upstream_and_liveness_stays_up() {
    // SIGKILLed below, which would leave engine processes orphaned, as vLLM's are.
    let mut mock = mock_vllm(&[("MOCK_VLLM_ENGINE_PROCESSES", "0")]);
    let gateway = gateway(
        mock.port,
        &["--health-interval", "100ms", "--health-timeout", "100ms"],
        &[],
    );
    wait_until("readyz 200", Duration::from_secs(10), || {
        get(&gateway.url("/readyz")).is_some_and(|(status, _)| status == 200)
    });
    let (status, body) = get(&gateway.url("/health")).expect("health");
    assert_eq!((status, body.contains("\"ready\"")), (200, true));
    mock.signal(nix::sys::signal::Signal::SIGKILL);
    mock.wait_exit(Duration::from_secs(5));
    wait_until("readyz 503", Duration::from_secs(10), || {
        get(&gateway.url("/readyz")).is_some_and(|(status, _)| status == 503)
    });
    let (_, body) = get(&gateway.url("/readyz")).expect("readyz");
    assert!(body.contains("connection refused"), "says why: {body}");
    assert_eq!(
        get(&gateway.url("/livez")).map(|(status, _)| status),
        Some(200)
    );
}

/// A `/health` that fails while vLLM answers requests (slowed by a flood of them) keeps the
/// standalone gateway ready: taken out of its Service, it would shed the load vLLM is serving.
/// Once nothing comes from vLLM, readiness follows `/health` again.
#[test]
fn a_failing_health_endpoint_while_vllm_answers_requests_keeps_the_gateway_ready() {
    let mock = mock_vllm(&[("MOCK_VLLM_STREAM_DELAY", "20ms")]);
    let gateway = gateway(
        mock.port,
        &["--health-interval", "200ms", "--health-timeout", "200ms"],
        &[],
    );
    wait_until("readyz 200", DEADLINE, || {
        get(&gateway.url("/readyz")).is_some_and(|(status, _)| status == 200)
    });
    let stream = start_stream(&gateway);
    let response = raw_request(mock.port, "POST /_mock/hang-health HTTP/1.1", b"");
    assert_eq!(response.status, 200);
    let kept = "upstream /health is slow, but the upstream is answering requests: still ready";
    wait_until("a failed probe to be weighed", DEADLINE, || {
        gateway.log_text().matches(kept).count() >= 2
    });
    assert_eq!(
        get(&gateway.url("/readyz")).map(|(status, _)| status),
        Some(200),
        "ready while vLLM answers"
    );
    assert_eq!(stream.join().expect("stream thread").status, 200);
    wait_until("readyz 503 once vLLM is quiet", DEADLINE, || {
        get(&gateway.url("/readyz")).is_some_and(|(status, _)| status == 503)
    });
}

#[test]
fn sigterm_lets_an_inflight_stream_finish_then_exits_0() {
    let mock = mock_vllm(&[("MOCK_VLLM_STREAM_DELAY", "5ms")]);
    let mut gateway = gateway(mock.port, &[], &[]);
    let (mut reader, _) = open_stream(gateway.port);
    let first = read_chunks_until(&mut reader, |body| event_count(body) >= 1);
    gateway.signal(nix::sys::signal::Signal::SIGTERM);
    let rest = read_chunks_until(&mut reader, |_| false);
    let mut body = first;
    body.extend(rest);
    assert_eq!(
        body,
        fixture("vllm-responses-stream-gpt-oss-20b.sse"),
        "the stream completed"
    );
    let status = gateway.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_connection_opened_before_sigterm_gets_the_answer_to_its_first_request() {
    let mock = mock_vllm(&[("MOCK_VLLM_STREAM_DELAY", "5ms")]);
    let mut gateway = gateway(mock.port, &[], &[]);
    // A stream in flight keeps the drain going while the late request arrives.
    let (mut reader, _) = open_stream(gateway.port);
    read_chunks_until(&mut reader, |body| event_count(body) >= 1);
    let mut late = TcpStream::connect(("127.0.0.1", gateway.port)).expect("connect");
    late.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    gateway.signal(nix::sys::signal::Signal::SIGTERM);
    wait_until("the drain", Duration::from_secs(10), || {
        !lines_with_message(&gateway, "draining in-flight requests").is_empty()
    });
    let request = format!(
        "POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{RESPONSES_JSON}",
        RESPONSES_JSON.len()
    );
    late.write_all(request.as_bytes())
        .expect("write the request");
    let mut raw = Vec::new();
    late.read_to_end(&mut raw).expect("read the answer");
    let answer = parse_response(&raw);
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(
        answer.header("connection"),
        Some("close"),
        "the connection closes after its answer"
    );
    read_chunks_until(&mut reader, |_| false);
    assert_eq!(gateway.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

/// Regression: a kept-alive connection that had begun its next request's head when the drain's
/// second of grace ran out was closed without an answer. A head under way now has until its own
/// deadline, `client_header_timeout`.
#[test]
fn a_request_head_begun_in_the_drains_grace_gets_its_answer_however_slowly_it_comes() {
    let mock = mock_vllm(&[]);
    let mut gateway = gateway(mock.port, &[], &[]);
    let mut kept = TcpStream::connect(("127.0.0.1", gateway.port)).expect("connect");
    kept.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let request = format!(
        "POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{RESPONSES_JSON}",
        RESPONSES_JSON.len()
    );
    kept.write_all(request.as_bytes()).expect("write");
    assert_eq!(read_response(&mut kept).status, 200, "kept alive");

    gateway.signal(nix::sys::signal::Signal::SIGTERM);
    wait_until("the drain", Duration::from_secs(10), || {
        !lines_with_message(&gateway, "draining in-flight requests").is_empty()
    });
    let (start, rest) = request.split_at(20);
    kept.write_all(start.as_bytes())
        .expect("write the head's start");
    // The rest comes after the second of grace a connection gets for its next request.
    std::thread::sleep(Duration::from_millis(1500));
    kept.write_all(rest.as_bytes()).expect("write the rest");
    let mut raw = Vec::new();
    kept.read_to_end(&mut raw).expect("read the answer");
    let answer = parse_response(&raw);
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(answer.header("connection"), Some("close"));
    assert_eq!(gateway.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn a_connection_that_never_sends_a_request_does_not_hold_up_a_stop() {
    let mock = mock_vllm(&[]);
    let mut gateway = gateway(
        mock.port,
        &["--drain-timeout", "60s", "--client-header-timeout", "60s"],
        &[],
    );
    // Opened ahead of need, as a client's pool or a browser's preconnect does; answered once so
    // that it is known to be accepted, then a second one that never sends a byte.
    assert_eq!(
        raw_request(gateway.port, "GET /livez HTTP/1.1", b"").status,
        200
    );
    let mut idle = TcpStream::connect(("127.0.0.1", gateway.port)).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    // The scrape's own connection is the other one.
    wait_until(
        "the idle connection to be accepted",
        Duration::from_secs(10),
        || {
            let metrics = raw_request(gateway.port, "GET /metrics HTTP/1.1", b"");
            String::from_utf8_lossy(&metrics.body)
                .lines()
                .any(|line| line == "gateway_client_connections 2")
        },
    );
    gateway.signal(nix::sys::signal::Signal::SIGTERM);
    let status = gateway.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "stopped well before drain_timeout");
    let mut rest = Vec::new();
    assert_eq!(
        idle.read_to_end(&mut rest).map(|_| rest.len()).unwrap_or(0),
        0,
        "closed without an answer, as it asked nothing"
    );
}

#[test]
fn paths_outside_v1_pass_through_but_health_endpoints_are_the_gateways() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &[], &[]);
    let version = raw_request(gateway.port, "GET /version HTTP/1.1", b"");
    assert_eq!(version.status, 200);
    assert!(version.json()["version"].is_string());
    let livez = raw_request(gateway.port, "GET /livez HTTP/1.1", b"");
    assert_eq!(livez.status, 200);
    assert_eq!(
        mock_stats(&mock)["requests"],
        0,
        "neither /version nor /livez is a /v1 request"
    );
}

#[test]
fn a_request_body_that_stops_arriving_gets_408_and_never_reaches_vllm() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &["--first-byte-timeout", "500ms"], &[]);
    let mut stream = TcpStream::connect(("127.0.0.1", gateway.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(
        stream,
        "POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\""
    )
    .expect("write");
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let response = parse_response(&raw);
    assert_eq!(response.status, 408);
    assert_eq!(response.json()["error"]["code"], "request_timeout");
    assert_eq!(mock_stats(&mock)["requests"], 0);
}

#[test]
fn a_path_with_dot_segments_is_refused_rather_than_resolved() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &[], &[]);
    for path in ["/v1/../_mock/stats", "/v1/models/%2e%2e/models"] {
        let response = raw_request(gateway.port, &format!("GET {path} HTTP/1.1"), b"");
        assert_eq!(response.status, 400, "{path}");
        assert_eq!(response.json()["error"]["code"], "invalid_request");
    }
    assert!(last_request(&mock).is_null(), "nothing reached vLLM");
    // The access line counts the body the gateway wrote (regression: bytes_out was 0).
    let response = raw_request(
        gateway.port,
        "GET /v1/../x HTTP/1.1\r\nX-Request-Id: dots",
        b"",
    );
    wait_until("the access line", DEADLINE, || {
        lines_with_message(&gateway, "request finished")
            .iter()
            .any(|line| line["request_id"] == "dots")
    });
    let lines = lines_with_message(&gateway, "request finished");
    let line = lines
        .iter()
        .find(|line| line["request_id"] == "dots")
        .expect("the access line");
    assert_eq!(line["status"], 400);
    assert_eq!(line["bytes_out"], response.body.len(), "{line}");
}

#[test]
fn a_large_body_that_stalls_is_408_and_one_the_client_abandons_is_400_not_upstream_errors() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &["--first-byte-timeout", "500ms"], &[]);
    let head = "POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200000\r\n\r\n{\"model\"";

    let mut stalled = TcpStream::connect(("127.0.0.1", gateway.port)).expect("connect");
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stalled.write_all(head.as_bytes()).expect("write");
    let mut raw = Vec::new();
    let _ = stalled.read_to_end(&mut raw);
    let response = parse_response(&raw);
    assert_eq!(response.status, 408);
    assert_eq!(response.json()["error"]["code"], "request_timeout");

    let mut abandoned = TcpStream::connect(("127.0.0.1", gateway.port)).expect("connect");
    abandoned.write_all(head.as_bytes()).expect("write");
    abandoned
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut raw = Vec::new();
    let _ = abandoned.read_to_end(&mut raw);
    if !raw.is_empty() {
        assert_eq!(parse_response(&raw).status, 400);
    }

    let (_, metrics) = get(&gateway.url("/metrics")).expect("metrics");
    assert!(
        !metrics.contains("gateway_upstream_errors_total"),
        "no upstream error was counted:\n{metrics}"
    );
}

#[test]
fn responses_without_a_body_are_complete_not_client_disconnects() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &[], &[]);
    // vLLM answers no HEAD of its GET routes: 405, and no body, as any answer to a HEAD.
    let response = raw_request(gateway.port, "HEAD /v1/models HTTP/1.1", b"");
    assert_eq!(response.status, 405);
    assert_eq!(response.header("allow"), Some("GET"));
    let (_, metrics) = get(&gateway.url("/metrics")).expect("metrics");
    assert!(
        !metrics.contains("client_disconnect"),
        "a HEAD answer is not a disconnect:\n{metrics}"
    );
}

#[test]
fn connect_and_trace_are_refused_with_405() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &[], &[]);
    for head in [
        "CONNECT vllm.example:443 HTTP/1.1",
        "TRACE /v1/models HTTP/1.1",
    ] {
        let response = raw_request(gateway.port, head, b"");
        assert_eq!(response.status, 405, "{head}");
        assert_eq!(response.json()["error"]["code"], "method_not_allowed");
        let allow = response.header("allow").unwrap_or_default();
        assert!(
            allow.contains("POST") && !allow.contains("TRACE"),
            "{head}: {allow}"
        );
    }
    assert!(last_request(&mock).is_null(), "nothing reached vLLM");
}

/// Requests a proxy in front of vLLM cannot pass on faithfully get an error of their own, and
/// never reach vLLM: a body in a transfer coding beneath chunked (it would go on still coded, with
/// nothing saying so; RFC 9112 section 6.1) is a 501, and the target `*` for anything but OPTIONS
/// a 400 (section 3.2.4).
#[test]
fn a_transfer_coded_body_is_501_and_an_asterisk_target_400() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &[], &[]);
    let mut stream = TcpStream::connect(("127.0.0.1", gateway.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    .expect("write");
    let response = read_response(&mut stream);
    assert_eq!(response.status, 501);
    assert_eq!(response.json()["error"]["code"], "not_implemented");

    let response = raw_request(gateway.port, "GET * HTTP/1.1", b"");
    assert_eq!(response.status, 400);
    assert_eq!(response.json()["error"]["code"], "invalid_request");
    assert!(last_request(&mock).is_null(), "nothing reached vLLM");
}

/// Regression: a list flag split its value at commas, so `--api-key sk-abc,x` let in a client
/// with the key `x` and turned away the one with the key given.
#[test]
fn a_gateway_key_with_a_comma_is_one_key() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &["--api-key", "sk-abc,x"], &[]);
    let with = |key: &str| {
        let header = format!("\r\nAuthorization: Bearer {key}");
        post_json(gateway.port, "/v1/responses", RESPONSES_JSON, &header).status
    };
    assert_eq!(with("x"), 401);
    assert_eq!(with("sk-abc"), 401);
    assert_eq!(with("sk-abc,x"), 200);
}

#[test]
fn the_bearer_scheme_is_case_insensitive_for_gateway_keys() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &["--api-key", "client-key"], &[]);
    let response = raw_request(
        gateway.port,
        "GET /v1/models HTTP/1.1\r\nAuthorization: bearer client-key",
        b"",
    );
    assert_eq!(response.status, 200);
}

#[test]
fn vllms_unknown_model_404_reaches_the_client_unchanged() {
    let mock = mock_vllm(&[]);
    let gateway = gateway(mock.port, &[], &[]);
    let body = r#"{"model":"no-such-model","input":"hi"}"#;
    let direct = post_json(mock.port, "/v1/responses", body, "");
    let proxied = post_json(gateway.port, "/v1/responses", body, "");
    assert_eq!(proxied.status, 404);
    assert_eq!(proxied.body, direct.body);
    assert_eq!(proxied.json()["error"]["type"], "NotFoundError");
}

#[test]
fn a_request_after_vllm_closed_the_idle_pooled_connection_still_gets_200() {
    // vLLM (uvicorn) closes a kept-alive connection idle for its keep-alive timeout; here it does
    // so long before the gateway's pool would drop the connection itself (`pool_idle_timeout`).
    let mock = mock_vllm(&[("MOCK_VLLM_KEEP_ALIVE_TIMEOUT", "200ms")]);
    let gateway = gateway(mock.port, &[], &[]);
    // One client connection, so that both requests go through the same worker and its pool.
    let mut client = TcpStream::connect(("127.0.0.1", gateway.port)).expect("connect");
    client.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let request = format!(
        "POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{RESPONSES_JSON}",
        RESPONSES_JSON.len()
    );
    client.write_all(request.as_bytes()).expect("write");
    assert_eq!(read_response(&mut client).status, 200);
    wait_until("vLLM to close the idle pooled connection", DEADLINE, || {
        mock_stats(&mock)["keep_alive_closes"].as_u64() >= Some(1)
    });
    client.write_all(request.as_bytes()).expect("write again");
    let response = read_response(&mut client);
    assert_eq!(
        response.status,
        200,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(
        response.body,
        fixture("vllm-responses-toolcall-gpt-oss-20b.json")
    );
    assert_eq!(mock_stats(&mock)["requests"], 2);
}

/// A request head read by a stand-in vLLM: its request line and its `Content-Length` (0 when
/// none); `None` once the connection ends.
fn read_request_head(reader: &mut BufReader<TcpStream>) -> Option<(String, usize)> {
    let mut request_line = String::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            return Some((request_line, length));
        }
        if request_line.is_empty() {
            request_line = line.trim_end().to_owned();
        } else if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
}

/// An upstream that answers every request with a small JSON body; it counts the connections that
/// carried a POST (the health probe's GETs are not counted). It keeps connections alive, or, with
/// `close_after_answer`, closes each one after its first answer without saying so beforehand (as a
/// server whose keep-alive timeout ran out), counting those it closed.
struct CountingUpstream {
    port: u16,
    used: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    closed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn counting_upstream(close_after_answer: bool) -> CountingUpstream {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let used = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&used);
    let closer = Arc::clone(&closed);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let counter = Arc::clone(&counter);
            let closer = Arc::clone(&closer);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut counted = false;
                while let Some((request_line, length)) = read_request_head(&mut reader) {
                    let post = request_line.starts_with("POST ");
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    if post && !counted {
                        counter.fetch_add(1, Ordering::SeqCst);
                        counted = true;
                    }
                    let answer = "{\"ok\":true}";
                    let written = write!(
                        reader.get_mut(),
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if written.is_err() {
                        return;
                    }
                    if close_after_answer && post {
                        let _ = reader.get_ref().shutdown(std::net::Shutdown::Both);
                        closer.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
            });
        }
    });
    CountingUpstream { port, used, closed }
}

#[test]
fn sequential_requests_reuse_one_upstream_connection() {
    let upstream = counting_upstream(false);
    let gateway = gateway(upstream.port, &["--health-interval", "1h"], &[]);
    // One client connection: its requests are all served by the same worker and its pool.
    let mut client = keep_alive_client(gateway.port);
    for _ in 0..5 {
        post_on(&mut client);
    }
    assert_eq!(
        upstream.used.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "five requests in a row went over one upstream connection"
    );
}

#[test]
fn a_pooled_connection_the_upstream_closed_is_not_used_again() {
    use std::sync::atomic::Ordering;
    let upstream = counting_upstream(true);
    let gateway = gateway(upstream.port, &["--health-interval", "1h"], &[]);
    let mut client = keep_alive_client(gateway.port);
    post_on(&mut client);
    wait_until(
        "the upstream closed the first connection",
        Duration::from_secs(10),
        || upstream.closed.load(Ordering::SeqCst) == 1,
    );
    post_on(&mut client);
    assert_eq!(upstream.used.load(Ordering::SeqCst), 2);
}

/// Regression: a streamed request body (over 64 KB) whose pooled connection vLLM closed after
/// reading it, without answering, was sent again on a new connection with its head alone (the
/// body was gone): vLLM waited for the body and the client got a 504 at the first-byte timeout,
/// or, chunked, the answer to an empty request. It is not sent again: the client gets a 502.
#[test]
fn a_streamed_body_is_not_sent_again_after_vllm_closed_without_answering() {
    use std::sync::{Arc, Mutex};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    // Every request line vLLM read, with the length of the body that came with it.
    let seen: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
    let record = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let record = Arc::clone(&record);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                while let Some((request_line, length)) = read_request_head(&mut reader) {
                    let mut body = vec![0; length];
                    let read = reader.read_exact(&mut body).map_or(0, |()| length);
                    record.lock().expect("record").push((request_line, read));
                    if length > 64 * 1024 {
                        // Read it all, then close without a word.
                        return;
                    }
                    let _ = write!(
                        reader.get_mut(),
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{{\"ok\":true}}"
                    );
                }
            });
        }
    });
    let gateway = gateway(
        port,
        &["--health-interval", "1h", "--first-byte-timeout", "5s"],
        &[],
    );
    let mut client = keep_alive_client(gateway.port);
    // Leaves a connection in the pool, which the large POST then goes on.
    post_on(&mut client);
    let body = format!("{{\"input\":\"{}\"}}", "x".repeat(100 * 1024));
    // On the same client connection, so on the same worker and its pool.
    let status = send_post(&mut client, &body);
    assert!(status.starts_with("HTTP/1.1 502"), "{status}");
    let seen = seen.lock().expect("seen").clone();
    let posts: Vec<_> = seen
        .iter()
        .filter(|(line, _)| line.starts_with("POST "))
        .collect();
    assert_eq!(posts.len(), 2, "the large POST went once: {seen:?}");
    assert_eq!(posts[1].1, body.len(), "{seen:?}");
}

fn keep_alive_client(port: u16) -> BufReader<TcpStream> {
    let client = BufReader::new(TcpStream::connect(("127.0.0.1", port)).expect("connect"));
    client
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    client
}

/// A POST of `body` on a kept-alive client connection; the answer's status line.
fn send_post(client: &mut BufReader<TcpStream>, body: &str) -> String {
    write!(
        client.get_mut(),
        "POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut status = String::new();
    client.read_line(&mut status).expect("status line");
    status
}

/// One POST on a kept-alive client connection; its answer must be the upstream's 200.
fn post_on(client: &mut BufReader<TcpStream>) {
    let status = send_post(client, RESPONSES_JSON);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let mut length = 0;
    loop {
        let mut line = String::new();
        client.read_line(&mut line).expect("header line");
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().expect("content-length");
        }
    }
    let mut body = vec![0; length];
    client.read_exact(&mut body).expect("body");
    assert_eq!(body, b"{\"ok\":true}");
}
