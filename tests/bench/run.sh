#!/usr/bin/env bash
# Gateway proxy-overhead benchmark.
#
# What it measures
#   The cost of putting a reverse proxy between a client and vLLM's OpenAI
#   API, for the gateway and for two reference proxies. The "vLLM" here is an
#   nginx that answers POST /v1/responses instantly with a canned body taken
#   from tests/fixtures (a non-streaming tool-call reply, and a streaming SSE
#   reply), so the numbers are pure proxy overhead, not model time.
#
#   Four targets, each on its own loopback port:
#     direct   load generator -> upstream
#     nginx    load generator -> nginx (keep-alive pool, no buffering) -> upstream
#     haproxy  load generator -> haproxy (mode http, http-reuse always) -> upstream
#     gateway  load generator -> target/release/gateway -> upstream
#
#   For each body kind (json, sse) the targets are run in alternating rounds
#   (direct, nginx, haproxy, gateway, direct, nginx, ...) so slow drift of the
#   machine hits every target alike. Each run is a closed loop of
#   BENCH_CONNECTIONS keep-alive connections sending
#   {"model":"m","input":"hi"} (plus "stream":true for sse) for BENCH_DURATION
#   seconds.
#
# How to read the output
#   One table per body kind: the median over rounds of requests/s and of the
#   p50 / p99 latency, the error count and how many runs succeeded, plus the
#   per-round req/s so the spread is visible. Below it: gateway/nginx and
#   gateway/haproxy ratios (throughput above 1x and p50 below 1x favour the
#   gateway) and the p50 latency each proxy adds on top of the direct path.
#   Everything (load generator, proxy, upstream) shares this machine's cores,
#   so absolute numbers are machine-specific; compare the ratios. With many
#   connections the latencies are queueing-dominated (about connections /
#   throughput); run with BENCH_CONNECTIONS=1 for unloaded per-request latency.
#   A target that could not be started or verified, or whose every run failed,
#   shows n/a, and the script then exits 1 after printing everything.
#
# Knobs (environment)
#   BENCH_DURATION=10     seconds per measured run
#   BENCH_ROUNDS=3        rounds per body kind
#   BENCH_CONNECTIONS=64  concurrent keep-alive connections
#   BENCH_WARMUP=2        seconds of discarded load per target before round 1
#   BENCH_KINDS="json sse"  body kinds to run
#   BENCH_TOOL=           force the load generator: oha or wrk
#   GATEWAY_BIN=          use this gateway binary, skip cargo build
#   BENCH_GATEWAY_START_TIMEOUT=30  seconds the gateway gets to answer 200
#   BENCH_KEEP_WORKDIR=1  keep the temp dir (configs, logs, raw outputs)
#
# Usage: make bench   (or: bash tests/bench/run.sh)

set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$BENCH_DIR/../.." && pwd)"
FIXTURES="$ROOT/tests/fixtures"
JSON_FIXTURE="$FIXTURES/vllm-responses-toolcall-gpt-oss-20b.json"
SSE_FIXTURE="$FIXTURES/vllm-responses-stream-gpt-oss-20b.sse"

DURATION="${BENCH_DURATION:-10}"
ROUNDS="${BENCH_ROUNDS:-3}"
CONNECTIONS="${BENCH_CONNECTIONS:-64}"
WARMUP="${BENCH_WARMUP:-2}"
KINDS="${BENCH_KINDS:-json sse}"
TARGETS=(direct nginx haproxy gateway)

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

WORK=""
TOOL=""
OHA_JSON=()            # JSON-output flag: -j on older oha, --output-format json on newer
GATEWAY=""
declare -A PROCS=()    # name -> pid of every process this script started
declare -A PORT=()     # "<target>_<kind>" -> port
declare -A BROKEN=()   # "<target>_<kind>" -> reason the leg is not measured

log()  { printf '>> %s\n' "$*" >&2; }
warn() { printf '!! %s\n' "$*" >&2; }
die()  { printf 'error: %s\n' "$*" >&2; exit 1; }

for n in "$DURATION" "$ROUNDS" "$CONNECTIONS" "$WARMUP"; do
    [[ "$n" =~ ^[0-9]+$ ]] || die "BENCH_DURATION/ROUNDS/CONNECTIONS/WARMUP must be integers (got '$n')"
