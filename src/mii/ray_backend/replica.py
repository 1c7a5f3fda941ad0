"""One replica of a Ray deployment: the same :class:`AsyncEngine` as a single-host
replica, inside a Ray Serve replica actor.

Ray Serve creates it (``MiiReplica(config_json, board)``), routes requests to it
through deployment handles, probes :meth:`check_health` and replaces it when that
fails or its actor dies, and calls ``__del__`` when the replica is shut down
(after its requests are done: Serve's graceful shutdown). Requests and answers are
plain data (:mod:`mii.ray_backend.wire`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from mii.engine.async_engine import AsyncEngine
from mii.prompts import Prompt
from mii.ray_backend.board import NAMESPACE, POST_INTERVAL_S
from mii.ray_backend.ranks import start_rank_actors, stop_rank_actors
from mii.ray_backend.wire import error_to_wire, piece_to_wire
from mii.rpc.deployment_config import DeploymentConfig
from mii.rpc.replica import engine_error


class MiiReplica:
    """An engine serving one Serve replica's share of the requests."""

    async def __init__(self, config_json: str, board_name: str, num_gpus: float = 0.0) -> None:
        import ray
        from ray import serve

        config = DeploymentConfig.model_validate_json(config_json)
        engine_config = config.engine_config()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.ranks: list[Any] = []
        if engine_config.tensor_parallel > 1:
            self.ranks = start_rank_actors(
                engine_config, f"mii:{config.deployment_name}:{self.replica_id}", num_gpus
            )
        options = engine_config.model_dump(exclude={"model"}, exclude_unset=True)
        try:
            # Loading takes seconds: off the replica's event loop.
            self.engine = await asyncio.to_thread(AsyncEngine, engine_config.model, **options)
        except BaseException:
            stop_rank_actors(self.ranks)
            raise
        try:
            self.engine.separate_sampling_stream(f"ray replica {self.replica_id}")
            await self.engine.warm_up()  # compile/allocate first
        except BaseException:
            await self._stop_engine()
            raise
        self.in_flight = 0
        self.node = ray.util.get_node_ip_address()
        self.started = time.time()
        self.board = ray.get_actor(board_name, namespace=NAMESPACE)
        self.poster = asyncio.create_task(self._post_figures())

    # ----- requests ------------------------------------------------------------

    async def generate(self, prompts: list[Prompt], params: dict[str, Any]) -> dict[str, Any]:
        """``{"pieces": [whole answer, ...]}`` or ``{"error": ...}``."""
        self.in_flight += 1
        try:
            responses = await self.engine.generate(prompts, **params)
        except Exception as err:
            return error_to_wire(engine_error(err))
        finally:
            self.in_flight -= 1
        return {"pieces": [piece_to_wire(r) for r in responses]}

    async def stream(self, prompt: Prompt, params: dict[str, Any]) -> AsyncIterator[dict]:
        """``{"accepted": True}`` once the engine accepted the request, then
        ``{"piece": ...}`` for every piece; or a last ``{"error": ...}``. A caller
        that cancels the stream cancels this generator, which aborts the request."""
        self.in_flight += 1
        pieces = None
        try:
            pieces = await self.engine.open_stream(prompt, **params)
            yield {"accepted": True}
            async for piece in pieces:
                yield {"piece": piece_to_wire(piece)}
        except Exception as err:
            yield error_to_wire(engine_error(err))
        finally:
            if pieces is not None:
                pieces.close()
            self.in_flight -= 1

    async def model_info(self) -> dict[str, Any]:
        return {"max_length": self.engine.core.max_length}

    # ----- what Ray Serve calls --------------------------------------------------

    def check_health(self) -> None:
        """Raise when this replica cannot serve (a tensor-parallel rank failed, the
        engine stopped): Ray Serve then replaces it."""
        failure = self.engine.core.failure
        if failure is not None:
            raise RuntimeError(f"the replica's engine failed: {failure}")

    async def __del__(self) -> None:
        # Serve calls this for a replica whose __init__ failed too (a model that did
        # not load): only what was made is undone (else a second, misleading
        # AttributeError traceback followed the load error).
        poster = getattr(self, "poster", None)
        if poster is None:
            return  # __init__ failed, and undid what it had made
        poster.cancel()
        with contextlib.suppress(Exception):
            self.board.forget.remote(self.replica_id)
        await self._stop_engine()

    async def _stop_engine(self) -> None:
        try:
            await self.engine.aclose()
        finally:
            stop_rank_actors(self.ranks)

    # ----- figures ---------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        """This replica's engine figures, as plain data."""
        stats = self.engine.stats()
        return {
            **{k: v for k, v in stats.items() if isinstance(v, (int, float, str))},
            "in_flight": self.in_flight,
            "node": self.node,
            "pid": os.getpid(),
            "started": self.started,
        }

    async def _post_figures(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a board gone: the deployment is stopping
                self.board.post.remote(self.replica_id, self.figures())
            await asyncio.sleep(POST_INTERVAL_S)
