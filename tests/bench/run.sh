#!/usr/bin/env bash
# Gateway proxy-overhead benchmark.
#
# What it measures
#   The cost of putting a reverse proxy between a client and vLLM's OpenAI
#   API, for the gateway and for three peers: nginx, HAProxy and the vLLM
#   project's own router (PyPI `vllm-router`). The "vLLM" is a stand-in that
#   does no work, so the numbers are pure proxy overhead, not model time.
#
#   Targets, each on its own loopback port:
#     direct         load generator -> upstream
#     nginx          -> nginx (keep-alive pool, no buffering) -> upstream
#     haproxy        -> haproxy (mode http, http-reuse always) -> upstream
#     gateway        -> target/release/gateway (access log on, the default) -> upstream
#     gateway-nolog  -> the gateway with --access-log false -> upstream
#     router         -> vllm-router (round_robin, token bucket lifted) -> upstream
#
#   Kinds:
#     json     an nginx answers POST /v1/responses at once with a canned 4 KB
#              Responses body. oha (wrk as a fallback) runs BENCH_CONNECTIONS
#              keep-alive connections POSTing
#              {"model":"m","input":"hello","stream":false} for BENCH_DURATION
#              seconds; the targets take turns round by round, in an order
#              shuffled each round, and the table shows medians, with the CPU
#              time a request took the proxy's processes and the whole machine
#              (from /proc).
#     sse      the same with a canned 31 KB event-stream body sent in one piece.
#     streams  an event-stream upstream (streams.py) that sends 10 events 1 s
#              apart. Added time to first byte: 300 sequential requests per
#              target and round, the targets taking turns request by request
#              (a drifting machine then slows all alike), p50 minus the direct
#              p50. Memory: the proxy's RSS (with its child processes) idle,
#              with 1,000 and with 8,000 streams open at once, and how many of
#              those streams arrived whole.
#
#   Everything (load generator, proxy, upstream) shares this machine's cores,
#   so absolute numbers are machine-specific: compare the ratios within a run.
#   A target that could not be started or verified, or whose every run failed,
#   shows n/a, and the script then exits 1 after printing everything.
#
# Knobs (environment)
#   BENCH_DURATION=5      seconds per measured run
#   BENCH_ROUNDS=9        rounds (json, sse: load runs; streams: TTFB runs)
#   BENCH_CONNECTIONS=32  concurrent keep-alive connections
#   BENCH_WARMUP=2        seconds of discarded load per target before round 1
#   BENCH_KINDS="json streams"  kinds to run (json, sse, streams)
#   BENCH_TARGETS=        only these targets (direct is always measured)
#   BENCH_TOOL=           force the load generator: oha or wrk
#   BENCH_TTFB_REQUESTS=300          sequential requests per TTFB run
#   BENCH_STREAM_COUNTS="1000 8000"  open streams for the memory figures
#   BENCH_STREAM_EVENTS=10 BENCH_STREAM_INTERVAL=1   events per stream, seconds apart
#   GATEWAY_BIN=          use this gateway binary, skip the build
#   GATEWAY_EXTRA_ARGS=   more arguments for both gateway targets
#   BENCH_GATEWAY_START_TIMEOUT=30  seconds the gateway gets to answer 200
#   BENCH_KEEP_WORKDIR=1  keep the temp dir (configs, logs, raw outputs)
#
# Usage: make bench   (or: bash tests/bench/run.sh)

set -euo pipefail

# shellcheck source=tests/bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ROUTER_VERSION=0.1.17

DURATION="${BENCH_DURATION:-5}"
ROUNDS="${BENCH_ROUNDS:-9}"
CONNECTIONS="${BENCH_CONNECTIONS:-32}"
WARMUP="${BENCH_WARMUP:-2}"
KINDS="${BENCH_KINDS:-json streams}"
TTFB_REQUESTS="${BENCH_TTFB_REQUESTS:-300}"
STREAM_COUNTS="${BENCH_STREAM_COUNTS:-1000 8000}"
STREAM_EVENTS="${BENCH_STREAM_EVENTS:-10}"
STREAM_INTERVAL="${BENCH_STREAM_INTERVAL:-1}"
ALL_TARGETS=(direct nginx haproxy gateway gateway-nolog router)
read -r -a TARGETS <<<"direct ${BENCH_TARGETS:-nginx haproxy gateway gateway-nolog router}"

