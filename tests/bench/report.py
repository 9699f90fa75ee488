#!/usr/bin/env python3
"""Parse load-generator output and print the benchmark tables.

Sub-commands (used by run.sh):

  report.py parse wrk|oha FILE
      Print one line "rps p50_s p99_s errors requests" for a single run.
      rps counts only successful (non-4xx/5xx) responses.  Exits non-zero
      if the output cannot be understood or nothing succeeded.

  report.py report RESULTS_TSV [--streams STREAMS_TSV] [--duration S] [--rounds N]
                   [--connections N] [--tool NAME]
      RESULTS_TSV lines: kind target round status rps p50_s p99_s errors
      cpu_us machine_us (status is "ok" or "fail"; numbers are "-" for
      failed runs; cpu_us and machine_us are the CPU a request took the
      target's processes and the whole machine, in microseconds).
      Prints one table per body kind with medians over rounds, the
      gateway/nginx and gateway/haproxy ratios and the p50 latency each
      proxy adds on top of the direct path.
      STREAMS_TSV lines: "ttfb target round ok|fail p50_s" and
      "rss target streams ok|fail rss_bytes peak_open whole"; printed as the
      streams table (added TTFB p50, RSS idle and with each stream count).
"""

import argparse
import json
import re
import statistics
import sys

TARGETS = ["direct", "nginx", "haproxy", "gateway", "gateway-nolog", "router"]
PROXIES = ["nginx", "haproxy", "gateway", "gateway-nolog", "router"]
LABELS = {
    "gateway": "gateway (access log on)",
    "gateway-nolog": "gateway --access-log false",
    "router": "vLLM Router",
}
KIND_TITLES = {
    "json": "JSON  (POST /v1/responses, non-streaming body)",
    "sse": "SSE   (POST /v1/responses, \"stream\":true, text/event-stream body)",
}

# --------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def to_seconds(text):
    """'812.00us' / '1.23ms' / '2.01s' / '1m' -> seconds (float)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ns|us|µs|ms|s|m|h)?\s*", text)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def parse_wrk(text):
    """Prefer the BENCH_RESULT line printed by post.lua (raw microseconds);
    fall back to wrk's human-readable summary (units us/ms/s/m)."""
    m = re.search(r"^BENCH_RESULT (.*)$", text, re.M)
    if m:
        f = {k: float(v) for k, v in (kv.split("=", 1) for kv in m.group(1).split())}
        duration = f["duration_us"] / 1e6
        requests = int(f["requests"])
        status_err = int(f["err_status"])
        errors = status_err + int(f["err_connect"] + f["err_read"] + f["err_write"] + f["err_timeout"])
        ok = requests - status_err
        return {
            "rps": ok / duration if duration > 0 else 0.0,
            "p50": f["p50_us"] / 1e6,
            "p99": f["p99_us"] / 1e6,
            "errors": errors,
            "requests": requests,
        }

    # Fallback: the text summary.
    pct = {}
    for p, val in re.findall(r"^\s*(50|99)(?:\.0+)?%\s+(\S+)\s*$", text, re.M):
        pct[p] = to_seconds(val)
    m_req = re.search(r"(\d+) requests in ([0-9.]+\w+)", text)
    if not m_req or "50" not in pct or "99" not in pct:
        raise ValueError("wrk output has neither BENCH_RESULT nor a --latency summary")
    requests = int(m_req.group(1))
    duration = to_seconds(m_req.group(2))
    errors = 0
    m_sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m_sock:
        errors += sum(int(x) for x in m_sock.groups())
    m_non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    status_err = int(m_non2xx.group(1)) if m_non2xx else 0
    errors += status_err
    return {
        "rps": (requests - status_err) / duration if duration > 0 else 0.0,
        "p50": pct["50"],
        "p99": pct["99"],
        "errors": errors,
        "requests": requests,
    }


