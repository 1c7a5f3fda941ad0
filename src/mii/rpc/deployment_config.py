"""The configuration of a persistent deployment, validated once, where it is made.

``mii.serve`` and ``mii serve`` build a :class:`DeploymentConfig` from their
options (:meth:`DeploymentConfig.parse`); the deployment process receives it as
JSON and gives each replica process a :class:`ReplicaConfig`, also as JSON:
the deployment's configuration plus the replica's own port and GPUs. Nothing
re-defaults an option on the way.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mii.config import EngineConfig
from mii.errors import DeploymentError, InvalidRequestError
from mii.rpc import registry

# Replicas listen on the loopback only: clients reach them through the deployment's
# load balancer, which listens on the deployment's host and port.
REPLICA_HOST = "127.0.0.1"


class GpuLayout(BaseModel):
    """How a deployment's ranks map onto GPUs: ``replica_num`` replicas of
    ``tensor_parallel`` ranks each, on the GPUs of ``device_map`` in order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor_parallel: int = Field(
        default=1, description="ranks (GPUs) each replica's model is split over"
    )
    replica_num: int = Field(default=1, description="copies of the model, load-balanced")
    device_map: list[int] | None = Field(
        default=None,
        description="GPU indices the deployment uses, replica after replica (default: 0, 1, ...)",
    )

    @field_validator("tensor_parallel", "replica_num")
    @classmethod
    def _at_least_one(cls, value: int, info) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be at least 1")
        return value

    @model_validator(mode="after")
    def _device_map_fits(self) -> GpuLayout:
        if self.device_map is None:
            return self
        if len(self.device_map) < self.gpus_needed:
            raise ValueError(
                f"device_map lists {len(self.device_map)} GPUs; tensor_parallel="
                f"{self.tensor_parallel} x replica_num={self.replica_num} needs {self.gpus_needed}"
            )
        if len(set(self.device_map)) != len(self.device_map) or min(self.device_map) < 0:
            raise ValueError("device_map must list distinct GPU indices (0, 1, ...)")
        return self

    @property
    def gpus_needed(self) -> int:
        return self.tensor_parallel * self.replica_num


class DeploymentConfig(GpuLayout):
    """Everything a deployment runs with; the keyword options of ``mii.serve``.

    Options named like a field here configure the deployment; every other
    option of ``mii.serve`` is an engine option (``max_length``,
    ``kv_block_size``, ...), validated by :class:`mii.config.EngineConfig`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str = Field(description="Hugging Face hub id or local checkpoint directory")
    deployment_name: str = Field(
        description="name clients use to find it (default: MODEL-mii-deployment)"
    )
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=50050, description="gRPC port")
    enable_restful_api: bool = Field(
        default=False,
        description="also serve the REST API (/mii/NAME) and the OpenAI-compatible API (/v1)",
    )
    restful_api_port: int = Field(default=28080, description="REST API port")
    startup_timeout: float = Field(
        default=600.0, description="seconds to wait for the replicas to load"
    )
    replica_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="seconds a replica may go without progress (no piece of a request in "
        "flight and no answer to its health probes) before its requests fail with "
        "UNAVAILABLE (HTTP 503) and it leaves rotation",
    )
    replica_max_restarts: int = Field(
        default=5,
        ge=0,
        description="restarts of a replica whose process exited allowed within "
        "replica_restart_window_s; after that it is reported failed and left down",
    )
    replica_restart_window_s: float = Field(
        default=600.0, gt=0, description="seconds over which replica_max_restarts counts"
    )
    replica_restart_backoff_s: float = Field(
        default=1.0,
        ge=0,
        description="seconds before the first restart of a replica; doubled for each "
        "recent restart (up to 60 s)",
    )
    replica_unresponsive_restart_s: float = Field(
        default=120.0,
        ge=0,
        description="seconds a replica that served may stay unresponsive (or NOT_SERVING) "
        "before it is killed and restarted; 0: never",
    )
    shutdown_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="on SIGTERM, SIGINT or Terminate: seconds in-flight requests get to "
        "finish before they are ended (new requests are refused at once)",
    )
    tp_master_addr: str = Field(
        default="127.0.0.1",
        description="address of the rendezvous of each tensor-parallel replica's ranks",
    )
    engine_options: dict[str, Any] = Field(
        default_factory=dict, description="options of each replica's engine (EngineConfig)"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("deployment_name") and "model" in data:
            data = {**data, "deployment_name": f"{data['model']}-mii-deployment"}
        return data

    @model_validator(mode="after")
    def _engine_options_valid(self) -> DeploymentConfig:
        self.engine_config()  # raises InvalidRequestError naming the bad option
        return self

    def engine_config(self) -> EngineConfig:
        """The configuration of each replica's engine (split over ``tensor_parallel`` ranks)."""
        return EngineConfig.parse(
            self.model, **{**self.engine_options, "tensor_parallel": self.tensor_parallel}
        )

    @classmethod
    def parse(cls, model: str, **options: Any) -> DeploymentConfig:
        """Validate ``mii.serve``'s options, before anything starts.

        A bad option raises the ValueError (or ``InvalidRequestError``) that names
        it; a name that a running deployment already has, ``DeploymentError``.
        """
        deployment_fields = set(cls.model_fields) - {"model", "engine_options"}
        fields = {k: options.pop(k) for k in list(options) if k in deployment_fields}
        try:
            config = cls(model=model, engine_options=options, **fields)
        except ValidationError as err:
            raise _first_error(err) from None
        if registry.lookup(config.deployment_name) is not None:
            raise DeploymentError(
                f"a deployment named {config.deployment_name!r} is already running"
            )
        return config


class ReplicaConfig(BaseModel):
    """What one replica process runs: the deployment's engine, on its own port and GPUs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deployment: DeploymentConfig
    port: int  # on REPLICA_HOST
    gpus: list[int] | None = None  # its CUDA_VISIBLE_DEVICES; None: no GPUs (CPU)
    tp_master_port: int | None = None  # the rendezvous port of its ranks (tensor_parallel > 1)

    @property
    def address(self) -> str:
        return f"{REPLICA_HOST}:{self.port}"


def _first_error(err: ValidationError) -> Exception:
    """The exception to raise for pydantic's first error: the one a validator above
    raised, as it is; for a value of the wrong type, an InvalidRequestError naming it."""
    first = err.errors()[0]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, Exception):
        return cause
    field = ".".join(str(p) for p in first["loc"])
    message = f"invalid deployment option {field!r}: {first['msg']} (got {first.get('input')!r})"
    return InvalidRequestError(message, field=field)
