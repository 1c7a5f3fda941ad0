"""Whether a replica of a Ray deployment fits on a node of the cluster as it is.

Serve places a replica (its ranks packed onto one node) where a node has the
CPUs and GPUs it asks for; where none has, the start waits for such a node to
join (an autoscaling cluster adds one) until ``startup_timeout``. The deployment
says so when it starts, not only when that timeout ends the start.
"""

from __future__ import annotations

import sys
from typing import Any

from mii.rpc.deployment_config import DeploymentConfig

RESOURCES = ("CPU", "GPU")


def replica_demand(config: DeploymentConfig, gpus_per_rank: float) -> dict[str, float]:
    """What one replica takes on its node: rank 0's CPUs, and every rank's GPUs
    (a rank without a GPU takes 0.01 CPU: ``application.replica_options``)."""
    ranks = config.tensor_parallel
    cpus = config.ray_num_cpus + (0.0 if gpus_per_rank else 0.01 * (ranks - 1))
    return {"CPU": cpus, "GPU": gpus_per_rank * ranks}


def largest_nodes(demand: dict[str, float], nodes: list[dict[str, Any]]) -> dict[str, float] | None:
    """None when a live node has ``demand`` (in total, free or not); else the most of
    each resource that any live node has (what the replica's ask is measured against)."""
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive")]
    if any(all(have.get(k, 0.0) >= v for k, v in demand.items()) for have in alive):
        return None
    return {k: max((have.get(k, 0.0) for have in alive), default=0.0) for k in RESOURCES}


def warn_if_no_node_fits(config: DeploymentConfig, gpus_per_rank: float) -> None:
    """One line on stderr when no node of the connected cluster could hold a replica."""
    import ray

    demand = replica_demand(config, gpus_per_rank)
    most = largest_nodes(demand, ray.nodes())
    if most is None:
        return
    asks = ", ".join(f"{demand[k]:g} {k}" for k in RESOURCES)
    has = ", ".join(f"{most[k]:g} {k}" for k in RESOURCES)
    print(
        f"[mii] no node of the Ray cluster can hold a replica: each asks {asks} on one "
        f"node (--ray-num-cpus, --ray-num-gpus x --tensor-parallel-size) and the largest "
        f"nodes have {has}. The start waits for such a node to join (an autoscaling "
        f"cluster) for up to --startup-timeout ({config.startup_timeout:g} s).",
        file=sys.stderr,
        flush=True,
    )