WORK=""
HZ="$(getconf CLK_TCK)"  # clock ticks a second, the unit of /proc/*/stat and /proc/stat
TOOL=""
OHA=oha
OHA_JSON=()            # JSON-output flag: -j on older oha, --output-format json on newer
GATEWAY=""
ROUTER=""
declare -A PROCS=()    # name -> pid of every process this script started
declare -A PORT=()     # "<target>_<kind>" -> port
declare -A BROKEN=()   # "<target>_<kind>" -> reason the leg is not measured

for n in "$DURATION" "$ROUNDS" "$CONNECTIONS" "$WARMUP" "$TTFB_REQUESTS" "$STREAM_EVENTS" $STREAM_COUNTS; do
    [[ "$n" =~ ^[0-9]+$ ]] || die "BENCH_DURATION/ROUNDS/CONNECTIONS/WARMUP/TTFB_REQUESTS/STREAM_* must be integers (got '$n')"
done
[[ "$STREAM_INTERVAL" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "BENCH_STREAM_INTERVAL must be a number of seconds"
DURATION=$((10#$DURATION)) ROUNDS=$((10#$ROUNDS)) CONNECTIONS=$((10#$CONNECTIONS)) WARMUP=$((10#$WARMUP))
(( DURATION > 0 && ROUNDS > 0 && CONNECTIONS > 0 )) || die "duration, rounds and connections must be > 0"
for t in "${TARGETS[@]}"; do
    [[ " ${ALL_TARGETS[*]} " == *" $t "* ]] || die "BENCH_TARGETS: unknown target '$t'"
done

# Every open stream costs a proxy two descriptors: take all the open-files limit allows.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

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
    # load first, then the proxies, the upstreams last
    for name in load "${!PROCS[@]}"; do
        case "$name" in upstream*) continue ;; esac
        stop "$name"
    done
    for name in "${!PROCS[@]}"; do stop "$name"; done
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

wants() { [[ " ${TARGETS[*]} " == *" $1 "* ]]; }

install_deps() {
    local want=()
    command -v curl >/dev/null || want+=(curl)
    command -v python3 >/dev/null || want+=(python3)
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null && wants router; then want+=(python3-venv); fi
    command -v nginx >/dev/null || want+=(nginx-light)
    command -v haproxy >/dev/null || want+=(haproxy)
    (( ${#want[@]} == 0 )) || apt_install "${want[@]}"

    case "${BENCH_TOOL:-}" in
        oha|wrk|"") ;;
        *) die "BENCH_TOOL must be oha or wrk" ;;
    esac
    if [[ "${BENCH_TOOL:-oha}" == oha ]]; then
        if install_oha; then
            TOOL=oha
        elif [[ "${BENCH_TOOL:-}" == oha ]]; then
            die "oha is not installed"
        fi
    fi
    if [[ -z "$TOOL" ]]; then
        command -v wrk >/dev/null || apt_install wrk
        command -v wrk >/dev/null || die "neither oha nor wrk could be installed"
        TOOL=wrk
    fi
    if [[ "$TOOL" == oha ]]; then
        if "$OHA" --help 2>&1 | grep -q -- '--output-format'; then OHA_JSON=(--output-format json); else OHA_JSON=(-j); fi
    fi
    wants router && install_router
    return 0
}

install_router() {
    local venv="$TOOLS/vllm-router-venv"
    ROUTER="$venv/bin/vllm-router"
    # A venv copied or moved from elsewhere keeps scripts whose interpreter is gone: it must run.
    if [[ -x "$ROUTER" ]] && "$ROUTER" --help >/dev/null 2>&1 \
        && [[ "$("$venv/bin/python" -m pip show vllm-router 2>/dev/null | awk '/^Version:/ {print $2}')" == "$ROUTER_VERSION" ]]; then
        return 0
    fi
    log "pip install vllm-router==$ROUTER_VERSION (into $venv)"
    mkdir -p "$TOOLS"
    if ! { python3 -m venv --clear "$venv" && "$venv/bin/pip" install -q "vllm-router==$ROUTER_VERSION"; } >"$TOOLS/router-install.log" 2>&1; then
        warn "vllm-router could not be installed (see $TOOLS/router-install.log)"
        ROUTER=""
    fi
}

# ---------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------

allocate_ports() {
    local ports i=0 target kind
    read -r -a ports <<<"$(free_ports $(( ${#ALL_TARGETS[@]} * 3 )))"
    for target in "${ALL_TARGETS[@]}"; do
        for kind in json sse streams; do
            PORT[${target}_$kind]=${ports[i]}
            i=$((i + 1))
        done
    done
}

# render TEMPLATE OUT: fill in @WORK@ and the @*_PORT@ placeholders.
render() {
    fill "$1" "$2" WORK="$WORK" \
        UP_JSON_PORT="${PORT[direct_json]}" UP_SSE_PORT="${PORT[direct_sse]}" \
        UP_STREAMS_PORT="${PORT[direct_streams]}" \
        NGINX_JSON_PORT="${PORT[nginx_json]}" NGINX_SSE_PORT="${PORT[nginx_sse]}" \
        NGINX_STREAMS_PORT="${PORT[nginx_streams]}" \
        HAPROXY_JSON_PORT="${PORT[haproxy_json]}" HAPROXY_SSE_PORT="${PORT[haproxy_sse]}" \
        HAPROXY_STREAMS_PORT="${PORT[haproxy_streams]}"
}

prepare_workdir() {
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/gateway-bench.XXXXXX")"
    stage_upstream "$WORK"
    mkdir -p "$WORK/out"
    printf '{"model":"m","input":"hello","stream":true}' >"$WORK/request.sse"
    printf '{"model":"m","input":"hello","stream":true,"bench_events":2,"bench_interval":0}' >"$WORK/request.streams"
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
    log "starting event-stream upstream on :${PORT[direct_streams]}"
    spawn upstream_streams python3 "$BENCH_DIR/streams.py" upstream "${PORT[direct_streams]}"
    wait_ready upstream_streams direct streams 10 || { show_log upstream_streams; die "the event-stream upstream did not come up"; }
}

# await_proxy PROC TARGET KIND: wait for the proxy or mark its leg broken.
await_proxy() {
    local proc="$1" target="$2" kind="$3" secs="${4:-10}"
    [[ -z "${BROKEN[${target}_$kind]:-}" ]] || return 0
    wait_ready "$proc" "$target" "$kind" "$secs" && return 0
    if alive "$proc"; then
        mark_broken "$target" "$kind" "no 200 from POST /v1/responses within ${secs}s"
    else
        mark_broken "$target" "$kind" "process exited during startup"
    fi
    show_log "$proc"
}

start_proxies() {
    if wants nginx; then
        log "starting nginx proxy on :${PORT[nginx_json]}/:${PORT[nginx_sse]}/:${PORT[nginx_streams]}"
        spawn nginx_proxy nginx -p "$WORK" -e "$WORK/proxy.error.log" -c "$WORK/proxy.nginx.conf"
    fi
    if wants haproxy; then
        log "starting haproxy on :${PORT[haproxy_json]}/:${PORT[haproxy_sse]}/:${PORT[haproxy_streams]}"
        spawn haproxy haproxy -db -f "$WORK/haproxy.cfg"
    fi
    local kind
    for kind in $KINDS; do
        wants nginx && await_proxy nginx_proxy nginx "$kind"
        wants haproxy && await_proxy haproxy haproxy "$kind"
    done
    return 0
}

# The gateway and the router take their upstream on the command line: one
# instance per target and kind, started when the kind's turn comes.
start_gateway() {
    local target="$1" kind="$2" proc="$1_$2"
    local -a args=(--llm-api-base "http://127.0.0.1:${PORT[direct_$kind]}"
                   --host 127.0.0.1 --port "${PORT[${target}_$kind]}" --log-format json)
    [[ "$target" != gateway-nolog ]] || args+=(--access-log false)
    # The gateway derives max_connections from its open-files limit (a third of it: a client
    # socket, an upstream socket and room to spare). Under the shipped unit (LimitNOFILE=65536)
    # that is over 21,000; where this machine allows fewer, the streams leg asks for enough.
    if [[ "$kind" == streams ]]; then
        local most=0 n
        for n in $STREAM_COUNTS; do (( n <= most )) || most=$n; done
        if (( ($(ulimit -n) - 100) / 3 < most )); then
            args+=(--max-connections $((most + 100)))
            log "open-files limit $(ulimit -n) is below the unit's: --max-connections $((most + 100))"
        fi
    fi
    # shellcheck disable=SC2206
    args+=(${GATEWAY_EXTRA_ARGS:-})
    if [[ -z "$GATEWAY" ]]; then mark_broken "$target" "$kind" "no gateway binary (build failed)"; return 0; fi
    log "starting $target ($kind) on :${PORT[${target}_$kind]} -> :${PORT[direct_$kind]}"
    spawn "$proc" "$GATEWAY" "${args[@]}"
    await_proxy "$proc" "$target" "$kind" "${BENCH_GATEWAY_START_TIMEOUT:-30}"
    [[ -z "${BROKEN[${target}_$kind]:-}" ]] || stop "$proc"
}

start_router() {
    local kind="$1" proc="router_$1"
    if [[ -z "$ROUTER" ]]; then mark_broken router "$kind" "vllm-router is not installed"; return 0; fi
    log "starting vllm-router ($kind) on :${PORT[router_$kind]} -> :${PORT[direct_$kind]}"
    spawn "$proc" "$ROUTER" --host 127.0.0.1 --port "${PORT[router_$kind]}" \
        --worker-urls "http://127.0.0.1:${PORT[direct_$kind]}" --policy round_robin \
        --rate-limit-tokens-per-second 100000000 --max-concurrent-requests 100000 \
        --queue-size 100000 --log-level warning --disable-retries --disable-circuit-breaker \
        --log-dir "$WORK/router-logs-$kind"
    await_proxy "$proc" router "$kind" 60
    [[ -z "${BROKEN[router_$kind]:-}" ]] || stop "$proc"
}

start_own_targets() {
    local kind="$1"
    wants gateway && start_gateway gateway "$kind"
    wants gateway-nolog && [[ "$kind" != streams ]] && start_gateway gateway-nolog "$kind"
    wants router && start_router "$kind"
    return 0
}

stop_own_targets() {
    stop "gateway_$1"; stop "gateway-nolog_$1"; stop "router_$1"
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
    if [[ "$kind" == streams ]]; then
        if [[ "$(grep -c '^data: ' "$out")" == 3 ]]; then
            log "verified $target ($kind): 200, 2 events and [DONE]"
        else
            warn "$target ($kind): the stream did not arrive whole"
        fi
    elif cmp -s "$out" "$(fixture "$kind")"; then
        log "verified $target ($kind): 200, $(wc -c <"$out") bytes identical to the fixture"
    else
        warn "$target ($kind): body differs from the fixture ($(wc -c <"$out") vs $(wc -c <"$(fixture "$kind")") bytes)"
    fi
}

print_versions() {
    echo "== environment"
    echo "   cpu:      $(nproc) x $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
    echo "   memory:   $(awk '/^MemTotal/ {printf "%.1f GB", $2 / 1048576}' /proc/meminfo)"
    echo "   kernel:   $(uname -sr)"
    echo "   nofile:   $(ulimit -n)"
    echo "   nginx:    $(nginx -v 2>&1 | head -n1)"
    echo "   haproxy:  $(haproxy -v 2>&1 | head -n1)"
    if [[ -n "$ROUTER" ]]; then
        echo "   router:   vllm-router $("${ROUTER%/*}/python" -m pip show vllm-router 2>/dev/null | awk '/^Version:/ {print $2}')"
    fi
    echo "   python:   $(python3 --version 2>&1)"
    if [[ "$TOOL" == oha ]]; then
        echo "   load:     $("$OHA" --version 2>&1 | head -n1)"
    else
        echo "   load:     $(wrk -v 2>&1 | head -n1)"
    fi
    local gwv=""
    [[ -z "$GATEWAY" ]] || gwv="$(timeout 3 "$GATEWAY" --version 2>/dev/null | head -n1 || true)"
    echo "   gateway:  ${GATEWAY:-n/a}${gwv:+ ($gwv)}, $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?'), ${GATEWAY_BUILD:-n/a}"
    echo "   request:  POST /v1/responses $(cat "$WORK/request.json")"
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
        cmd=("$OHA" --no-tui "${OHA_JSON[@]}" -z "${secs}s" -c "$CONNECTIONS" -m POST
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
        direct) if [[ "$2" == streams ]]; then echo upstream_streams; else echo upstream; fi ;;
        nginx) echo nginx_proxy ;;
        haproxy) echo haproxy ;;
        *) echo "$1_$2" ;;
    esac
}

# usable TARGET KIND: the leg is not broken and its process is alive.
usable() {
    local target="$1" kind="$2"
    if [[ -z "${BROKEN[${target}_$kind]:-}" ]] && ! alive "$(proc_of "$target" "$kind")"; then
        mark_broken "$target" "$kind" "process is gone"
    fi
    [[ -z "${BROKEN[${target}_$kind]:-}" ]]
}

# worker_ticks PID: "name ticks" for each of the gateway's proxy worker
# threads (proxy-N): the CPU time (user + system, in clock ticks) it has used.
worker_ticks() {
    local task stat
    for task in /proc/"$1"/task/*; do
        [[ "$(cat "$task/comm" 2>/dev/null)" == proxy-* ]] || continue
        stat="$(cat "$task/stat" 2>/dev/null)" || continue
        stat="${stat##*) }"
        # shellcheck disable=SC2086
        set -- $stat
        echo "$(cat "$task/comm") $(( ${12} + ${13} ))"
    done | sort
}

# worker_shares BEFORE AFTER: each proxy worker's share of the CPU the
# workers used between two worker_ticks, e.g. "proxy-0 52% proxy-1 48%".
worker_shares() {
    awk 'NR == FNR { before[$1] = $2; next }
         { used[$1] = $2 - before[$1]; total += used[$1]; names[++n] = $1 }
         END { for (i = 1; i <= n; i++) printf "%s%s %d%%", (i > 1 ? " " : ""), names[i], total ? 100 * used[names[i]] / total + 0.5 : 0 }' \
        <(echo "$1") <(echo "$2")
}

# tree_ticks PID: the CPU time (user + system, in clock ticks) that PID and
# its descendants have used (nginx's master and workers, the router's launcher
# and the router).
tree_ticks() { python3 "$BENCH_DIR/streams.py" cpu "$1"; }

# busy_ticks: the clock ticks all CPUs have spent on anything but idling
# (user, nice, system, irq, softirq) since boot.
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8; exit }' /proc/stat; }

# per_request TICKS REQUESTS: microseconds of CPU a request.
per_request() { awk -v t="$1" -v n="$2" -v hz="$HZ" 'BEGIN { printf "%.2f", (n > 0 ? t * 1e6 / hz / n : 0) }'; }

# measure TARGET KIND ROUND: one measured run, appended to results.tsv with the
# CPU a request took the target (the proxy's process tree; direct: the
# upstream's) and the whole machine. For the gateway it also prints how the
# proxy workers shared the work.
measure() {
    local target="$1" kind="$2" round="$3" out parsed rps p50 p99 errors requests shares=""
    local proc pid="" ticks="" cpu0 busy0 cpu busy
    out="$WORK/out/$kind-$target-$round.txt"
    if ! usable "$target" "$kind"; then
        echo "$kind $target $round fail - - - - - -" >>"$WORK/results.tsv"
        return 0
    fi
    proc="$(proc_of "$target" "$kind")"
    pid="${PROCS[$proc]:-}"
    [[ "$target" != gateway* || -z "$pid" ]] || ticks="$(worker_ticks "$pid")"
    cpu0="$(tree_ticks "$pid")" busy0="$(busy_ticks)"
    # The CPU read just around the load: the parse's interpreter is not the target's.
    if load_run "$target" "$kind" "$DURATION" "$out" \
        && busy=$(($(busy_ticks) - busy0)) && cpu=$(($(tree_ticks "$pid") - cpu0)) \
        && parsed="$(python3 "$BENCH_DIR/report.py" parse "$TOOL" "$out")"; then
        if [[ -n "$ticks" ]]; then
            shares="$(worker_shares "$ticks" "$(worker_ticks "$pid")")"
            echo "$kind $target $round $shares" >>"$WORK/workers.tsv"
        fi
        read -r rps p50 p99 errors requests <<<"$parsed"
        cpu="$(per_request "$cpu" "$requests")" busy="$(per_request "$busy" "$requests")"
        awk -v k="$kind" -v r="$round" -v t="$target" -v rps="$rps" -v p50="$p50" -v p99="$p99" -v e="$errors" -v c="$cpu" -v m="$busy" \
            'BEGIN { printf "   %-4s round %d  %-13s %9.0f req/s  p50 %8.3fms  p99 %8.3fms  errors %d  CPU %5.2fus/req, machine %5.2fus/req\n", k, r, t, rps, p50 * 1e3, p99 * 1e3, e, c, m }' >&2
        echo "$kind $target $round ok $rps $p50 $p99 $errors $cpu $busy" >>"$WORK/results.tsv"
        [[ -z "$shares" ]] || echo "                 $target proxy workers' CPU: $shares" >&2
    else
        warn "$target ($kind) round $round failed; output in $out:"
        tail -n 5 "$out" | sed 's/^/     | /' >&2 || true
        echo "$kind $target $round fail - - - - - -" >>"$WORK/results.tsv"
    fi
}

# round_order ROUND: the targets in the order they run in that round, shuffled (the same
# for a round number from run to run), so that no target always follows the same one or
# runs at the same point of a round.
round_order() {
    python3 - "$1" "${TARGETS[@]}" <<'EOF'
import random, sys
targets, rng = sys.argv[2:], random.Random(0)
for _ in range(int(sys.argv[1])):
    rng.shuffle(targets)
print(*targets)
EOF
}

bench_load() {
    local kind="$1" target round
    start_own_targets "$kind"
    for target in "${TARGETS[@]}"; do verify "$target" "$kind"; done
    if (( WARMUP > 0 )); then
        log "warm-up ($kind): ${WARMUP}s per target"
        for target in "${TARGETS[@]}"; do
            [[ -z "${BROKEN[${target}_$kind]:-}" ]] || continue
            load_run "$target" "$kind" "$WARMUP" "$WORK/out/$kind-$target-warmup.txt" || true
        done
    fi
    log "measuring ($kind): $ROUNDS round(s) x ${#TARGETS[@]} targets x ${DURATION}s, in a shuffled order each round"
    for ((round = 1; round <= ROUNDS; round++)); do
        for target in $(round_order "$round"); do
            # The gateway's access log, written to a file, would otherwise be written back to
            # disk by the kernel during whichever target runs some 30 s later.
            sync
            measure "$target" "$kind" "$round"
        done
    done
    stop_own_targets "$kind"
}

# streams_tool ARGS...: streams.py bounded in time, run in the background so
# that a signal reaches the trap at once.
streams_tool() {
    local rc=0
    spawn load timeout -k 5 $(( 120 + STREAM_EVENTS * ${STREAM_INTERVAL%.*} * 2 )) python3 "$BENCH_DIR/streams.py" "$@"
    wait "${PROCS[load]}" || rc=$?
    unset "PROCS[load]"
    cat "$WORK/load.log"
    return "$rc"
}

bench_streams() {
    local kind=streams target round line count pids i p50 p90 ok
    start_own_targets "$kind"
    local -a targets=()
    for target in "${TARGETS[@]}"; do [[ "$target" == gateway-nolog ]] || targets+=("$target"); done
    for target in "${targets[@]}"; do verify "$target" "$kind"; done
    log "measuring ($kind): time to first byte, $ROUNDS round(s) x $TTFB_REQUESTS sequential requests a target, the targets taking turns"
    local -a turn urls lines
    for ((round = 1; round <= ROUNDS; round++)); do
        turn=() urls=()
        for target in "${targets[@]}"; do
            if usable "$target" "$kind"; then
                turn+=("$target") urls+=("$(url "$target" "$kind")")
            else
                echo "ttfb $target $round fail -" >>"$WORK/streams.tsv"
            fi
        done
        (( ${#turn[@]} > 0 )) || continue
        line="$(streams_tool ttfb "$TTFB_REQUESTS" "${urls[@]}")" || warn "ttfb round $round: streams.py failed"
        mapfile -t lines <<<"$line"
        for i in "${!turn[@]}"; do
            target="${turn[$i]}"
            if read -r p50 p90 ok <<<"${lines[$i]:-}" && [[ "$ok" == "$TTFB_REQUESTS" ]]; then
                awk -v r="$round" -v t="$target" -v a="$p50" -v b="$p90" \
                    'BEGIN { printf "   ttfb round %d  %-13s p50 %.3fms  p90 %.3fms\n", r, t, a * 1e3, b * 1e3 }' >&2
                echo "ttfb $target $round ok $p50" >>"$WORK/streams.tsv"
            else
                warn "$target ($kind) ttfb round $round failed: ${lines[$i]:-no output}"
                echo "ttfb $target $round fail -" >>"$WORK/streams.tsv"
            fi
        done
    done
    for target in "${targets[@]}"; do
        [[ "$target" != direct ]] || continue
        usable "$target" "$kind" || continue
        pids="${PROCS[$(proc_of "$target" "$kind")]}"
        line="$(streams_tool rss "$pids")"
        log "$target: RSS idle $((line / 1024)) KB"
        echo "rss $target 0 ok $line 0 0" >>"$WORK/streams.tsv"
        for count in $STREAM_COUNTS; do
            usable "$target" "$kind" || break
            log "$target: $count streams of $STREAM_EVENTS events ${STREAM_INTERVAL}s apart"
            if line="$(streams_tool hold "$(url "$target" "$kind")" "$count" "$STREAM_EVENTS" "$STREAM_INTERVAL" "$pids")"; then
                read -r rss peak whole <<<"$line"
                log "$target: RSS $((rss / 1024)) KB with $peak streams open at once, $whole of $count whole"
                echo "rss $target $count ok $rss $peak $whole" >>"$WORK/streams.tsv"
            else
                warn "$target: the $count-stream run failed"
                echo "rss $target $count fail - - -" >>"$WORK/streams.tsv"
            fi
        done
    done
    stop_own_targets "$kind"
}

main() {
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    [[ -f "$JSON_FIXTURE" && -f "$SSE_FIXTURE" ]] || die "fixtures missing under $FIXTURES"
    local kind
    for kind in $KINDS; do
        [[ "$kind" == json || "$kind" == sse || "$kind" == streams ]] || die "BENCH_KINDS: unknown kind '$kind'"
    done
    install_deps
    build_gateway || warn "make build failed: the gateway legs will be reported as n/a"
    prepare_workdir
    : >"$WORK/streams.tsv"
    start_upstream
    start_proxies

    for kind in $KINDS; do
        if [[ "$kind" == streams ]]; then bench_streams; else bench_load "$kind"; fi
    done

    echo
    print_versions
    python3 "$BENCH_DIR/report.py" report "$WORK/results.tsv" --streams "$WORK/streams.tsv" \
        --duration "$DURATION" --rounds "$ROUNDS" --connections "$CONNECTIONS" --tool "$TOOL"
    if [[ -s "$WORK/workers.tsv" ]]; then
        echo
        echo "   gateway proxy workers' share of their CPU time, per round:"
        sed 's/^/   /' "$WORK/workers.tsv"
    fi
}

main "$@"
