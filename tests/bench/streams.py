#!/usr/bin/env python3
"""Streams mode of the proxy benchmark: an event-stream upstream, two clients, and what a proxy's
processes hold and use.

  streams.py upstream PORT
      An SSE stand-in for vLLM on 127.0.0.1:PORT. POST /v1/responses with a JSON body that has
      "bench_events": N and "bench_interval": S answers 200 text/event-stream (chunked, keep-alive)
      with N events, the first at once, then one every S seconds, and a final `data: [DONE]`. (In
      the body because that is all a proxy surely passes on: the vLLM Router drops the query and
      unknown headers.) The head has the lines vLLM's uvicorn writes for a stream, in its order:
      date, server, content-type, vary, transfer-encoding. GET /health and /v1/models answer 200.

  streams.py ttfb COUNT URL...
      COUNT sequential requests (one event each) to each URL, each URL on its own keep-alive
      connection, the URLs taking turns in an order shuffled every turn: a machine whose speed
      drifts from one second to the next then slows every URL alike. Prints a line per URL, in
      the order given, "<p50 seconds> <p90 seconds> <ok count>": time from sending the request to
      the first whole event (`\\n\\n`) of the body. A URL that fails is left out of the turns
      from then on, and its line counts what it answered before.

  streams.py hold URL COUNT EVENTS INTERVAL PIDS
      Opens COUNT streams (EVENTS events INTERVAL seconds apart, 256 connecting at a time) and, when
      all of them have their first event (or at the most open at once), samples the resident memory
      of PIDS (comma-separated; each process with its
      descendants, summed). Prints "<rss bytes> <most streams open at once> <whole streams>": a
      stream is whole when it got every event and its end.

  streams.py rss PIDS
      The resident bytes of PIDS (comma-separated), each with its descendants, summed.

  streams.py cpu PIDS
      The CPU time (user and system, in clock ticks) that PIDS and their descendants have used.

Only loopback is used. Everything has a deadline, so a wedged target makes a run fail instead of
hang.
"""

import asyncio
import json
import os
import random
import statistics
import sys
import time
from email.utils import formatdate
from urllib.parse import urlsplit

# ---------------------------------------------------------------------------- upstream

_date = (0, b"")


def date_line():
    """`date: <IMF-fixdate>\\r\\n`, made once a second (as uvicorn does)."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, b"date: %s\r\n" % formatdate(now, usegmt=True).encode())
    return _date[1]


async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            body = await reader.readexactly(length) if length else b"{}"
            url = urlsplit(target)
            if method == "POST" and url.path == "/v1/responses":
                request = json.loads(body)
                events = int(request.get("bench_events", 10))
                interval = float(request.get("bench_interval", 1))
                writer.write(
                    b"HTTP/1.1 200 OK\r\n%sserver: uvicorn\r\n"
                    b"content-type: text/event-stream; charset=utf-8\r\nvary: Origin\r\n"
                    b"transfer-encoding: chunked\r\n\r\n" % date_line()
                )
                for n in range(events):
                    if n:
                        await asyncio.sleep(interval)
                    event = (
                        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
                        b'"sequence_number":%d,"delta":"token"}\n\n' % n
                    )
                    writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                    await writer.drain()
                done = b"data: [DONE]\n\n"
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            elif method == "GET" and url.path in ("/health", "/v1/models"):
                body = b'{"object":"list","data":[{"id":"m","object":"model"}]}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(body), body)
                )
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def upstream(port):
    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=16384)
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------------------- client


def request_bytes(url, events, interval):
    parts = urlsplit(url)
    body = b'{"model":"m","input":"hello","stream":true,"bench_events":%d,"bench_interval":%s}' % (
        events,
        str(interval).encode(),
    )
    return parts, (
        b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
        b"accept: text/event-stream\r\ncontent-length: %d\r\n\r\n%s"
        % (parts.path.encode(), parts.netloc.encode(), len(body), body)
    )


async def read_response(reader, on_event=None):
    """Reads one response; calls on_event() at the first `\\n\\n` and returns (status, body, reusable)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    body = bytearray()
    seen = False

    def got(data):
        nonlocal seen
        body.extend(data)
        if not seen and b"\n\n" in body:
            seen = True
            if on_event:
                on_event()

    if "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            got((await reader.readexactly(size + 2))[:-2])
        reusable = headers.get("connection") != "close"
    elif "content-length" in headers:
        got(await reader.readexactly(int(headers["content-length"])))
        reusable = headers.get("connection") != "close"
    else:
        while chunk := await reader.read(65536):
            got(chunk)
        reusable = False
    return status, bytes(body), reusable


