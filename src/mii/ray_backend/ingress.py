"""The HTTP side of a Ray deployment: mii's own FastAPI app (the OpenAI API,
``/mii/{name}``, ``/health``, ``/metrics``, ``/tokenize``) served by Ray Serve's
HTTP proxy, with a :class:`~mii.ray_backend.pool.RayPool` in place of the
single-host pool. Same routes, same request checks, same error answers.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from mii.ray_backend.http_drain import IngressDrain
from mii.ray_backend.pool import HEALTH_INTERVAL_S, RayPool
from mii.rpc.deployment_config import DeploymentConfig
from mii.rpc.http.app import build_app
from mii.rpc.http.auth import AccessPolicy
from mii.rpc.http.sampling_defaults import gateway_sampling_defaults
from mii.rpc.http.server import load_gateway_tokenizer
from mii.rpc.http.state import GatewayState


def config_with_key(config_json: str, api_key: str | None) -> DeploymentConfig:
    """The deployment's configuration with its API key (which its JSON leaves out)."""
    return DeploymentConfig.model_validate({**json.loads(config_json), "api_key": api_key})


class MiiIngress:
    """Ray Serve builds the ASGI app of each ingress replica with
    ``__serve_build_asgi_app__`` once this constructor has run."""

    async def __init__(
        self, config_json: str, replicas: Any, board_name: str, api_key: str | None = None
    ) -> None:
        config = config_with_key(config_json, api_key)
        self.pool = RayPool(replicas, board_name)
        tokenizer = await asyncio.to_thread(load_gateway_tokenizer, config)
        defaults = await asyncio.to_thread(gateway_sampling_defaults, config)
        info = await replicas.model_info.remote()
        self.state = GatewayState(
            pool=self.pool,
            deployment_name=config.deployment_name,
            model=config.model,
            served_model_names=list(config.served_model_name or ()),
            tool_call_parser=config.tool_call_parser,
            sampling_defaults=defaults,
            max_length=info["max_length"],
            tokenizer=tokenizer,
            created=int(time.time()),
            access=AccessPolicy.of(config),
            max_request_bytes=config.max_request_bytes,
            max_queued_requests=None,  # each replica refuses beyond its own bound (429)
        )
        self.app_name = config.deployment_name
        self.drain = IngressDrain(self.pool)
        await self.pool.check_all()
        self.watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        """Keep the replicas' figures fresh, and follow the deployment's drain notice.
        When the board is gone, the deployment process that owned it died without
        stopping the application (a single-host deployment's replicas exit then too):
        delete it, so that it does not linger."""
        import ray.exceptions
        from ray import serve

        while True:
            try:
                await self.pool.check_all()
                await self.drain.poll()
            except ray.exceptions.RayActorError:
                serve.delete(self.app_name, _blocking=False)
                return
            except Exception:  # a passing failure: try again
                pass
            await asyncio.sleep(HEALTH_INTERVAL_S)

    def __serve_build_asgi_app__(self):
        return build_app(self.state, echo_request_id=False)  # Serve's proxy echoes it

    async def __del__(self) -> None:
        # (an ingress whose __init__ failed, its replicas never ready, has none of them)
        for started in (getattr(self, "watcher", None), getattr(self, "drain", None)):
            if started is not None:
                started.cancel()
        if getattr(self, "pool", None) is not None:
            await self.pool.close()
