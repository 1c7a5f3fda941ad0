"""The options of a deployment on a Ray cluster (``backend="ray"``).

:class:`RayOptions` is a base of :class:`mii.rpc.deployment_config.DeploymentConfig`,
so these are options of ``mii.serve`` and ``mii serve`` like any other; the Ray
backend itself lives in :mod:`mii.ray_backend` (Ray is imported only there).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from mii.errors import InvalidRequestError
from mii.sampling_options import ExactTypes

# The options that only the Ray backend reads: set with the single-host backend,
# they are refused (they would be silently ignored otherwise).
RAY_ONLY = (
    "autoscaling_config",
    "min_replicas",
    "max_replicas",
    "target_ongoing_requests",
    "upscale_delay_s",
    "downscale_delay_s",
    "ray_num_cpus",
    "ray_num_gpus",
)
INSTALL_HINT = "pip install 'mii[ray]' (or: pip install 'ray[serve]')"


class RayOptions(ExactTypes):
    """Where a deployment runs and, on Ray, how it scales. (ExactTypes: a count is
    never a boolean, ``replica_num=True`` was one replica; DeploymentConfig's fields
    too.)"""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["local", "ray"] | None = Field(
        default=None,
        description="'local': replica processes on this machine behind mii's load balancer; "
        "'ray': replicas are Ray Serve replicas on a Ray cluster (docs/multi_node.md; "
        f"{INSTALL_HINT}). Default: 'ray' when ray_address is given, else 'local'",
    )
    ray_address: str | None = Field(
        default=None,
        description="the Ray cluster to deploy on (backend 'ray'): the address 'ray start "
        "--head' prints (HOST:6379) or 'auto' (the cluster running on this machine); "
        "unset: the cluster mii.serve's process is connected to (ray.init), else "
        "$RAY_ADDRESS or the cluster 'ray start' started on this machine, else a Ray "
        "instance that the deployment starts and stops",
    )
    min_replicas: int | None = Field(
        default=None,
        description="backend 'ray': autoscale between this many replicas (default: 1; at "
        "least 1, no scale to zero) and max_replicas",
    )
    max_replicas: int | None = Field(
        default=None,
        ge=1,
        description="backend 'ray': autoscale between min_replicas and this many replicas on "
        "the requests queued and running per replica (unset: a fixed replica_num)",
    )
    target_ongoing_requests: float = Field(
        default=2.0,
        gt=0,
        description="backend 'ray', autoscaling: the requests per replica it aims at",
    )
    upscale_delay_s: float = Field(
        default=30.0,
        ge=0,
        description="backend 'ray', autoscaling: seconds the load must stay above the "
        "target before a replica is added",
    )
    downscale_delay_s: float = Field(
        default=600.0,
        ge=0,
        description="backend 'ray', autoscaling: seconds the load must stay below the "
        "target before a replica is removed",
    )
    # (float | str: Ray Serve's string keys too, aggregation_function and policy)
    autoscaling_config: dict[str, float | str] | None = Field(
        default=None,
        description="backend 'ray': more keys of Ray Serve's autoscaling_config "
        "(metrics_interval_s, look_back_period_s, upscaling_factor, ...; mii serve: "
        "KEY=VALUE,...), over the ones the options above give; autoscaling is on with it",
    )
    ray_num_cpus: float = Field(
        default=1.0,
        gt=0,
        description="backend 'ray': CPUs each replica reserves on its node",
    )
    ray_num_gpus: float | None = Field(
        default=None,
        ge=0,
        description="backend 'ray': GPUs each tensor-parallel rank reserves (default: 1 "
        "when the cluster has GPUs, else 0); a replica's ranks are on one node",
    )

    @field_validator("min_replicas")
    @classmethod
    def _no_scale_to_zero(cls, value: int | None) -> int | None:
        # Ray Serve could stop the last replica, but the next request would then wait
        # for a model load (minutes) and the health checks would report no replica.
        if value is not None and value < 1:
            raise InvalidRequestError(
                f"min_replicas must be at least 1 (got {value}): a deployment keeps one "
                "replica loaded (no scale to zero; a request would wait for the model to "
                "load)",
                field="min_replicas",
            )
        return value

    @model_validator(mode="after")
    def _ray_options_need_ray(self) -> RayOptions:
        if self.backend == "local" and self.ray_address is not None:
            raise InvalidRequestError(
                "ray_address is an option of backend='ray' (leave backend unset or set it "
                "to 'ray')",
                field="ray_address",
            )
        if not self.on_ray:
            # Values, not fields_set: a configuration read back from JSON sets every field.
            fields = RayOptions.model_fields
            given = [n for n in RAY_ONLY if getattr(self, n) != fields[n].default]
            if given:
                # (the scaling options' reason; ray_num_cpus/gpus are a Ray actor's share)
                scaling = given[0] not in ("ray_num_cpus", "ray_num_gpus")
                raise InvalidRequestError(
                    f"{given[0]} is an option of backend='ray' (set backend='ray' or "
                    "ray_address"
                    + ("; the local backend has a fixed replica_num)" if scaling else ")"),
                    field=given[0],
                )
        if (
            self.min_replicas is not None
            and self.max_replicas is not None
            and self.min_replicas > self.max_replicas
        ):
            raise InvalidRequestError(
                f"min_replicas ({self.min_replicas}) is more than max_replicas "
                f"({self.max_replicas})",
                field="min_replicas",
            )
        return self

    @property
    def on_ray(self) -> bool:
        """Whether the deployment runs on Ray."""
        return self.backend == "ray" or (self.backend is None and self.ray_address is not None)


def _count(value: Any) -> int | None:
    """A replica count as Ray Serve and the fields read one ("2", 2.0 too), else None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None


def replica_bounds(
    min_replicas: Any, max_replicas: Any, autoscaling_config: Any
) -> tuple[int | None, int | None]:
    """The (min, max) replicas Ray Serve gets: autoscaling_config's keys, which go over
    the options, else the options (None: unset)."""
    extra = autoscaling_config if isinstance(autoscaling_config, dict) else {}
    low = extra.get("min_replicas", min_replicas)
    high = extra.get("max_replicas", max_replicas)
    return _count(low), _count(high)


def starting_replicas(options: dict[str, Any]) -> int | None:
    """The replicas to start with when ``replica_num`` is left out under autoscaling:
    autoscaling_config's initial_replicas, else the minimum (None: the default, 1)."""
    extra = options.get("autoscaling_config")
    initial = _count(extra.get("initial_replicas")) if isinstance(extra, dict) else None
    low, _ = replica_bounds(options.get("min_replicas"), None, extra)
    start = initial or low
    return start if start is not None and start > 1 else None
