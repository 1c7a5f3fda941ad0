"""Validated options: engine options (per engine) and generation options (per request).

Validation lives here so that every entry point (pipeline, AsyncEngine, servers)
rejects the same bad input with the same message, naming the field.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mii.errors import InvalidRequestError


def _raise_from_pydantic(err: ValidationError, what: str) -> None:
    """Turn pydantic's error list into one InvalidRequestError naming the first bad field."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or None
    if field is None:  # a rule about several options; its message names them
        message = f"invalid {what}s: {first['msg'].removeprefix('Value error, ')}"
    elif first["type"] == "extra_forbidden":
        message = f"unknown {what} {field!r}"
    else:
        shown = first.get("input")
        message = f"invalid {what} {field!r}: {first['msg']} (got {shown!r})"
    raise InvalidRequestError(message, field=field) from None


class GenerateParams(BaseModel):
    """Per-request generation options (defaults as in README.md's "Generation options" table)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_length: int | None = Field(default=None, gt=0)
    min_new_tokens: int = Field(default=0, ge=0)
    max_new_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool = False
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0.0)
    do_sample: bool = True
    return_full_text: bool = False
    stop: tuple[str, ...] = ()
    seed: int | None = Field(default=None, ge=0, lt=2**63)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, value: Any) -> Any:
        if value is None:
            return ()
        if isinstance(value, str):
            value = (value,)
        return value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("top_p", "temperature")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @property
    def greedy(self) -> bool:
        """True when the request takes the most likely token at every step."""
        return not self.do_sample or self.temperature == 0.0

    @classmethod
    def parse(cls, **options: Any) -> GenerateParams:
        """Validate keyword options; raise InvalidRequestError naming the bad field."""
        try:
            return cls(**options)
        except ValidationError as err:
            _raise_from_pydantic(err, "generation option")
            raise  # unreachable; keeps type checkers calm


class EngineConfig(BaseModel):
    """Options of one engine: the model, the KV cache and the scheduler."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str
    tokenizer: str | None = None
    revision: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str | None = None
    load_format: Literal["auto", "safetensors", "pt", "dummy"] = "auto"
    trust_remote_code: bool = False
    max_length: int | None = Field(default=None, gt=0)
    kv_block_size: int = Field(default=16, gt=0, le=1024)
    # "fp8": keys and values stored as float8 e4m3 (scale 1, clamped to +-448):
    # half the memory and half the bytes each decode step reads.
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    num_kv_blocks: int | None = Field(default=None, gt=0)
    kv_cache_memory_fraction: float = Field(default=0.85, gt=0.0, le=1.0)
    cpu_kv_cache_bytes: int = Field(default=1 << 30, gt=0)
    token_budget: int = Field(default=1024, gt=0)
    max_num_seqs: int = Field(default=128, gt=0)
    # Ranks the model is split over; > 1 runs one process per rank (torchrun, or
    # the worker processes of a deployment), see mii.engine.distributed.
    tensor_parallel: int = Field(default=1, gt=0)
    seed: int = 0
    cuda_graphs: bool | None = None  # None: on for CUDA when the model supports it
    max_graph_batch: int = Field(default=256, gt=0)
    compile: bool = False  # torch.compile the model around the attention op
    # Schedule and launch pass N+1 before reading pass N's tokens, so that host
    # work overlaps the GPU. None: on for CUDA (off on CPU, where nothing overlaps).
    async_scheduling: bool | None = None

    @model_validator(mode="after")
    def _budget_covers_decodes(self) -> EngineConfig:
        # Decodes are scheduled first, one token each; a budget smaller than the
        # sequence cap would leave admitted sequences unable to advance.
        if self.token_budget < self.max_num_seqs:
            raise ValueError(
                f"token_budget ({self.token_budget}) must be at least max_num_seqs "
                f"({self.max_num_seqs}); raise token_budget or lower max_num_seqs"
            )
        return self

    @classmethod
    def parse(cls, model: str, **options: Any) -> EngineConfig:
        """Validate engine options; raise InvalidRequestError naming the bad field."""
        try:
            return cls(model=model, **options)
        except ValidationError as err:
            _raise_from_pydantic(err, "engine option")
            raise