def parse_oha(text):
    """oha --no-tui -j: latencies are in seconds."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in oha output")
    data = json.loads(text[start:])
    summary = data["summary"]
    duration = float(summary["total"])
    codes = {int(k): int(v) for k, v in (data.get("statusCodeDistribution") or {}).items()}
    ok = sum(v for k, v in codes.items() if k < 400)
    errors = sum(v for k, v in codes.items() if k >= 400)
    for name, count in (data.get("errorDistribution") or {}).items():
        # Requests still in flight when the duration ends are cut off by oha;
        # they are an artefact of the stop, not a failure of the target.
        if "deadline" not in name:
            errors += int(count)
    pct = data.get("latencyPercentiles") or {}
    p50, p99 = pct.get("p50"), pct.get("p99")
    if p50 is None or p99 is None:
        raise ValueError("oha output lacks latencyPercentiles p50/p99")
    return {
        "rps": ok / duration if duration > 0 else 0.0,
        "p50": float(p50),
        "p99": float(p99),
        "errors": errors,
        "requests": ok + errors,
    }


def cmd_parse(tool, path):
    with open(path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    try:
        r = (parse_wrk if tool == "wrk" else parse_oha)(text)
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        print(f"cannot parse {tool} output {path}: {exc}", file=sys.stderr)
        return 2
    if r["rps"] <= 0:
        print(f"no successful responses in {path}", file=sys.stderr)
        return 3
    print(f"{r['rps']:.3f} {r['p50']:.9f} {r['p99']:.9f} {r['errors']} {r['requests']}")
    return 0


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------


def fmt_time(sec):
    if sec is None:
        return "n/a"
    if sec < 1e-3:
        return f"{sec * 1e6:.0f}us"
    if sec < 1.0:
        return f"{sec * 1e3:.2f}ms"
    return f"{sec:.2f}s"


def fmt_cpu(sec):
    return "n/a" if sec is None else f"{sec * 1e6:.2f}us"


def fmt_delta(sec):
    if sec is None:
        return "n/a"
    sign = "+" if sec >= 0 else "-"
    return sign + fmt_time(abs(sec))


def fmt_rps(v):
    return "n/a" if v is None else f"{v:,.0f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def load_results(path):
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) != 10:
                continue
            kind, target, rnd, status, rps, p50, p99, errors, cpu, machine = parts
            ok = status == "ok"
            rows.append({
                "kind": kind, "target": target, "round": int(rnd), "ok": ok,
                "rps": float(rps) if ok else None,
                "p50": float(p50) if ok else None,
                "p99": float(p99) if ok else None,
                "errors": int(errors) if errors != "-" else 0,
                "cpu": float(cpu) * 1e-6 if ok else None,
                "machine": float(machine) * 1e-6 if ok else None,
            })
    return rows


def summarize(rows, kind, target):
    mine = [r for r in rows if r["kind"] == kind and r["target"] == target]
    good = [r for r in mine if r["ok"]]
    med = (lambda key: statistics.median(r[key] for r in good)) if good else (lambda key: None)
    return {
        "rps": med("rps"), "p50": med("p50"), "p99": med("p99"),
        "cpu": med("cpu"), "machine": med("machine"),
        "errors": sum(r["errors"] for r in mine),
        "runs": f"{len(good)}/{len(mine)}",
        "per_round": " ".join(fmt_rps(r["rps"]) for r in sorted(mine, key=lambda r: r["round"])),
        "any": bool(mine),
    }


def per_round(rows, kind, a, b):
    """The ratio of a's throughput to b's in each round both finished: the targets of a round run
    back to back, so a drift of the machine's speed over the run moves both alike."""
    def by_round(t):
        return {r["round"]: r["rps"] for r in rows if r["kind"] == kind and r["target"] == t and r["ok"]}
    mine, theirs = by_round(a), by_round(b)
    return [mine[n] / theirs[n] for n in sorted(mine) if n in theirs and theirs[n]]


def cmd_report(args):
    rows = load_results(args.results)
    kinds = [k for k in ("json", "sse") if any(r["kind"] == k for r in rows)]
    failed = False
    for kind in kinds:
        s = {t: summarize(rows, kind, t) for t in TARGETS}
        print()
        print(f"== {KIND_TITLES.get(kind, kind)}")
        print(f"   median of {args.rounds} round(s) x {args.duration}s, "
              f"{args.connections} connections, {args.tool}")
        hdr = (f"   {'target':<28}{'req/s':>11}{'p50':>11}{'p99':>11}{'CPU/req':>10}{'machine':>10}"
               f"{'errors':>8}{'ok runs':>9}   req/s per round")
        print(hdr)
        print("   " + "-" * (len(hdr) - 3))
        for t in TARGETS:
            x = s[t]
            if not x["any"]:
                continue
            if x["rps"] is None:
                failed = True
            print(f"   {LABELS.get(t, t):<28}{fmt_rps(x['rps']):>11}{fmt_time(x['p50']):>11}{fmt_time(x['p99']):>11}"
                  f"{fmt_cpu(x['cpu']):>10}{fmt_cpu(x['machine']):>10}{x['errors']:>8}{x['runs']:>9}   {x['per_round']}")
        print("   CPU/req: the target's processes (direct: the upstream's); machine: all CPUs, load generator"
              " and upstream included")
        base = s["nginx"]["rps"]
        print()
        print("   x nginx (throughput): " + ", ".join(
            f"{LABELS.get(t, t)} {ratio(s[t]['rps'], base)}" for t in PROXIES if s[t]["any"]))
        g = s["gateway"]
        print("   gateway vs      throughput   p50 latency   CPU/req   throughput per round"
              "    (throughput >1x, p50 and CPU <1x favour the gateway)")
        for other in ("nginx", "haproxy", "router"):
            o = s[other]
            if o["any"]:
                rounds = " ".join(f"{x:.2f}" for x in per_round(rows, kind, "gateway", other))
                print(f"   {other:<15} {ratio(g['rps'], o['rps']):>10}   {ratio(g['p50'], o['p50']):>11}"
                      f"   {ratio(g['cpu'], o['cpu']):>7}   {rounds}")
        nolog = s["gateway-nolog"]
        if g["rps"] and nolog["rps"]:
            cpu = ""
            if g["cpu"] and nolog["cpu"]:
                cpu = f" and {(g['cpu'] / nolog['cpu'] - 1) * 100:.1f}% more CPU a request"
            rounds = " ".join(f"{(1 - x) * 100:.1f}%" for x in per_round(rows, kind, "gateway", "gateway-nolog"))
            print(f"   the access log costs {(1 - g['rps'] / nolog['rps']) * 100:.1f}% of the throughput{cpu}"
                  f" (gateway against gateway --access-log false; per round {rounds})")
        print()
        d = s["direct"]["p50"]
        added = []
        for p in PROXIES:
            if not s[p]["any"]:
                continue
            v = s[p]["p50"]
            added.append(f"{p} {fmt_delta(None if v is None or d is None else v - d)}")
        print("   p50 added vs direct: " + ", ".join(added))
    if args.streams:
        failed |= report_streams(args.streams)
    print()
    return 1 if failed else 0


