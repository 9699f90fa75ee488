#!/usr/bin/env bash
# How many instructions a forwarded JSON request costs the gateway, counted by valgrind's callgrind.
#
# CPU time on a shared machine moves by several percent from run to run, more than most single
# changes to the request path; instructions counted in user space move by a few tenths of a
# percent, so a change of one percent shows. (They leave out the kernel and what a cache miss
# costs: a change that moves them is then confirmed with `make bench`.)
#
# The upstream is the bench's nginx answering the 4 KB Responses body at once (as `json` in
# run.sh); the gateway runs its release build under callgrind; oha sends INSTR_WARMUP requests,
# then the counters are zeroed, INSTR_REQUESTS are sent and the counters dumped. Prints the
# instructions a request, and keeps the dump for `callgrind_annotate`.
#
# Settings (environment):
#   INSTR_REQUESTS=3000   requests counted
#   INSTR_WARMUP=2000     requests before the count
#   INSTR_CONNECTIONS=8   keep-alive connections
#   INSTR_OUT=            where the dump goes (default: target/bench-instructions)
#   GATEWAY_BIN=          use this gateway binary, skip cargo build
#   GATEWAY_EXTRA_ARGS=   more arguments for the gateway
#
# Usage: make bench-instructions   (or: bash tests/bench/instructions.sh)

set -euo pipefail

# shellcheck source=tests/bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
REQUESTS="${INSTR_REQUESTS:-3000}"
WARMUP="${INSTR_WARMUP:-2000}"
CONNECTIONS="${INSTR_CONNECTIONS:-8}"
OUT="${INSTR_OUT:-$TARGET_DIR/bench-instructions}"

for n in "$REQUESTS" "$WARMUP" "$CONNECTIONS"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "INSTR_REQUESTS/WARMUP/CONNECTIONS must be positive integers (got '$n')"
done

want=()
command -v valgrind >/dev/null || want+=(valgrind)
command -v nginx >/dev/null || want+=(nginx-light)
command -v curl >/dev/null || want+=(curl)
(( ${#want[@]} == 0 )) || apt_install "${want[@]}"
install_oha || die "oha is needed"
build_gateway || die "cargo build failed"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gateway-instructions.XXXXXX")"
NGINX_PID="" GATEWAY_PID=""
cleanup() {
    [[ -z "$GATEWAY_PID" ]] || kill "$GATEWAY_PID" 2>/dev/null || true
    [[ -z "$NGINX_PID" ]] || kill "$NGINX_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
stage_upstream "$WORK"
mkdir -p "$OUT"
read -r UP_JSON UP_SSE GATEWAY_PORT <<<"$(free_ports 3)"
sed -e "s|@WORK@|$WORK|g" -e "s|@UP_JSON_PORT@|$UP_JSON|g" -e "s|@UP_SSE_PORT@|$UP_SSE|g" \
    "$BENCH_DIR/upstream.nginx.conf.in" >"$WORK/upstream.nginx.conf"
grep -q '@[A-Z_]*@' "$WORK/upstream.nginx.conf" && die "unfilled placeholder in the nginx config"

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

nginx -c "$WORK/upstream.nginx.conf" -p "$WORK" >"$WORK/nginx.log" 2>&1 &
NGINX_PID=$!
wait_for "$UP_JSON" 10 "the nginx upstream"

rm -f "$OUT"/callgrind.out*
# shellcheck disable=SC2086
valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" \
    "$GATEWAY" --llm-api-base "http://127.0.0.1:$UP_JSON" --host 127.0.0.1 --port "$GATEWAY_PORT" \
    --log-format json ${GATEWAY_EXTRA_ARGS:-} >"$WORK/gateway.log" 2>&1 &
GATEWAY_PID=$!
wait_for "$GATEWAY_PORT" 120 "the gateway under callgrind"

load() {
    "$OHA" -n "$1" -c "$CONNECTIONS" --no-tui -m POST -H 'content-type: application/json' \
        -D "$WORK/request.json" "http://127.0.0.1:$GATEWAY_PORT/v1/responses" >"$WORK/oha.txt" 2>&1 \
        || die "oha failed: $(tail -3 "$WORK/oha.txt")"
}
log "$WARMUP requests of warm-up, then $REQUESTS counted"
load "$WARMUP"
callgrind_control -z "$GATEWAY_PID" >/dev/null 2>&1
load "$REQUESTS"
callgrind_control -d "$GATEWAY_PID" >/dev/null 2>&1
grep -Eq 'Success rate:[[:space:]]+100' "$WORK/oha.txt" || die "some requests failed: $(grep -i 'success' "$WORK/oha.txt")"

dump="$(grep -l '^desc: Trigger: dump' "$OUT"/callgrind.out* | head -1)"
[[ -n "$dump" ]] || die "callgrind wrote no dump"
total="$(sed -n 's/^summary: *//p' "$dump")"
[[ "$total" =~ ^[0-9]+$ ]] || die "no instruction count in $dump"
printf '%s instructions a request (%s requests, %s connections; %s: callgrind_annotate %s)\n' \
    "$((total / REQUESTS))" "$REQUESTS" "$CONNECTIONS" "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')" "$dump"