async def ttfb(count, urls):
    clients = [TtfbClient(url) for url in urls]
    order = list(range(len(clients)))
    shuffle = random.Random(0).shuffle
    for _ in range(count):
        shuffle(order)
        for i in order:
            await clients[i].request()
    for client in clients:
        client.close()
        print(client.summary())


class TtfbClient:
    """One URL's keep-alive connection and time-to-first-event samples."""

    def __init__(self, url):
        self.url = url
        self.parts, self.request_bytes = request_bytes(url, 1, 0)
        self.samples = []
        self.conn = None
        self.failed = False

    async def request(self):
        if self.failed:
            return
        try:
            if self.conn is None:
                self.conn = await asyncio.open_connection(self.parts.hostname, self.parts.port)
            reader, writer = self.conn
            start = time.perf_counter()
            first = []
            writer.write(self.request_bytes)
            status, body, reusable = await asyncio.wait_for(
                read_response(reader, lambda: first.append(time.perf_counter())), 10
            )
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, ValueError) as error:
            print(f"ttfb: {self.url}: {error!r}", file=sys.stderr)
            self.failed = True
            self.close()
            return
        if status == 200 and first and body.endswith(b"data: [DONE]\n\n"):
            self.samples.append(first[0] - start)
        if not reusable:
            self.close()

    def close(self):
        if self.conn is not None:
            self.conn[1].close()
            self.conn = None

    def summary(self):
        if not self.samples:
            return "nan nan 0"
        samples = sorted(self.samples)
        p90 = samples[int(len(samples) * 0.9)]
        return f"{statistics.median(samples):.6f} {p90:.6f} {len(samples)}"


def stat_fields(pid):
    """The fields of /proc/PID/stat after the command name (which may hold spaces): state, ppid,
    ...; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def tree(pids):
    """Each pid and its descendants, once each, with the stat fields read to find them (None for a
    pid given that is gone)."""
    children, stats = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := stat_fields(entry)) is not None:
            stats[int(entry)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry))
    todo, seen = list(pids), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(children.get(pid, []))
        yield pid, stats.get(pid)


def rss_of(pids):
    """Resident bytes of each pid and its descendants, summed."""
    total = 0
    for pid, _ in tree(pids):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def cpu_of(pids):
    """Clock ticks of user and system time each pid and its descendants have used, summed."""
    total = 0
    for _, fields in tree(pids):
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total


async def hold(url, count, events, interval, pids):
    parts, request = request_bytes(url, events, interval)
    opened = 0
    peak = 0
    rss = 0
    step = max(count // 20, 1)
    # Connections are opened a few hundred at a time, so that a burst does not overflow a
    # proxy's accept queue (a dropped SYN is retried only a second later).
    opening = asyncio.Semaphore(256)

    def first_event():
        nonlocal opened, peak, rss
        opened += 1
        if opened > peak:
            peak = opened
            if peak == count or peak % step == 0:
                rss = rss_of(pids)  # the RSS at the most streams open at once

    async def one():
        nonlocal opened
        writer = None
        counted = []
        await opening.acquire()
        try:
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port, limit=65536)
            writer.write(request)

            def mark():
                counted.append(1)
                opening.release()
                first_event()

            status, body, _ = await read_response(reader, mark)
            return status == 200 and body.count(b"\n\n") == events + 1 and body.endswith(b"data: [DONE]\n\n")
        except (OSError, asyncio.IncompleteReadError, ValueError):
            return False
        finally:
            if counted:
                opened -= 1
            else:
                opening.release()
            if writer:
                writer.close()

    deadline = 60 + events * interval * 2
    tasks = [asyncio.create_task(one()) for _ in range(count)]
    done, pending = await asyncio.wait(tasks, timeout=deadline)
    for task in pending:
        task.cancel()
    whole = sum(1 for task in done if not task.cancelled() and task.exception() is None and task.result())
    if not rss:
        rss = rss_of(pids)
    print(f"{rss} {peak} {whole}")


def main():
    mode = sys.argv[1]
    if mode == "upstream":
        asyncio.run(upstream(int(sys.argv[2])))
    elif mode == "ttfb":
        asyncio.run(ttfb(int(sys.argv[2]), sys.argv[3:]))
    elif mode == "hold":
        pids = [int(p) for p in sys.argv[6].split(",") if p]
        asyncio.run(hold(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), pids))
    elif mode == "rss":
        print(rss_of([int(p) for p in sys.argv[2].split(",") if p]))
    elif mode == "cpu":
        print(cpu_of([int(p) for p in sys.argv[2].split(",") if p]))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
