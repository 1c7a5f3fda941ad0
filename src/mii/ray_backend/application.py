"""The Ray Serve application of a deployment: ``MiiReplica`` (the engines) behind
``MiiIngress`` (the HTTP API), with the replicas' resources, placement group,
autoscaling, health checks and graceful shutdown taken from its configuration."""

from __future__ import annotations

import difflib
import os
from typing import Any

import mii.envs as envs
from mii.errors import InvalidRequestError
from mii.ray_backend.ingress import MiiIngress
from mii.ray_backend.replica import MiiReplica
from mii.rpc.deployment_config import DeploymentConfig
from mii.rpc.ray_options import replica_bounds

REPLICA_DEPLOYMENT = "MiiReplica"
INGRESS_DEPLOYMENT = "MiiIngress"
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 30.0
# Never a secret: those stay with the deployment process (API key) or are made anew.
_PRIVATE = {envs.API_KEY.name, envs.REPLICA_TOKEN.name, envs.TP_STORE_SECRET.name}


def forwarded_env() -> dict[str, str]:
    """The environment switches this deployment's replicas run with, wherever they
    are: mii's own (MII_*, secrets excepted) and the model libraries' offline ones."""
    # As set, not as parsed: str() of a parsed value ("None" for an empty directory,
    # "(1, 2)" for RANK:N) is not what the replica's parser takes. A bad value
    # fails here, in the caller, not in every replica.
    set_here = {s.name: s.as_set() for s in envs.SWITCHES if s.name not in _PRIVATE}
    env = {name: value for name, value in set_here.items() if value is not None}
    # The libraries' switches: a replica reads the same files as this process.
    library = {
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE"),
        "TRANSFORMERS_OFFLINE": os.environ.get("TRANSFORMERS_OFFLINE"),
        "HF_HOME": os.environ.get("HF_HOME"),
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM"),
    }
    return {**env, **{k: v for k, v in library.items() if v is not None}}


def gpus_per_rank(config: DeploymentConfig, cluster_gpus: float) -> float:
    """What each rank reserves: ``ray_num_gpus``, else one GPU on a cluster with GPUs."""
    if config.ray_num_gpus is not None:
        return config.ray_num_gpus
    return 1.0 if cluster_gpus > 0 else 0.0


def scaling(config: DeploymentConfig) -> dict[str, Any]:
    """A fixed ``num_replicas``, or Ray Serve's ``autoscaling_config`` (on the requests
    queued and running per replica) when min_replicas or max_replicas is set."""
    if (
        config.min_replicas is None
        and config.max_replicas is None
        and not config.autoscaling_config
    ):
        return {"num_replicas": config.replica_num}
    low, high = replica_bounds(config.min_replicas, config.max_replicas, config.autoscaling_config)
    low = low or 1
    # The load is averaged over look_back_period_s: no longer than the upscale delay
    # (Ray's 30 s default would hold a short delay back), at least a second, and
    # longer than the interval replicas report it at (Ray requires that).
    look_back = min(30.0, max(1.0, config.upscale_delay_s))
    high = high or max(low, config.replica_num)
    return {
        "autoscaling_config": {
            "min_replicas": low,
            "initial_replicas": min(max(config.replica_num, low), high),
            "max_replicas": high,
            "target_ongoing_requests": config.target_ongoing_requests,
            "upscale_delay_s": config.upscale_delay_s,
            "downscale_delay_s": config.downscale_delay_s,
            "look_back_period_s": look_back,
            "metrics_interval_s": min(10.0, look_back / 2),
            **(config.autoscaling_config or {}),
        }
    }


def check_scaling(config: DeploymentConfig) -> None:
    """Ray Serve's own check of the autoscaling_config, before anything starts: a
    bad key or value is InvalidRequestError naming ``autoscaling_config``."""
    from ray.serve.config import AutoscalingConfig

    autoscaling = scaling(config).get("autoscaling_config")
    if autoscaling is None:
        return
    unknown = sorted(set(autoscaling) - set(AutoscalingConfig.model_fields))
    if unknown:  # Ray Serve would ignore them
        near = difflib.get_close_matches(unknown[0], AutoscalingConfig.model_fields, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise InvalidRequestError(
            f"autoscaling_config has keys Ray Serve does not know: {', '.join(unknown)} "
            f"({hint}known: {', '.join(AutoscalingConfig.model_fields)})",
            field="autoscaling_config",
        )
    low, _ = replica_bounds(config.min_replicas, None, config.autoscaling_config)
    if low is not None and low < 1:
        raise InvalidRequestError(  # (the min_replicas option's own rule)
            "autoscaling_config min_replicas must be at least 1: a deployment keeps one "
            "replica loaded (no scale to zero)",
            field="autoscaling_config",
        )
    try:
        AutoscalingConfig(**autoscaling)
    except Exception as err:  # pydantic's ValidationError, or a ValueError
        raise InvalidRequestError(
            f"autoscaling_config is not valid for Ray Serve: {err}", field="autoscaling_config"
        ) from None


def serve_logging(config: DeploymentConfig) -> dict[str, Any]:
    """Serve's logging of the deployments: a line per request (two: ingress and
    replica, health probes and scrapes too) only where the local gateway's HTTP server
    writes its access log, ``uvicorn_log_level`` info or finer."""
    return {"enable_access_log": config.uvicorn_log_level in ("info", "debug", "trace")}


def replica_options(config: DeploymentConfig, num_gpus: float) -> dict[str, Any]:
    """``serve.deployment`` options of the engines' deployment."""
    options: dict[str, Any] = {
        "name": REPLICA_DEPLOYMENT,
        "ray_actor_options": {
            "num_cpus": config.ray_num_cpus,
            "num_gpus": num_gpus,
            "runtime_env": {"env_vars": forwarded_env()},
        },
        # The engine admits requests up to max_queued_requests and refuses more (429):
        # Serve must pass every request on, never hold one back in its router's own
        # queue. (A bound of max_queued_requests here did just that: Serve queued the
        # excess without limit, and no client was ever refused.)
        "max_ongoing_requests": 1_000_000,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        # Serve's rolling shutdown: a replica stops taking requests, then gets this
        # long to finish those it has.
        "graceful_shutdown_timeout_s": config.shutdown_grace_s,
        "max_constructor_retry_count": 1,  # a model that fails to load fails the start
        "logging_config": serve_logging(config),
        **scaling(config),
    }
    if config.tensor_parallel > 1:
        # One bundle per rank, all on one node: rank 0 (the replica actor) in the first.
        first = {"CPU": config.ray_num_cpus, "GPU": num_gpus}
        rank = {"GPU": num_gpus} if num_gpus else {"CPU": 0.01}
        options["placement_group_bundles"] = [first] + [rank] * (config.tensor_parallel - 1)
        options["placement_group_strategy"] = "STRICT_PACK"
    return options


def ingress_options(config: DeploymentConfig) -> dict[str, Any]:
    """``serve.deployment`` options of the HTTP ingress (OpenAI routes, chat templates)."""
    return {
        "name": INGRESS_DEPLOYMENT,
        "ray_actor_options": {
            "num_cpus": 0,  # it only passes requests on
            # The replicas' switches too: it loads the tokenizer (without MII_CACHE_DIR
            # it converted a GGUF a second time into $HOME; without HF_HUB_OFFLINE a
            # hub model's tokenizer went to the network on an offline cluster).
            "runtime_env": {"env_vars": forwarded_env()},
        },
        "max_ongoing_requests": config.http_max_connections,
        "graceful_shutdown_timeout_s": config.shutdown_grace_s,
        "logging_config": serve_logging(config),
    }


def build_application(
    config: DeploymentConfig, board: str, api_key: str | None, cluster_gpus: float
) -> Any:
    """The Serve application (``serve.run`` it under the deployment's name)."""
    from ray import serve

    num_gpus = gpus_per_rank(config, cluster_gpus)
    config_json = config.model_dump_json()
    replicas = serve.deployment(MiiReplica, **replica_options(config, num_gpus))
    ingress = serve.deployment(serve.ingress()(MiiIngress), **ingress_options(config))
    return ingress.bind(config_json, replicas.bind(config_json, board, num_gpus), board, api_key)
