#!/usr/bin/env bash
# `make demo`: gateway supervising mock-vllm (a stand-in for vLLM that needs no GPU), one
# non-streaming and one streaming Responses API request through it, then both keep running
# until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${PORT:-9000}"
BIN=target/release

"$BIN/gateway" serve demo-model \
    --vllm-bin "$BIN/mock-vllm" --vllm-port 0 \
    --host 127.0.0.1 --port "$PORT" --log-format text \
    --child-env MOCK_VLLM_STREAM_DELAY=20ms &
GATEWAY_PID=$!
trap 'kill -TERM $GATEWAY_PID 2>/dev/null; wait $GATEWAY_PID 2>/dev/null' EXIT INT TERM

echo "waiting for the gateway on port $PORT (it opens once mock-vllm is ready)..."
for _ in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; then break; fi
    sleep 0.1
done
curl -fsS "http://127.0.0.1:$PORT/readyz"; echo

echo; echo "== POST /v1/responses (JSON)"
curl -sS "http://127.0.0.1:$PORT/v1/responses" -H 'content-type: application/json' \
    -d '{"model":"demo-model","input":"What is the status of job-382?"}'
echo; echo; echo "== POST /v1/responses (stream: true), events as they arrive"
curl -sSN "http://127.0.0.1:$PORT/v1/responses" -H 'content-type: application/json' \
    -d '{"model":"demo-model","input":"Reply with exactly one word: HELLO","stream":true}' | head -c 2000 || true
echo; echo "..."
echo
echo "gateway: http://127.0.0.1:$PORT (try /readyz, /metrics, /v1/models); Ctrl-C stops both."
wait $GATEWAY_PID
