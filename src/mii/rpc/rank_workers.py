"""The processes of ranks 1..N-1 of a tensor-parallel replica (the replica is rank 0).

Each runs ``python -m mii.engine.tp_worker ENGINE_CONFIG_JSON`` with the
torch.distributed rendezvous variables set, and a fresh secret prefix for the
keys of their store (``MII_TP_STORE_SECRET``, see :mod:`mii.engine.tp_store`)
in the environment, never on the command line; they share the replica's GPUs
(CUDA_VISIBLE_DEVICES) and its log.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import mii.envs as envs
from mii.config import EngineConfig


def start_rank_workers(
    engine: EngineConfig, master_addr: str, master_port: int
) -> list[subprocess.Popen]:
    """Start ranks 1..N-1 of ``engine`` (N = its tensor_parallel) and make this
    process rank 0 of the same group."""
    world = engine.tensor_parallel
    group_env = {
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        envs.TP_STORE_SECRET.name: secrets.token_urlsafe(32),
    }
    os.environ.update(group_env, RANK="0", LOCAL_RANK="0")
    workers = []
    for rank in range(1, world):
        env = {**os.environ, **group_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        workers.append(
            subprocess.Popen(
                [sys.executable, "-m", "mii.engine.tp_worker", engine.model_dump_json()],
                env=env,
                stdin=subprocess.DEVNULL,
            )
        )
    return workers


def stop_rank_workers(workers: list[subprocess.Popen], timeout: float = 5.0) -> None:
    """Wait for the ranks to leave (rank 0 told them to stop), then make sure."""
    for worker in workers:
        try:
            worker.wait(timeout)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
