#!/usr/bin/env python3
"""The training run of the profile-guided build (`make build`): traffic like a vLLM box's through
an instrumented gateway, so that the compiler learns which code a request runs.

  train.py GATEWAY MOCK_VLLM

GATEWAY and MOCK_VLLM are the instrumented builds of the two binaries; each process writes its
profile where the build told it to (`-Cprofile-generate=DIR`) when it exits. The run starts
mock-vllm (one event a millisecond, as a model writes tokens) and two gateways in front of it, one
logging JSON (the default when the log is not a terminal or the journal) and one text, then sends
through both, over keep-alive connections, what an inference box serves most: Responses and Chat
Completions requests, streamed and not, many at once and one after another, with a few model
listings and health checks between them. Every answer is checked (status, a complete body, the
stream's end), and both gateways must stop cleanly on SIGTERM: a training run that saw failures
would teach the compiler the error paths, so any failure fails the build.

Only the standard library and loopback are used; every wait has a deadline.
"""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

# Requests a connection sends, cycled: the traffic's mix. Streams are cut at 16 tokens.
MIX = [
    ("POST", "/v1/responses", {"model": "m", "input": "hello", "stream": False}),
    ("POST", "/v1/responses", {"model": "m", "input": "hello", "stream": True, "max_output_tokens": 16}),
    ("POST", "/v1/chat/completions",
     {"model": "m", "messages": [{"role": "user", "content": "hello"}], "stream": False}),
    ("POST", "/v1/responses", {"model": "m", "input": "hello", "stream": False}),
    ("POST", "/v1/chat/completions",
     {"model": "m", "messages": [{"role": "user", "content": "hello"}], "stream": True, "max_tokens": 16}),
]
CONNECTIONS = 32
ROUNDS = 60  # each connection sends the mix this many times, per gateway
SEQUENTIAL = 500  # then requests one after another on one connection, per gateway
DEADLINE = 300  # seconds for the whole run


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(what, check, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    sys.exit(f"train: {what} within {seconds} s")


def answers_200(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def request_bytes(port, method, path, body):
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
    if body is not None:
        head += f"content-type: application/json\r\ncontent-length: {len(data)}\r\n"
    return head.encode() + b"\r\n" + data


async def read_response(reader):
    """One response: (status, body). Reads chunked and content-length bodies."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    status = int(head.split(" ", 2)[1])
    if "\r\ntransfer-encoding: chunked\r\n" in head:
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
        return status, bytes(body)
    length = re.search(r"\r\ncontent-length: *(\d+)\r\n", head)
    return status, await reader.readexactly(int(length[1]) if length else 0)


def check(path, body, status, answer):
    """Raises unless the answer is a whole success of its kind."""
    if status != 200:
        raise RuntimeError(f"{path}: status {status}: {answer[:200]!r}")
    if body is None:
        return
    if not body.get("stream"):
        json.loads(answer)
    elif path == "/v1/responses":
        if b"event: response.completed" not in answer:
            raise RuntimeError(f"{path}: stream without response.completed")
    elif not answer.endswith(b"data: [DONE]\n\n"):
        raise RuntimeError(f"{path}: stream without [DONE]")


async def connection(port, requests):
    """Sends REQUESTS one after another on one connection; returns how many."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for method, path, body in requests:
            writer.write(request_bytes(port, method, path, body))
            status, answer = await read_response(reader)
            check(path, body, status, answer)
    finally:
        writer.close()
    return len(requests)


async def traffic(port):
    """The whole mix through the gateway on PORT; returns how many requests it answered."""
    mix = MIX * ROUNDS
    every = ("GET", "/v1/models", None), ("GET", "/health", None), ("GET", "/metrics", None)
    sent = await asyncio.gather(*(connection(port, mix + [every[n % 3]]) for n in range(CONNECTIONS)))
    return sum(sent) + await connection(port, [MIX[n % len(MIX)] for n in range(SEQUENTIAL)])


def stop(process, name):
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        sys.exit(f"train: {name} did not stop within 30 s of SIGTERM")
    if code != 0:
        sys.exit(f"train: {name} exited with {code}")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    gateway, mock = sys.argv[1:]
    upstream = free_port()
    env = dict(os.environ, MOCK_VLLM_STREAM_DELAY="1ms", MOCK_VLLM_ENGINE_PROCESSES="0")
    processes = []
    try:
        processes.append(subprocess.Popen(
            [mock, "serve", "m", "--host", "127.0.0.1", "--port", str(upstream)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_until("mock-vllm did not answer /health",
                   lambda: answers_200(f"http://127.0.0.1:{upstream}/health"), 30)
        ports = []
        for log_format in ("json", "text"):
            port = free_port()
            processes.append(subprocess.Popen(
                [gateway, "--llm-api-base", f"http://127.0.0.1:{upstream}", "--host", "127.0.0.1",
                 "--port", str(port), "--log-format", log_format],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_until(f"the gateway (--log-format {log_format}) was not ready",
                       lambda: answers_200(f"http://127.0.0.1:{port}/readyz"), 30)
            ports.append(port)
        started = time.monotonic()
        requests = sum(asyncio.run(asyncio.wait_for(traffic(port), DEADLINE)) for port in ports)
        for process in processes[1:]:
            stop(process, "the gateway")
        stop(processes[0], "mock-vllm")
        print(f"train: {requests} requests through {len(ports)} gateways in "
              f"{time.monotonic() - started:.1f} s")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


if __name__ == "__main__":
    main()
