"""Records vLLM's answers through a gateway into tests/fixtures, as the bytes on the wire.

Usage: record.py GATEWAY_URL VLLM_URL OUTDIR [GATEWAY_PID]

GATEWAY_URL is the gateway in front of the tiny model (served as `tiny`), VLLM_URL vLLM itself
(for the paths outside /v1: /metrics, /health, /ping, /tokenize and /detokenize; and for a body
that is not labelled JSON, so that its label reaches vLLM as sent). With GATEWAY_PID,
the engine core under that gateway is killed last, with three streams in flight, and vLLM's answers
while its engine is dead are recorded: how the streams end, /health, /ping, /tokenize, then a
generation request.
Run by record.sh.
"""

import http.client
import json
import os
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

PREFIX = "vllm-0.32-tiny-"


def exchange(base: str, method: str, path: str, body: dict | None = None,
             content_type: str = "application/json", with_allow: bool = False):
    """Sends a request (a body as JSON, labelled `content_type`); returns the answer's status,
    content type and body, and with `with_allow` its `allow` header too."""
    url = urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    payload = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": content_type} if body is not None else {}
    connection.request(method, url.path.rstrip("/") + path, body=payload, headers=headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    if with_allow:
        return response.status, response.getheader("content-type"), response.getheader("allow"), data
    return response.status, response.getheader("content-type"), data


def record(out: Path, name: str, base: str, path: str, body: dict, suffix: str, want: int,
           content_type: str = "application/json") -> bytes:
    status, content_type, data = exchange(base, "POST", path, body, content_type)
    assert status == want, (name, status, data[:300])
    (out / f"{PREFIX}{name}.request.json").write_text(json.dumps(body, indent=2) + "\n")
    (out / f"{PREFIX}{name}.{suffix}").write_bytes(data)
    print(f"{PREFIX}{name}.{suffix}: {status} {content_type} {len(data)} bytes")
    return data


def write_with_head(out: Path, name: str, status: int, content_type: str | None, data: bytes,
                    allow: str | None = None) -> None:
    """Writes an answer whose status and content type matter as much as its body: the status
    line, the content type and the `allow` header (each when there is one), a blank line, then
    the body."""
    head = f"HTTP {status}\n" + (f"content-type: {content_type}\n" if content_type else "")
    head += f"allow: {allow}\n" if allow else ""
    (out / f"{PREFIX}{name}.txt").write_bytes(head.encode() + b"\n" + data)
    print(f"{PREFIX}{name}.txt: {status} {content_type} {len(data)} bytes")


def record_with_head(out: Path, name: str, base: str, method: str, path: str, want: int) -> None:
    status, content_type, allow, data = exchange(base, method, path, with_allow=True)
    assert status == want, (name, status, data[:300])
    write_with_head(out, name, status, content_type, data, allow)


def open_stream(base: str, path: str, body: dict) -> http.client.HTTPResponse:
    """Sends a streaming request; returns the response once its head came."""
    url = urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    connection.request("POST", url.path.rstrip("/") + path, body=json.dumps(body).encode(),
                       headers={"Content-Type": "application/json"})
    return connection.getresponse()


def read_rest(response: http.client.HTTPResponse) -> tuple[bytes, bool]:
    """The rest of a body as it came (chunked encoding removed), and whether it ended cleanly
    rather than with the connection cut."""
    data = b""
    while True:
        try:
            chunk = response.read1(65536)
        except http.client.IncompleteRead as error:
            return data + error.partial, False
        except (http.client.HTTPException, OSError):
            return data, False
        if not chunk:
            return data, True
        data += chunk


def engine_core(gateway_pid: int) -> int:
    """The pid of the VLLM::EngineCore descended from the gateway."""
    parents = {}
    names = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            head, rest = stat.rsplit(") ", 1)
            names[int(entry)] = head.split(" (", 1)[1]
            parents[int(entry)] = int(rest.split()[1])
    for pid, name in names.items():
        ancestor = parents.get(pid)
        while ancestor and ancestor != gateway_pid:
            ancestor = parents.get(ancestor)
        if name.startswith("VLLM::EngineCor") and ancestor == gateway_pid:
            return pid
    raise SystemExit("no engine core under the gateway")


def main() -> None:
    gateway, vllm, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    v1 = gateway.rstrip("/") + "/v1"

    record(out, "responses", v1, "/responses",
           {"model": "tiny", "input": "Hello", "max_output_tokens": 50, "stop": [" "]}, "json", 200)
    record(out, "responses-incomplete", v1, "/responses",
           {"model": "tiny", "input": "Hello", "max_output_tokens": 8}, "json", 200)
    record(out, "responses-stream", v1, "/responses",
           {"model": "tiny", "input": "Hello", "max_output_tokens": 16, "stream": True}, "sse", 200)
    record(out, "chat-stream", v1, "/chat/completions",
           {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16,
            "stream": True}, "sse", 200)
    record(out, "chat", v1, "/chat/completions",
           {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16},
           "json", 200)
    record(out, "chat-stream-usage", v1, "/chat/completions",
           {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16,
            "stream": True, "stream_options": {"include_usage": True}}, "sse", 200)
    record(out, "completions", v1, "/completions",
           {"model": "tiny", "prompt": "Hello", "max_tokens": 16}, "json", 200)
    record(out, "completions-stream", v1, "/completions",
           {"model": "tiny", "prompt": "Hello", "max_tokens": 16, "stream": True}, "sse", 200)
    record(out, "completions-stream-usage", v1, "/completions",
           {"model": "tiny", "prompt": "Hello", "max_tokens": 16, "stream": True,
            "stream_options": {"include_usage": True}}, "sse", 200)
    record(out, "error-unknown-model", v1, "/responses",
           {"model": "no-such-model", "input": "Hello"}, "json", 404)
    record(out, "error-too-long", v1, "/responses",
           {"model": "tiny", "input": "hello " * 2000, "max_output_tokens": 8}, "json", 400)

    # The paths outside /v1 are vLLM's own, asked of vLLM itself.
    tokens = json.loads(record(out, "tokenize", vllm, "/tokenize",
                               {"model": "tiny", "prompt": "Hello world"}, "json", 200))["tokens"]
    record(out, "detokenize", vllm, "/detokenize", {"model": "tiny", "tokens": tokens}, "json", 200)
    record_with_head(out, "ping-get", vllm, "GET", "/ping", 200)
    record_with_head(out, "ping-post", vllm, "POST", "/ping", 200)
    # FastAPI routes answer no HEAD, not even where they answer GET.
    record_with_head(out, "health-head", vllm, "HEAD", "/health", 405)
    record_with_head(out, "ping-head", vllm, "HEAD", "/ping", 405)
    # A JSON endpoint refuses a body labelled as anything but JSON, whatever the body.
    record(out, "error-content-type", vllm.rstrip("/") + "/v1", "/chat/completions",
           {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}]}, "json", 400,
           content_type="text/plain")

    status, content_type, data = exchange(vllm, "GET", "/metrics")
    assert status == 200, status
    (out / f"{PREFIX}metrics.txt").write_bytes(data)
    print(f"{PREFIX}metrics.txt: {status} {content_type} {len(data)} bytes")

    if len(sys.argv) > 4:
        # Three long streams, sent to vLLM itself, are under way when the engine dies.
        v1_vllm = vllm.rstrip("/") + "/v1"
        streams = [
            ("chat-stream-engine-dead", "/chat/completions",
             {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "n": 16,
              "max_tokens": 1000, "ignore_eos": True, "stream": True}),
            ("responses-stream-engine-dead", "/responses",
             {"model": "tiny", "input": "Hello", "max_output_tokens": 1000, "ignore_eos": True,
              "stream": True}),
            ("completions-stream-engine-dead", "/completions",
             {"model": "tiny", "prompt": "Hello", "n": 16, "max_tokens": 1000, "ignore_eos": True,
              "stream": True}),
        ]
        opened = []
        for name, path, body in streams:
            response = open_stream(v1_vllm, path, body)
            assert response.status == 200, (name, response.status)
            opened.append((name, body, response, response.read1(65536)))
        os.kill(engine_core(int(sys.argv[4])), signal.SIGKILL)
        for name, body, response, first in opened:
            rest, clean = read_rest(response)
            (out / f"{PREFIX}{name}.request.json").write_text(json.dumps(body, indent=2) + "\n")
            (out / f"{PREFIX}{name}.sse").write_bytes(first + rest)
            ending = "ended cleanly" if clean else "cut"
            print(f"{PREFIX}{name}.sse: {len(first + rest)} bytes, {ending}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                status, content_type, data = exchange(vllm, "GET", "/health")
            except OSError:
                raise SystemExit("vLLM exited before its /health answered 503")
            if status == 503:
                write_with_head(out, "health-engine-dead", status, content_type, data)
                # /ping is /health under another name; /tokenize needs no engine.
                record_with_head(out, "ping-engine-dead", vllm, "GET", "/ping", 503)
                record(out, "tokenize-engine-dead", vllm, "/tokenize",
                       {"model": "tiny", "prompt": "Hello world"}, "json", 200)
                # A generation request meanwhile meets the dead engine (and makes vLLM stop).
                record(out, "error-engine-dead", vllm.rstrip("/") + "/v1", "/responses",
                       {"model": "tiny", "input": "Hello", "max_output_tokens": 8}, "json", 500)
                return
            time.sleep(0.1)
        raise SystemExit("vLLM's /health never answered 503 after its engine died")


if __name__ == "__main__":
    main()
