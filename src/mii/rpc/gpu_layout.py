"""How a deployment's ranks map onto GPUs: replicas of tensor-parallel ranks, on
the GPUs of ``device_map`` in order (DeepSpeed-MII's forms of it taken too)."""

from __future__ import annotations

import socket
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mii.errors import InvalidRequestError


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
            raise InvalidRequestError(
                f"{info.field_name} must be at least 1", field=info.field_name
            )
        return value

    @field_validator("device_map", mode="before")
    @classmethod
    def _deepspeed_mii_device_map(cls, value: Any) -> Any:
        """DeepSpeed-MII's forms: ``"auto"`` (the default), and ``{host: [[GPUs of
        replica 0], [GPUs of replica 1], ...]}`` for this machine's host name, its
        GPU lists read in order."""
        if value == "auto":
            return None
        if isinstance(value, dict):
            local = {"localhost", "127.0.0.1", socket.gethostname()}
            if len(value) != 1 or next(iter(value)) not in local:
                raise InvalidRequestError(
                    "device_map {host: [[GPUs], ...]} names this machine only "
                    "('localhost'); replicas on other machines run on a Ray cluster "
                    "(ray_address, docs/multi_node.md)",
                    field="device_map",
                )
            lists = next(iter(value.values()))
            if not isinstance(lists, list) or not all(isinstance(g, list) for g in lists):
                raise InvalidRequestError(
                    "device_map {host: [[GPUs of replica 0], ...]}: a list of lists of GPU indices",
                    field="device_map",
                )
            return [gpu for replica in lists for gpu in replica]
        return value

    @model_validator(mode="after")
    def _device_map_fits(self) -> GpuLayout:
        if self.device_map is None:
            return self
        if len(self.device_map) < self.gpus_needed:
            raise InvalidRequestError(
                f"device_map lists {len(self.device_map)} GPUs; tensor_parallel="
                f"{self.tensor_parallel} x replica_num={self.replica_num} needs "
                f"{self.gpus_needed}",
                field="device_map",
            )
        if len(set(self.device_map)) != len(self.device_map) or min(self.device_map) < 0:
            raise InvalidRequestError(
                "device_map must list distinct GPU indices (0, 1, ...)", field="device_map"
            )
        return self

    @property
    def gpus_needed(self) -> int:
        return self.tensor_parallel * self.replica_num
