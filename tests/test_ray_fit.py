"""A Ray deployment says at once when no node of the cluster can hold a replica
(`--ray-num-gpus 1` on a cluster without GPUs waited the whole startup timeout,
silent). Pure functions over `ray.nodes()`-shaped records: no cluster needed."""

from __future__ import annotations

from mii.ray_backend.fit import largest_nodes, replica_demand
from mii.rpc.deployment_config import DeploymentConfig


def node(alive: bool = True, **resources: float) -> dict:
    return {"Alive": alive, "Resources": resources}


def config(**options) -> DeploymentConfig:
    return DeploymentConfig.parse("m", backend="ray", **options)


def test_a_replica_asks_its_cpus_and_a_gpu_per_rank_on_one_node():
    assert replica_demand(config(ray_num_cpus=2), 1.0) == {"CPU": 2.0, "GPU": 1.0}
    assert replica_demand(config(ray_num_cpus=1, tensor_parallel=4), 1.0) == {
        "CPU": 1.0,
        "GPU": 4.0,
    }
    cpu_only = replica_demand(config(ray_num_cpus=1, tensor_parallel=2), 0.0)
    assert cpu_only == {"CPU": 1.01, "GPU": 0.0}  # a CPU rank's bundle takes 0.01 CPU


def test_a_node_with_enough_of_everything_fits():
    demand = {"CPU": 1.0, "GPU": 2.0}
    assert largest_nodes(demand, [node(CPU=8, GPU=1), node(CPU=4, GPU=2)]) is None
    assert largest_nodes({"CPU": 0.5, "GPU": 0.0}, [node(CPU=2)]) is None  # no GPU asked


def test_no_node_fits_names_the_largest_of_each_resource():
    demand = {"CPU": 1.0, "GPU": 1.0}
    assert largest_nodes(demand, [node(CPU=2)]) == {"CPU": 2.0, "GPU": 0.0}
    # GPUs on one node, CPUs on another: a replica's ranks sit on one node
    split = [node(CPU=0.5, GPU=8), node(CPU=64)]
    assert largest_nodes(demand, split) == {"CPU": 64.0, "GPU": 8.0}
    # a dead node's resources count for nothing
    assert largest_nodes(demand, [node(False, CPU=8, GPU=8)]) == {"CPU": 0.0, "GPU": 0.0}
