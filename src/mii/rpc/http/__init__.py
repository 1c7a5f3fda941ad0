"""The REST gateway of a deployment, served by uvicorn on the deployment's event loop.

Routes (every request goes through the same ``ReplicaPool`` as the gRPC balancer):

- ``POST /mii/{deployment_name}`` with ``{"prompts": [...] or "...", <generation options>}``
  returns a JSON list of responses (``generated_text``, ``prompt_length``,
  ``generated_length``, ``finish_reason``, ``token_ids``).
- ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``: the
  OpenAI-compatible API (see :mod:`mii.rpc.http.openai_routes`).
- ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``: vLLM's tokenizer routes
  (:mod:`mii.rpc.http.tokenize_routes`).
- ``GET /health``: 200 ``{"status": "ok", ...}`` while a replica is healthy, else 503
  (``unavailable``, or ``draining`` while the deployment shuts down; ``starting``, for
  every route, before the gateway starts: :mod:`mii.rpc.http.starting`); ``replicas``
  lists each replica's state, restarts and pid (:mod:`mii.rpc.replica_health`).
- ``GET /metrics``: the pool's Prometheus metrics.

A bad request is answered 4xx with a JSON error naming the problem, never 500,
in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` on every
route (mii's routes add ``field``, the same as ``param``). No healthy
replica gives 503, a request that timed out 504 (the codes come from
:mod:`mii.rpc.status`).

A client that disconnects aborts its request (:mod:`mii.rpc.http.disconnect`).

Modules, from the wire inwards:

- ``server``: bind the port, run uvicorn, start and stop the ``Gateway``.
- ``app``: the FastAPI application, assembled from the parts below.
- ``mii_routes``, ``openai_routes``, ``tokenize_routes``: the routes.
- ``protocol``: the request bodies (pydantic models).
- ``openai_options``: what an OpenAI request means in mii's generation options.
- ``field_policy``: OpenAI fields that change nothing generated (ignored, logged once).
- ``openai_answers``: the JSON of OpenAI's answers, whole or as stream chunks.
- ``chat``: chat messages to a prompt (the tokenizer's template or a fallback).
- ``tools``, ``tool_protocol``, ``tool_parsers``: tool calling on chat completions
  (what ``tool_choice`` means; the ``tools`` fields; reading calls in the answer).
- ``choices``, ``sse``: running every choice of a request; streaming them as SSE.
- ``errors``: error bodies and the exception handlers.
- ``disconnect``: aborting the work of clients that leave.
- ``state``: what every route needs (``GatewayState``).
"""
