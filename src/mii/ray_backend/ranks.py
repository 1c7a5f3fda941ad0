"""Ranks 1..N-1 of a tensor-parallel replica on Ray: one actor each, in the
replica's placement group (its N bundles are packed on one node), running the same
rank loop as a single-host deployment's rank process (:mod:`mii.engine.tp_worker`).
torch.distributed connects them to rank 0 (the Serve replica) as it does there.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import mii.envs as envs
from mii.config import EngineConfig
from mii.ray_backend.board import NAMESPACE
from mii.rpc.free_port import free_port


class RankWorker:
    """One rank > 0 (wrapped with ``ray.remote`` when started)."""

    def run(self, engine_json: str, group_env: dict[str, str]) -> int:
        """Join the group and serve rank 0's passes until it stops the engine."""
        from mii.engine.tp_worker import main

        os.environ.update(group_env)
        return main([engine_json])


def start_rank_actors(engine: EngineConfig, name_prefix: str, num_gpus: float) -> list[Any]:
    """Start ranks 1..N-1 of ``engine`` on this node and make this process rank 0.
    Returns the actors (stop them with :func:`stop_rank_actors`)."""
    import ray

    world = engine.tensor_parallel
    host = ray.util.get_node_ip_address()
    group_env = {
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": host,
        "MASTER_PORT": str(free_port(host)),
        envs.TP_STORE_SECRET.name: secrets.token_urlsafe(32),
    }
    os.environ.update(group_env, RANK="0", LOCAL_RANK="0")
    worker_class = ray.remote(RankWorker)
    actors = []
    for rank in range(1, world):
        # Each rank sees its own GPU as device 0 (Ray sets CUDA_VISIBLE_DEVICES per actor).
        env = {**group_env, "RANK": str(rank), "LOCAL_RANK": "0"}
        actor = worker_class.options(
            name=f"{name_prefix}:rank{rank}", namespace=NAMESPACE, num_cpus=0, num_gpus=num_gpus
        ).remote()
        actor.run.remote(engine.model_dump_json(), env)
        actors.append(actor)
    return actors


def stop_rank_actors(actors: list[Any]) -> None:
    import ray

    for actor in actors:
        ray.kill(actor)
