#!/usr/bin/env bash
# How many instructions a forwarded request costs the gateway, and a peer proxy beside it,
# counted by valgrind's callgrind.
#
# CPU time on a shared machine moves by several percent from run to run, more than most single
# changes to the request path; instructions counted in user space move by a few tenths of a
# percent, so a change of one percent shows. (They leave out the kernel and what a cache miss
# costs: a change that moves them is then confirmed with `make bench`.)
#
# Two kinds of request, each against the upstream `make bench` uses for it:
#   json     the bench's nginx answers the 4 KB Responses body at once; oha sends the requests
#            over INSTR_CONNECTIONS keep-alive connections.
#   streams  streams.py's event stream, one event and its end at once, under real vLLM's head;
#            the requests go one after another on one connection (streams.py ttfb), as in the
#            bench's time to first byte.
# Each target runs under callgrind (the gateway's release build; HAProxy with the bench's
# configuration, threads and all); INSTR_WARMUP requests are sent, the counters zeroed,
# INSTR_REQUESTS sent and the counters dumped. Prints the instructions a request of each target,
# and how much code they run (footprint.py: the 64-byte lines and the 4 KiB pages holding an
# instruction executed once a request or more; what a request pays for when other processes have
# run since its last turn and the caches and TLBs hold their code), and keeps the dumps for
# `callgrind_annotate`.
#
# Settings (environment):
#   INSTR_KIND=json        json or streams
#   INSTR_TARGETS=gateway  targets, among gateway and haproxy (e.g. "gateway haproxy")
#   INSTR_REQUESTS=3000    requests counted
#   INSTR_WARMUP=2000      requests before the count
#   INSTR_CONNECTIONS=8    keep-alive connections (json)
#   INSTR_OUT=             where the dumps go (default: target/bench-instructions)
#   GATEWAY_BIN=           use this gateway binary, skip the build
#   GATEWAY_EXTRA_ARGS=    more arguments for the gateway
#
# Usage: make bench-instructions   (or: bash tests/bench/instructions.sh)

set -euo pipefail

# shellcheck source=tests/bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
KIND="${INSTR_KIND:-json}"
read -r -a TARGETS <<<"${INSTR_TARGETS:-gateway}"
REQUESTS="${INSTR_REQUESTS:-3000}"
WARMUP="${INSTR_WARMUP:-2000}"
CONNECTIONS="${INSTR_CONNECTIONS:-8}"
OUT="${INSTR_OUT:-$TARGET_DIR/bench-instructions}"

