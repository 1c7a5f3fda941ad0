"""Large requests are parsed and tokenized off the event loop (issue 14, item 11).

The gateway shares its event loop with the deployment's gRPC server; a replica
shares its loop between all its requests. Each test holds the heavy step (JSON
parsing, chat template, tokenizing) in place until a concurrent request on the
same server has been answered: that can only happen if the step runs in a
worker thread. No timing threshold is involved; a step run on the loop makes
the concurrent request time out.
"""

from __future__ import annotations

import asyncio
import json
import threading

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import mii
from mii.errors import InvalidRequestError
from mii.response import Response
from mii.rpc import mii_pb2
from mii.rpc.deployment import free_port
from mii.rpc.deployment_config import DeploymentConfig
from mii.rpc.health import add_standard_services, set_health
from mii.rpc.http import limits, openai_routes, tokenize_routes
from mii.rpc.http.server import start_gateway
from mii.rpc.listen import listening_server
from mii.rpc.pool import Metrics

WAIT_S = 20  # how long a concurrent request may take; only reached when it fails


class _Replica:
    healthy = True


class _EchoPool:
    """A pool that answers every prompt with its length."""

    def __init__(self) -> None:
        self.replicas = [_Replica()]
        self.metrics = Metrics()

    async def generate(self, prompts, params, timeout=None):
        return [Response(str(len(p)), 1, 1, "stop") for p in prompts]


def _grpc_health(port: int) -> int:
    """A blocking health check of the gRPC server on ``port``."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT_S).status


def test_large_bodies_are_parsed_while_grpc_is_served(llama, monkeypatch):
    """While a large body is parsed (and its chat template rendered, or its prompt
    tokenized for /tokenize), a gRPC call to the same process is answered."""
    seen: dict[str, object] = {}
    real_parse, real_chat = limits.parse_body, openai_routes.chat_prompt
    real_tokenize = tokenize_routes.tokenize

    def parse_holding(body, model):
        seen["parse_thread"] = threading.get_ident()
        seen["grpc_during_parse"] = _grpc_health(seen["grpc_port"])
        return real_parse(body, model)

    def chat_holding(tokenizer, messages, **template):
        seen["chat_thread"] = threading.get_ident()
        seen["grpc_during_chat"] = _grpc_health(seen["grpc_port"])
        return real_chat(tokenizer, messages, **template)

    def tokenize_holding(tokenizer, body):
        seen["tokenize_thread"] = threading.get_ident()
        seen["grpc_during_tokenize"] = _grpc_health(seen["grpc_port"])
        return real_tokenize(tokenizer, body)

    monkeypatch.setattr(limits, "parse_body", parse_holding)
    monkeypatch.setattr(openai_routes, "chat_prompt", chat_holding)
    monkeypatch.setattr(tokenize_routes, "tokenize", tokenize_holding)

    async def scenario():
        seen["loop_thread"] = threading.get_ident()
        seen["grpc_port"] = port = free_port()
        server = listening_server(f"127.0.0.1:{port}")
        await set_health(add_standard_services(server), True)
        await server.start()
        config = DeploymentConfig(model=llama, restful_api_port=free_port())
        # A max_length that these texts can fit in: longer ones are refused by length
        # before any tokenizing (GatewayState.check_prompt_chars).
        info = mii_pb2.ModelInfoReply(deployment_name="d", model=llama, max_length=500_000)
        gateway = await start_gateway(_EchoPool(), info, config)
        try:
            content = "word " * 200_000  # 1 MB: over OFFLOAD_BYTES, under the limit
            body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1}
            async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
                response = await http.post(
                    "/v1/chat/completions",
                    content=json.dumps(body),
                    headers={"content-type": "application/json"},
                )
                # A small body, but its prompt is tokenized off the loop too.
                tokenized = await http.post("/tokenize", json={"prompt": "word " * 1000})
            assert response.status_code == 200, response.text
            assert tokenized.status_code == 200 and tokenized.json()["count"] >= 1000
        finally:
            await gateway.stop()
            await server.stop(None)

    asyncio.run(scenario())
    serving = health_pb2.HealthCheckResponse.SERVING
    assert seen["parse_thread"] != seen["loop_thread"]
    assert seen["chat_thread"] != seen["loop_thread"]
    assert seen["tokenize_thread"] != seen["loop_thread"]
    assert seen["grpc_during_parse"] == serving
    assert seen["grpc_during_chat"] == serving
    assert seen["grpc_during_tokenize"] == serving


def test_long_prompts_are_tokenized_while_other_requests_run(llama):
    """A long prompt is tokenized in a worker thread: a short request submitted
    meanwhile finishes first. A prompt too long to fit is refused untokenized."""

    async def scenario():
        async with mii.AsyncEngine(llama) as engine:
            await engine.generate("warm up", max_new_tokens=1)
            intake = engine.core.intake
            loop_thread = threading.get_ident()
            short_done = threading.Event()
            seen = {}
            real_tokenize = intake.tokenize

            def tokenize_holding(prompt, *args, **kwargs):
                if isinstance(prompt, str) and len(prompt) >= 1000:
                    seen["thread"] = threading.get_ident()
                    seen["short_finished_first"] = short_done.wait(WAIT_S)
                return real_tokenize(prompt, *args, **kwargs)

            intake.tokenize = tokenize_holding
            intake.max_prompt_chars = None  # tokenize it, whatever its length
            long_prompt = "DeepSpeed is fast. " * 1000  # over OFFLOAD_TOKENIZE_CHARS

            async def short():
                await asyncio.sleep(0)  # let the long one start first
                answer = await engine.generate("Seattle is", max_new_tokens=2, ignore_eos=True)
                short_done.set()
                return answer

            long_result, short_result = await asyncio.gather(
                engine.generate(long_prompt, max_new_tokens=1), short(), return_exceptions=True
            )
            assert isinstance(long_result, InvalidRequestError)  # longer than max_length
            assert long_result.field == "prompt"
            assert short_result[0].generated_length == 2
            assert seen["thread"] != loop_thread
            assert seen["short_finished_first"]

            # Over the prompt-size limit: refused before the tokenizer sees it.
            intake.tokenize = real_tokenize
            intake.max_prompt_chars = limit = 2 * engine.core.max_length * 6
            tokenizer, intake.tokenizer = intake.tokenizer, None  # calling it would fail
            try:
                with pytest.raises(InvalidRequestError) as err:
                    await engine.generate("x" * (limit + 1), max_new_tokens=1)
                assert err.value.field == "prompt" and "characters" in str(err.value)
            finally:
                intake.tokenizer = tokenizer

    asyncio.run(scenario())
