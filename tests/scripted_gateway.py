"""A gateway over a scripted pool: the HTTP routes tested without an engine.

The pool answers every request with the same text (as a model that writes it
would), streamed in small pieces, and records the prompts and options it was sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import openai

from chat_tokenizers import QWEN_TOOLS_TEMPLATE
from mii.response import Response
from mii.rpc import mii_pb2
from mii.rpc.deployment import free_port
from mii.rpc.deployment_config import DeploymentConfig
from mii.rpc.http.server import start_gateway
from mii.rpc.pool import Metrics


class _Replica:
    healthy = True


class ScriptedPool:
    """A pool whose every answer is ``text`` (streamed in ``size``-character pieces),
    ending with ``finish``; it records the prompts and options it was sent."""

    def __init__(self, text: str, size: int = 5, finish: str = "stop") -> None:
        self.replicas = [_Replica()]
        self.metrics = Metrics()
        self.text, self.size, self.finish = text, size, finish
        self.sent: list[tuple[object, dict]] = []

    async def generate(self, prompts, params, timeout=None):
        self.sent.extend((p, params) for p in prompts)
        return [Response(self.text, len(p), 7, self.finish) for p in prompts]

    async def stream(self, prompt, params, timeout=None, announce=False) -> AsyncIterator:
        self.sent.append((prompt, params))
        if announce:  # accepted, as a replica's engine says before any token
            yield None
        pieces = [self.text[i : i + self.size] for i in range(0, len(self.text), self.size)]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            yield Response(piece, len(prompt), i + 1, self.finish if last else None)


def with_gateway(model: str, pool: ScriptedPool, scenario, **config):
    """Run ``scenario(client)`` (an AsyncOpenAI client) against a gateway over ``pool``."""

    async def run():
        deployment = DeploymentConfig(
            model=model,
            restful_api_port=free_port(),
            chat_template=QWEN_TOOLS_TEMPLATE,
            **config,
        )
        info = mii_pb2.ModelInfoReply(deployment_name="d", model=model, max_length=4096)
        gateway = await start_gateway(pool, info, deployment)
        client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
        try:
            await scenario(client, gateway)
        finally:
            await client.close()
            await gateway.stop()

    asyncio.run(run())