for n in "$REQUESTS" "$WARMUP" "$CONNECTIONS"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "INSTR_REQUESTS/WARMUP/CONNECTIONS must be positive integers (got '$n')"
done
[[ "$KIND" == json || "$KIND" == streams ]] || die "INSTR_KIND must be json or streams (got '$KIND')"
(( ${#TARGETS[@]} > 0 )) || die "INSTR_TARGETS names no target"
for target in "${TARGETS[@]}"; do
    [[ "$target" == gateway || "$target" == haproxy ]] || die "unknown target '$target' (gateway, haproxy)"
done

want=()
command -v valgrind >/dev/null || want+=(valgrind)
command -v curl >/dev/null || want+=(curl)
[[ "$KIND" != json ]] || command -v nginx >/dev/null || want+=(nginx-light)
[[ " ${TARGETS[*]} " != *" haproxy "* ]] || command -v haproxy >/dev/null || want+=(haproxy)
(( ${#want[@]} == 0 )) || apt_install "${want[@]}"
[[ "$KIND" != json ]] || install_oha || die "oha is needed"
[[ " ${TARGETS[*]} " != *" gateway "* ]] || build_gateway || die "make build failed"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gateway-instructions.XXXXXX")"
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
stage_upstream "$WORK"
mkdir -p "$OUT"
# The proxy under test listens on the kind's port; HAProxy's frontends for the other kinds (it
# refuses port 0) take the others.
read -r UP_JSON UP_SSE UP_STREAMS PROXY_JSON PROXY_SSE PROXY_STREAMS <<<"$(free_ports 6)"
PROXY_PORT="$PROXY_JSON"
[[ "$KIND" == json ]] || PROXY_PORT="$PROXY_STREAMS"

if [[ "$KIND" == json ]]; then
    UPSTREAM_PORT="$UP_JSON"
    fill "$BENCH_DIR/upstream.nginx.conf.in" "$WORK/upstream.nginx.conf" \
        WORK="$WORK" UP_JSON_PORT="$UP_JSON" UP_SSE_PORT="$UP_SSE"
    nginx -c "$WORK/upstream.nginx.conf" -p "$WORK" >"$WORK/upstream.log" 2>&1 &
else
    UPSTREAM_PORT="$UP_STREAMS"
    printf '{"model":"m","input":"hello","stream":true,"bench_events":1,"bench_interval":0}' \
        >"$WORK/request.json"
    python3 "$BENCH_DIR/streams.py" upstream "$UP_STREAMS" >"$WORK/upstream.log" 2>&1 &
fi
PIDS+=($!)

post() {
    curl -s -o /dev/null -w '%{http_code}' --max-time 5 -X POST -H 'content-type: application/json' \
        --data-binary "@$WORK/request.json" "http://127.0.0.1:$1/v1/responses" || true
}
# wait_for PORT SECONDS WHAT: until a POST through PORT answers 200.
wait_for() {
    local deadline=$((SECONDS + $2))
    until [[ "$(post "$1")" == 200 ]]; do
        (( SECONDS < deadline )) || die "$3 did not answer 200 within $2 s (logs in $WORK)"
        sleep 0.2
    done
}
wait_for "$UPSTREAM_PORT" 10 "the upstream"

# load COUNT: COUNT requests through the proxy under test; fails unless all of them answered.
load() {
    if [[ "$KIND" == json ]]; then
        "$OHA" -n "$1" -c "$CONNECTIONS" --no-tui -m POST -H 'content-type: application/json' \
            -D "$WORK/request.json" "http://127.0.0.1:$PROXY_PORT/v1/responses" >"$WORK/load.txt" 2>&1 \
            || die "oha failed: $(tail -3 "$WORK/load.txt")"
        grep -Eq 'Success rate:[[:space:]]+100' "$WORK/load.txt" \
            || die "some requests failed: $(grep -i 'success' "$WORK/load.txt")"
    else
        timeout 600 python3 "$BENCH_DIR/streams.py" ttfb "$1" "http://127.0.0.1:$PROXY_PORT/v1/responses" \
            >"$WORK/load.txt" 2>&1 || die "streams.py failed: $(tail -3 "$WORK/load.txt")"
        [[ "$(awk '{ print $3 }' "$WORK/load.txt")" == "$1" ]] \
            || die "some streams failed: $(cat "$WORK/load.txt")"
    fi
}

# count TARGET: runs TARGET under callgrind and prints its instructions a request.
count() {
    local target="$1" pid dump total lines pages
    local prefix="$OUT/callgrind.$KIND.$target.out"
    rm -f "$prefix"*
    case "$target" in
        gateway)
            # shellcheck disable=SC2086
            valgrind --tool=callgrind --dump-instr=yes --callgrind-out-file="$prefix" \
                "$GATEWAY" --llm-api-base "http://127.0.0.1:$UPSTREAM_PORT" --host 127.0.0.1 \
                --port "$PROXY_PORT" --log-format json ${GATEWAY_EXTRA_ARGS:-} >"$WORK/$target.log" 2>&1 &
            ;;
        haproxy)
            fill "$BENCH_DIR/haproxy.cfg.in" "$WORK/haproxy.cfg" WORK="$WORK" \
                UP_JSON_PORT="$UP_JSON" UP_SSE_PORT="$UP_SSE" UP_STREAMS_PORT="$UP_STREAMS" \
                HAPROXY_JSON_PORT="$PROXY_JSON" HAPROXY_SSE_PORT="$PROXY_SSE" \
                HAPROXY_STREAMS_PORT="$PROXY_STREAMS"
            valgrind --tool=callgrind --dump-instr=yes --callgrind-out-file="$prefix" \
                haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/$target.log" 2>&1 &
            ;;
    esac
    pid=$!
    PIDS+=("$pid")
    wait_for "$PROXY_PORT" 120 "$target under callgrind"
    log "$target ($KIND): $WARMUP requests of warm-up, then $REQUESTS counted"
    load "$WARMUP"
    callgrind_control -z "$pid" >/dev/null 2>&1
    load "$REQUESTS"
    callgrind_control -d "$pid" >/dev/null 2>&1
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true

    dump="$(grep -l '^desc: Trigger: dump' "$prefix"* | head -1)"
    [[ -n "$dump" ]] || die "callgrind wrote no dump for $target"
    total="$(sed -n 's/^summary: *//p' "$dump")"
    [[ "$total" =~ ^[0-9]+$ ]] || die "no instruction count in $dump"
    read -r lines pages <<<"$(python3 "$BENCH_DIR/footprint.py" "$dump" "$REQUESTS")"
    printf '%-8s %s instructions a request, in %s lines of code (%s KiB) on %s pages (%s: callgrind_annotate %s)\n' \
        "$target" "$((total / REQUESTS))" "$lines" "$((lines * 64 / 1024))" "$pages" "$KIND" "$dump"
}

log "$KIND: $REQUESTS requests counted a target ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'))"
for target in "${TARGETS[@]}"; do count "$target"; done