done
DURATION=$((10#$DURATION)) ROUNDS=$((10#$ROUNDS)) CONNECTIONS=$((10#$CONNECTIONS)) WARMUP=$((10#$WARMUP))
(( DURATION > 0 && ROUNDS > 0 && CONNECTIONS > 0 )) || die "duration, rounds and connections must be > 0"

# ---------------------------------------------------------------------------
# process bookkeeping
# ---------------------------------------------------------------------------

# spawn NAME CMD...: start CMD in the background, output to $WORK/NAME.log.
spawn() {
    local name="$1"; shift
    "$@" >"$WORK/$name.log" 2>&1 &
    PROCS[$name]=$!
}

# gone PID: the process has exited (no such pid, or a zombie not yet reaped).
gone() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
    stat="${stat##*) }"
    [[ "${stat%% *}" == Z ]]
}

alive() { [[ -n "${PROCS[$1]:-}" ]] && ! gone "${PROCS[$1]}"; }

# stop NAME: SIGTERM, up to 5 s grace, then SIGKILL. Deliberately no `wait`
# here: stop also runs from the signal trap, where a nested wait can hang;
# bash reaps its exited children by itself.
stop() {
    local name="$1" pid="${PROCS[$1]:-}" i
    [[ -n "$pid" ]] || return 0
    unset "PROCS[$name]"
    gone "$pid" && return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        gone "$pid" && return 0
        sleep 0.1
    done
    warn "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? name
    trap - EXIT INT TERM
    # gateway first, then the proxies, the upstream last
    for name in load gateway_sse gateway_json haproxy nginx_proxy upstream "${!PROCS[@]}"; do
        stop "$name"
    done
    if [[ -n "$WORK" && -d "$WORK" ]]; then
        if [[ "${BENCH_KEEP_WORKDIR:-0}" == 1 ]]; then
            log "work dir kept: $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}

# ---------------------------------------------------------------------------
# dependencies
# ---------------------------------------------------------------------------

APT_UPDATED=0
SUDO=()
apt_update() {
    (( ! APT_UPDATED )) || return 0
    if [[ $EUID -ne 0 ]]; then
        command -v sudo >/dev/null || die "need root (or sudo) to install packages with apt-get"
        SUDO=(sudo)
    fi
    log "apt-get update"
    "${SUDO[@]}" apt-get update -q >/dev/null
    APT_UPDATED=1
}

apt_install() {
    apt_update
    log "apt-get install $*"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

# apt_has PKG: apt knows an installable candidate for PKG.
apt_has() {
    local cand
    cand="$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')"
    [[ -n "$cand" && "$cand" != "(none)" ]]
}

install_deps() {
    local want=()
    command -v curl >/dev/null || want+=(curl)
    command -v python3 >/dev/null || want+=(python3)
    command -v nginx >/dev/null || want+=(nginx-light)
    command -v haproxy >/dev/null || want+=(haproxy)
    (( ${#want[@]} == 0 )) || apt_install "${want[@]}"

    case "${BENCH_TOOL:-}" in
        oha|wrk) TOOL="$BENCH_TOOL" ;;
        "")
            if command -v oha >/dev/null; then
                TOOL=oha
            else
                # apt lists may be empty on a fresh image: refresh them before
                # concluding that apt has no oha, unless wrk is already here.
                command -v wrk >/dev/null || apt_update
                if apt_has oha; then TOOL=oha; else TOOL=wrk; fi
            fi
            ;;
        *) die "BENCH_TOOL must be oha or wrk" ;;
    esac
    command -v "$TOOL" >/dev/null || apt_install "$TOOL"
    command -v "$TOOL" >/dev/null || die "$TOOL is not installed"
    if [[ "$TOOL" == oha ]]; then
        if oha --help 2>&1 | grep -q -- '--output-format'; then OHA_JSON=(--output-format json); else OHA_JSON=(-j); fi
    fi
}

build_gateway() {
    if [[ -n "${GATEWAY_BIN:-}" ]]; then
        GATEWAY="$GATEWAY_BIN"
        log "gateway: $GATEWAY (GATEWAY_BIN, not building)"
        return 0
    fi
    log "cargo build --release --bin gateway"
    if (cd "$ROOT" && cargo build --release --bin gateway); then
        GATEWAY="${CARGO_TARGET_DIR:-$ROOT/target}/release/gateway"
        [[ "$GATEWAY" = /* ]] || GATEWAY="$ROOT/$GATEWAY"
    else
        warn "cargo build failed: the gateway leg will be reported as n/a"
        GATEWAY=""
    fi
}

# ---------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------

# Ask the kernel for N currently free loopback ports.
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

allocate_ports() {
    local ports
    read -r -a ports <<<"$(free_ports 8)"
    PORT[direct_json]=${ports[0]}  PORT[direct_sse]=${ports[1]}
    PORT[nginx_json]=${ports[2]}   PORT[nginx_sse]=${ports[3]}
    PORT[haproxy_json]=${ports[4]} PORT[haproxy_sse]=${ports[5]}
    PORT[gateway_json]=${ports[6]} PORT[gateway_sse]=${ports[7]}
}

# render TEMPLATE OUT: fill in @WORK@ and the @*_PORT@ placeholders.
render() {
    sed -e "s|@WORK@|$WORK|g" \
        -e "s|@UP_JSON_PORT@|${PORT[direct_json]}|g" \
        -e "s|@UP_SSE_PORT@|${PORT[direct_sse]}|g" \
        -e "s|@NGINX_JSON_PORT@|${PORT[nginx_json]}|g" \
        -e "s|@NGINX_SSE_PORT@|${PORT[nginx_sse]}|g" \
        -e "s|@HAPROXY_JSON_PORT@|${PORT[haproxy_json]}|g" \
        -e "s|@HAPROXY_SSE_PORT@|${PORT[haproxy_sse]}|g" \
        "$1" >"$2"
    if grep -q '@[A-Z_]*@' "$2"; then die "unfilled placeholder in $2"; fi
}

prepare_workdir() {
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/gateway-bench.XXXXXX")"
    # nginx workers run as an unprivileged user when started as root and must
    # be able to read the canned bodies.
    chmod 755 "$WORK"
    mkdir -p "$WORK/www" "$WORK/tmp" "$WORK/out"
    cp "$JSON_FIXTURE" "$WORK/www/response.json"
    cp "$SSE_FIXTURE" "$WORK/www/response.sse"
    chmod 644 "$WORK/www/"*
    chmod 755 "$WORK/www"
    printf '{"model":"m","input":"hi"}' >"$WORK/request.json"
    printf '{"model":"m","input":"hi","stream":true}' >"$WORK/request.sse"
    allocate_ports
    render "$BENCH_DIR/upstream.nginx.conf.in" "$WORK/upstream.nginx.conf"
    render "$BENCH_DIR/proxy.nginx.conf.in" "$WORK/proxy.nginx.conf"
    render "$BENCH_DIR/haproxy.cfg.in" "$WORK/haproxy.cfg"
    : >"$WORK/results.tsv"
}

url()     { printf 'http://127.0.0.1:%s/v1/responses' "${PORT[$1_$2]}"; }
fixture() { if [[ "$1" == json ]]; then printf '%s' "$JSON_FIXTURE"; else printf '%s' "$SSE_FIXTURE"; fi; }

# post TARGET KIND OUTFILE: one request; prints "<status> <content-type>".
post() {
    curl -sS -X POST --max-time 5 -H 'content-type: application/json' \
        --data-binary "@$WORK/request.$2" -o "$3" \
        -w '%{http_code} %{content_type}' "$(url "$1" "$2")" 2>/dev/null || true
}

# wait_ready PROC TARGET KIND SECONDS: until a POST answers 200 or PROC exits.
wait_ready() {
    local proc="$1" target="$2" kind="$3" secs="$4" i status
    for ((i = 0; i < secs * 10; i++)); do
        alive "$proc" || return 1
        status="$(post "$target" "$kind" /dev/null)"
        [[ "${status%% *}" == 200 ]] && return 0
        sleep 0.1
    done
    return 1
}

mark_broken() {
    BROKEN[$1_$2]="$3"
    warn "$1 ($2): $3 -- this leg will show n/a"
}

# Tail of a process log, indented, for diagnostics.
show_log() {
    [[ -s "$WORK/$1.log" ]] && tail -n 5 "$WORK/$1.log" | sed 's/^/     | /' >&2
    return 0
}

start_upstream() {
    log "starting upstream nginx on :${PORT[direct_json]} (json) and :${PORT[direct_sse]} (sse)"
    spawn upstream nginx -p "$WORK" -e "$WORK/upstream.error.log" -c "$WORK/upstream.nginx.conf"
    if ! wait_ready upstream direct json 10 || ! wait_ready upstream direct sse 5; then
        show_log upstream
        cat "$WORK/upstream.error.log" >&2 2>/dev/null || true
        die "upstream nginx did not come up"
    fi
}

# await_proxy PROC TARGET KIND: wait for the proxy or mark its leg broken.
await_proxy() {
    local proc="$1" target="$2" kind="$3"
    [[ -z "${BROKEN[${target}_$kind]:-}" ]] || return 0
    wait_ready "$proc" "$target" "$kind" 10 && return 0
    if alive "$proc"; then
        mark_broken "$target" "$kind" "no 200 from POST /v1/responses within 10s"
    else
        mark_broken "$target" "$kind" "process exited during startup"
    fi
    show_log "$proc"
}

start_proxies() {
    log "starting nginx proxy on :${PORT[nginx_json]}/:${PORT[nginx_sse]}"
    spawn nginx_proxy nginx -p "$WORK" -e "$WORK/proxy.error.log" -c "$WORK/proxy.nginx.conf"
    log "starting haproxy on :${PORT[haproxy_json]}/:${PORT[haproxy_sse]}"
    spawn haproxy haproxy -db -f "$WORK/haproxy.cfg"
    local kind
    for kind in $KINDS; do
        await_proxy nginx_proxy nginx "$kind"
        await_proxy haproxy haproxy "$kind"
    done
}

# The gateway takes a single upstream, so one instance per body kind.
start_gateway() {
    local kind="$1"
    if [[ -z "$GATEWAY" ]]; then mark_broken gateway "$kind" "no gateway binary (build failed)"; return 0; fi
    log "starting gateway ($kind) on :${PORT[gateway_$kind]} -> :${PORT[direct_$kind]}"
    spawn "gateway_$kind" "$GATEWAY" --llm-api-base "http://127.0.0.1:${PORT[direct_$kind]}" \
        --host 127.0.0.1 --port "${PORT[gateway_$kind]}" --log-level warn
    if ! wait_ready "gateway_$kind" gateway "$kind" "${BENCH_GATEWAY_START_TIMEOUT:-30}"; then
        if alive "gateway_$kind"; then
            mark_broken gateway "$kind" "no 200 from POST /v1/responses within ${BENCH_GATEWAY_START_TIMEOUT:-30}s"
        else
            mark_broken gateway "$kind" "process exited during startup"
        fi
        show_log "gateway_$kind"
        stop "gateway_$kind"
    fi
}

# verify TARGET KIND: status 200, the fixture's content type and bytes.
verify() {
    local target="$1" kind="$2" out="$WORK/out/verify-$1-$2" status ctype want
    [[ -z "${BROKEN[${target}_$kind]:-}" ]] || return 0
    status="$(post "$target" "$kind" "$out")"
    ctype="${status#* }"; status="${status%% *}"
    if [[ "$status" != 200 ]]; then
        mark_broken "$target" "$kind" "POST answered '${status:-no response}'"
        return 0
    fi
    if [[ "$kind" == json ]]; then want="application/json"; else want="text/event-stream; charset=utf-8"; fi
    [[ "${ctype,,}" == "${want,,}" ]] || warn "$target ($kind): content-type '$ctype', expected '$want'"
    if cmp -s "$out" "$(fixture "$kind")"; then
        log "verified $target ($kind): 200, $(wc -c <"$out") bytes identical to the fixture"
    else
        warn "$target ($kind): body differs from the fixture ($(wc -c <"$out") vs $(wc -c <"$(fixture "$kind")") bytes)"
    fi
}

print_versions() {
    echo "== environment"
    echo "   nproc:    $(nproc)"
    echo "   kernel:   $(uname -sr)"
    echo "   nginx:    $(nginx -v 2>&1 | head -n1)"
    echo "   haproxy:  $(haproxy -v 2>&1 | head -n1)"
    if [[ "$TOOL" == oha ]]; then
        echo "   load:     $(oha --version 2>&1 | head -n1)"
    else
        echo "   load:     $(wrk -v 2>&1 | head -n1)"
    fi
    local gwv=""
    [[ -z "$GATEWAY" ]] || gwv="$(timeout 3 "$GATEWAY" --version 2>/dev/null | head -n1 || true)"
    echo "   gateway:  ${GATEWAY:-n/a}${gwv:+ ($gwv)}"
    echo "   request:  POST /v1/responses $(cat "$WORK/request.json") / $(cat "$WORK/request.sse")"
    echo "   bodies:   json $(wc -c <"$JSON_FIXTURE") bytes, sse $(wc -c <"$SSE_FIXTURE") bytes"
}

# ---------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------

# load_run TARGET KIND SECONDS OUTFILE: one load-generator run, bounded in time.
load_run() {
    local target="$1" kind="$2" secs="$3" out="$4" threads
    local -a cmd
    threads=$(nproc)
    (( threads <= CONNECTIONS )) || threads=$CONNECTIONS
    if [[ "$TOOL" == oha ]]; then
        cmd=(oha --no-tui "${OHA_JSON[@]}" -z "${secs}s" -c "$CONNECTIONS" -m POST
             -H 'content-type: application/json' -D "$WORK/request.$kind" "$(url "$target" "$kind")")
    else
        cmd=(env "BENCH_REQUEST_BODY=$(cat "$WORK/request.$kind")"
             wrk -t "$threads" -c "$CONNECTIONS" -d "${secs}s" --timeout 10s --latency
             -s "$BENCH_DIR/post.lua" "$(url "$target" "$kind")")
    fi
    # In the background plus wait, so that Ctrl-C / SIGTERM reach the trap at
    # once instead of after the run; timeout bounds a wedged load generator.
    local rc=0
    spawn load timeout -k 5 $((secs + 30)) "${cmd[@]}"
    wait "${PROCS[load]}" || rc=$?
    unset "PROCS[load]"
    mv "$WORK/load.log" "$out"
    return "$rc"
}

# proc_of TARGET KIND: name of the process that serves TARGET.
proc_of() {
    case "$1" in
        direct) echo upstream ;;
        nginx) echo nginx_proxy ;;
        haproxy) echo haproxy ;;
        gateway) echo "gateway_$2" ;;
    esac
}

# measure TARGET KIND ROUND: one measured run, appended to results.tsv.
measure() {
    local target="$1" kind="$2" round="$3" out parsed rps p50 p99 errors
    out="$WORK/out/$kind-$target-$round.txt"
    if [[ -z "${BROKEN[${target}_$kind]:-}" ]] && ! alive "$(proc_of "$target" "$kind")"; then
        mark_broken "$target" "$kind" "process is gone"
    fi
    if [[ -n "${BROKEN[${target}_$kind]:-}" ]]; then
        echo "$kind $target $round fail - - - -" >>"$WORK/results.tsv"
        return 0
    fi
    if load_run "$target" "$kind" "$DURATION" "$out" \
        && parsed="$(python3 "$BENCH_DIR/report.py" parse "$TOOL" "$out")"; then
        read -r rps p50 p99 errors _ <<<"$parsed"
        awk -v k="$kind" -v r="$round" -v t="$target" -v rps="$rps" -v p50="$p50" -v p99="$p99" -v e="$errors" \
            'BEGIN { printf "   %-4s round %d  %-8s %9.0f req/s  p50 %8.3fms  p99 %8.3fms  errors %d\n", k, r, t, rps, p50 * 1e3, p99 * 1e3, e }' >&2
        echo "$kind $target $round ok $rps $p50 $p99 $errors" >>"$WORK/results.tsv"
    else
        warn "$target ($kind) round $round failed; output in $out:"
        tail -n 5 "$out" | sed 's/^/     | /' >&2 || true
        echo "$kind $target $round fail - - - -" >>"$WORK/results.tsv"
    fi
}

bench_kind() {
    local kind="$1" target round
    start_gateway "$kind"
    for target in "${TARGETS[@]}"; do verify "$target" "$kind"; done
    if (( WARMUP > 0 )); then
        log "warm-up ($kind): ${WARMUP}s per target"
        for target in "${TARGETS[@]}"; do
            [[ -z "${BROKEN[${target}_$kind]:-}" ]] || continue
            load_run "$target" "$kind" "$WARMUP" "$WORK/out/$kind-$target-warmup.txt" || true
        done
    fi
    log "measuring ($kind): $ROUNDS round(s) x ${#TARGETS[@]} targets x ${DURATION}s"
    for ((round = 1; round <= ROUNDS; round++)); do
        for target in "${TARGETS[@]}"; do measure "$target" "$kind" "$round"; done
    done
    stop "gateway_$kind"
}

main() {
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    [[ -f "$JSON_FIXTURE" && -f "$SSE_FIXTURE" ]] || die "fixtures missing under $FIXTURES"
    install_deps
    build_gateway
    prepare_workdir
    start_upstream
    start_proxies

    local kind
    for kind in $KINDS; do
        [[ "$kind" == json || "$kind" == sse ]] || die "BENCH_KINDS: unknown kind '$kind'"
        bench_kind "$kind"
    done

    echo
    print_versions
    python3 "$BENCH_DIR/report.py" report "$WORK/results.tsv" --duration "$DURATION" \
        --rounds "$ROUNDS" --connections "$CONNECTIONS" --tool "$TOOL"
}

main "$@"
