#!/usr/bin/env bash
# `make demo`: gateway supervising mock-vllm (a stand-in for vLLM that needs no GPU), one
# non-streaming and one streaming Responses API request through it, then both keep running
# until Ctrl-C, which stops them cleanly (exit 0).
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${PORT:-9000}"
BIN=target/release
URL="http://127.0.0.1:$PORT"

LOG="${LOG:-target/demo.log}"

# The gateway stays in the terminal's process group, so Ctrl-C reaches it too: it drains, stops
# mock-vllm and exits 0. Its log (and mock-vllm's, which it relays) goes to a file, so that the
# terminal shows the answers.
"$BIN/gateway" serve demo-model \
    --vllm-bin "$BIN/mock-vllm" --vllm-port 0 \
    --host 127.0.0.1 --port "$PORT" --log-format text \
    --child-env MOCK_VLLM_STREAM_DELAY=20ms >"$LOG" 2>&1 &
GATEWAY_PID=$!
stop() {
    kill -TERM "$GATEWAY_PID" 2>/dev/null || true
    local code=0
    wait "$GATEWAY_PID" || code=$?
    echo
    echo "gateway stopped (exit $code); its log: $LOG"
    exit "$code"
}
trap stop INT TERM
trap 'kill -TERM $GATEWAY_PID 2>/dev/null || true' EXIT

echo "waiting for the gateway on port $PORT (it opens once mock-vllm is ready; log: $LOG)..."
for _ in $(seq 1 100); do
    if curl -fsS "$URL/readyz" >/dev/null 2>&1; then break; fi
    sleep 0.1
done
curl -fsS "$URL/readyz"
echo

echo
echo "== POST /v1/responses (JSON)"
curl -sS "$URL/v1/responses" -H 'content-type: application/json' \
    -d '{"model":"demo-model","input":"What is the status of job-382?"}' | python3 tests/demo_show.py
echo
echo "== POST /v1/responses (stream: true): the text as its events arrive"
curl -sSN "$URL/v1/responses" -H 'content-type: application/json' \
    -d '{"model":"demo-model","input":"Reply with exactly one word: HELLO","stream":true}' |
    python3 -u tests/demo_show.py
echo
echo "gateway: $URL (try /readyz, /metrics, /v1/models); its log: $LOG; Ctrl-C stops both."
wait "$GATEWAY_PID"
