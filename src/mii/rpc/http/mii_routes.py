"""mii's own routes: ``POST /mii/{deployment_name}``, ``GET /health`` (the deployment's
status and each replica's: :mod:`mii.rpc.replica_health`), ``GET /metrics``, and
vLLM's ``GET|POST /ping`` (the health status alone) and ``GET /version``.

The route functions carry no return annotation and no docstring on purpose:
FastAPI would validate answers against the one and publish the other in
``/openapi.json``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mii.errors import InvalidRequestError
from mii.response import Response as Answer
from mii.response import TokenLogprob
from mii.rpc.convert import prompt_list, validated
from mii.rpc.http.disconnect import until_disconnected
from mii.rpc.http.errors import ApiError
from mii.rpc.http.limits import LimitedRoute
from mii.rpc.http.openai_logprobs import json_logprob
from mii.rpc.http.protocol import MiiRequest
from mii.rpc.http.state import get_state
from mii.rpc.replica_health import health_body
from mii.version import __version__

router = APIRouter(route_class=LimitedRoute)


def _logprob_dict(entry: TokenLogprob | None) -> dict[str, Any] | None:
    if entry is None:
        return None
    return {
        "token_id": entry.token_id,
        "logprob": json_logprob(entry.logprob),
        "rank": entry.rank,
        "top_logprobs": [{"token_id": t, "logprob": json_logprob(lp)} for t, lp in entry.top],
    }


def response_dict(response: Answer) -> dict[str, Any]:
    """One answer as the JSON object of mii's route (logprobs only when asked)."""
    answer = {
        "generated_text": response.generated_text,
        "prompt_length": response.prompt_length,
        "generated_length": response.generated_length,
        "finish_reason": response.finish_reason,
        "stop_reason": response.stop_reason,
        "token_ids": list(response.token_ids),
        "cached_tokens": response.cached_tokens,  # prompt tokens from the prefix cache
    }
    if response.logprobs is not None:
        answer["logprobs"] = [_logprob_dict(e) for e in response.logprobs]
    if response.prompt_logprobs is not None:
        answer["prompt_logprobs"] = [_logprob_dict(e) for e in response.prompt_logprobs]
        answer["prompt_token_ids"] = response.prompt_token_ids
    return answer


@router.post("/mii/{deployment_name:path}")  # names may hold "/" (org/model-...)
async def generate(deployment_name: str, body: MiiRequest, request: Request):
    state = get_state(request)
    if deployment_name != state.deployment_name:
        raise ApiError(
            404,
            f"no deployment named {deployment_name!r} here "
            f"(this server runs {state.deployment_name!r})",
            "deployment_name",
        )
    # Checked and typed here (InvalidRequestError -> 400 naming the field): JSON's
    # "10" for max_new_tokens reaches the replica as 10.
    extra = dict(body.model_extra or {})
    if extra.get("stream") is False:  # what this route does anyway
        del extra["stream"]
    if "stream" in extra:  # (the Python API's hint names methods, no use over HTTP)
        raise ApiError(
            400,
            "unknown generation option 'stream': this route answers whole; for a stream "
            'POST /v1/completions with "stream": true (each piece a server-sent event)',
            "stream",
        )
    options = validated(extra)
    prompts = prompt_list(body.prompts)  # [1, 2, 3] is one prompt
    try:
        responses = await until_disconnected(request, state.pool.generate(prompts, options))
    except InvalidRequestError as err:
        if err.field == "prompt":  # (the engine's name for it; this route's is "prompts")
            err.field = "prompts"
        raise
    return [response_dict(r) for r in responses]


@router.get("/health")
async def health(request: Request):
    state = get_state(request)
    body, status = health_body(state.pool)  # per-replica state, restarts, pid
    body = {"deployment": state.deployment_name, "model": state.model, **body}
    return JSONResponse(body, status_code=status)


# vLLM's (SageMaker's) liveness route. Two routes, not one with both methods: one
# route's two operations share an operation id, which /openapi.json warned of.
@router.get("/ping")
async def ping(request: Request):
    body, status = health_body(get_state(request).pool)
    return JSONResponse({"status": body["status"]}, status_code=status)


router.add_api_route("/ping", ping, methods=["POST"], operation_id="ping_post")
# Uptime monitors and some load balancers probe with HEAD (it was a 405).
router.add_api_route("/ping", ping, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)


@router.get("/version")
async def version():
    return {"version": __version__}


@router.get("/metrics")
async def metrics(request: Request):
    return Response(
        generate_latest(get_state(request).pool.metrics.exported()),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )
