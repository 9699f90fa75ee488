#!/usr/bin/env bash
# Re-records the vLLM 0.32 fixtures in tests/fixtures (see its README): starts `gateway serve` on
# the tiny model of the setup in DIR (default target/vllm, made by `make vllm-setup`), runs
# record.py through it (and, for the paths outside /v1, at vLLM itself), and ends by killing vLLM's
# engine to record how streams end, /health, /ping, /tokenize and a generation request while it is
# dead.
#
#   tests/vllm/record.sh [DIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
dir="$(cd "${1:-$root/target/vllm}" && pwd)"
cd "$root"
cargo build --locked --bin gateway
gateway_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
vllm_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log="$(mktemp)"
PATH="$dir/venv/bin:$PATH" VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=auto HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
    target/debug/gateway serve "$dir/model" --host 127.0.0.1 --port "$gateway_port" \
    --vllm-port "$vllm_port" --restart no \
    -- --served-model-name tiny --max-model-len 1024 --enforce-eager >"$log" 2>&1 &
gateway=$!
trap 'kill -TERM $gateway 2>/dev/null; wait $gateway 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 600); do
    "$dir/venv/bin/python" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$gateway_port/readyz', timeout=2)" \
        2>/dev/null && break
    kill -0 $gateway 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.5
done
"$dir/venv/bin/python" tests/vllm/record.py "http://127.0.0.1:$gateway_port" \
    "http://127.0.0.1:$vllm_port" tests/fixtures "$gateway"