def fmt_mb(b):
    return "n/a" if b is None else f"{b / 1e6:.1f} MB"


def report_streams(path):
    ttfb, rss = {}, {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            parts = line.split()
            if parts and parts[0] == "ttfb" and len(parts) == 5:
                ttfb.setdefault(parts[1], []).append(float(parts[4]) if parts[3] == "ok" else None)
            elif parts and parts[0] == "rss" and len(parts) == 7:
                ok = parts[3] == "ok"
                rss.setdefault(parts[1], {})[int(parts[2])] = (
                    (int(parts[4]), int(parts[5]), int(parts[6])) if ok else None)
    if not ttfb and not rss:
        return False
    counts = sorted({n for m in rss.values() for n in m if n})
    print()
    print("== Streams  (an event-stream upstream: TTFB over sequential requests, then streams held open at once)")
    print("   added TTFB: median over rounds of each round's p50, minus direct's; RSS: the proxy with its children")
    hdr = f"   {'target':<28}{'TTFB p50':>10}{'added':>10}{'RSS idle':>11}"
    for n in counts:
        hdr += f"{f'RSS {n:,}':>13}{'a stream':>10}{'whole':>14}"
    print(hdr)
    print("   " + "-" * (len(hdr) - 3))
    failed = False
    notes = []
    good = {t: [v for v in vs if v is not None] for t, vs in ttfb.items()}
    med = {t: statistics.median(v) if v else None for t, v in good.items()}
    direct = med.get("direct")
    for t in TARGETS:
        if t not in ttfb and t not in rss:
            continue
        m = med.get(t)
        if t in ttfb and m is None:
            failed = True
        added = None if m is None or direct is None or t == "direct" else m - direct
        row = f"   {LABELS.get(t, t):<28}{fmt_time(m):>10}{(fmt_delta(added) if t != 'direct' else ''):>10}"
        mine = rss.get(t, {})
        idle = mine.get(0)
        row += f"{(fmt_mb(idle[0]) if idle else ('' if t == 'direct' else 'n/a')):>11}"
        for n in counts:
            r = mine.get(n)
            if r is None:
                row += f"{('' if t == 'direct' else 'n/a'):>13}{'':>10}{'':>14}"
                failed |= t != "direct"
                continue
            per = (r[0] - idle[0]) / n / 1e3 if idle else None
            whole = f"{r[2]:,}/{n:,}" + ("" if r[1] >= n else "*")
            if r[1] < n:
                notes.append(f"{LABELS.get(t, t)}, {n:,}: at most {r[1]:,} streams were open at once; the RSS is at that point")
            row += f"{fmt_mb(r[0]):>13}{(f'{per:.1f} KB' if per is not None else 'n/a'):>10}{whole:>14}"
        print(row)
    for note in notes:
        print(f"   * {note}")
    # Each round's p50 minus direct's in the same round: whether the rounds agree on the order.
    added_rounds = []
    for t in PROXIES:
        if t not in ttfb or "direct" not in ttfb:
            continue
        pairs = zip(ttfb[t], ttfb["direct"])
        added_rounds.append(f"{t} " + " ".join(
            "-" if v is None or d is None else fmt_delta(v - d) for v, d in pairs))
    if added_rounds:
        print("   added TTFB per round: " + ", ".join(added_rounds))
    return failed


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("parse")
    p.add_argument("tool", choices=["wrk", "oha"])
    p.add_argument("file")
    r = sub.add_parser("report")
    r.add_argument("results")
    r.add_argument("--streams")
    r.add_argument("--duration", default="?")
    r.add_argument("--rounds", default="?")
    r.add_argument("--connections", default="?")
    r.add_argument("--tool", default="?")
    args = ap.parse_args()
    if args.cmd == "parse":
        return cmd_parse(args.tool, args.file)
    return cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
