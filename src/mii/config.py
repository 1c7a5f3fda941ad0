"""Validated options: engine options (per engine) and generation options (per request).

Validation lives here so that every entry point (pipeline, AsyncEngine, servers)
rejects the same bad input with the same message, naming the field. The fields'
descriptions are also the help of the ``mii`` command line's options, and the
per-surface defaults of ``max_new_tokens`` are declared here, once.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mii.constraint_options import ConstraintOptions
from mii.errors import InvalidRequestError
from mii.option_errors import raise_option_error
from mii.sampling_options import LogitsOptions
from mii.scheduling_options import SchedulingOptions

# Integer options fit a signed 64-bit integer (what the engine's tensors and the
# gRPC messages hold); a larger one is refused naming the field, so that it can
# never fail inside a forward pass shared with other requests.
INT64_LIMIT = 2**63
# A temperature below this is greedy decoding (dividing logits by a smaller one
# would overflow to inf/nan in float32 instead of picking the most likely token).
GREEDY_TEMPERATURE = 1e-5
# The sampler divides 32-bit logits by the temperature: a larger one (3.5e38) became
# inf there, turned the masked -inf logits into NaN, and a grammar, allowed_token_ids
# or min_tokens no longer held (a 500, or tokens outside the list). Any temperature
# above ~100 already samples nearly uniformly.
MAX_TEMPERATURE = 1e30
# Stop strings of one request: each is matched against every new piece of its
# text, so their number and length are capped (OpenAI allows 4).
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LENGTH = 256
# Most likely tokens a request may ask for at each position (logprobs,
# prompt_logprobs): OpenAI's top_logprobs limit, and vLLM's default.
MAX_LOGPROBS = 20


# Other names of generation options: alias -> the option's own name.
OPTION_ALIASES = {"min_tokens": "min_new_tokens"}


class GenerateParams(LogitsOptions, ConstraintOptions):
    """Per-request generation options (README.md, "Generation options"); the logits
    processors' options (penalties, min_p, logit_bias, ...) come from LogitsOptions,
    the structured-output ones (json_schema, regex, choice, grammar) from
    ConstraintOptions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_length: int | None = Field(
        default=None,
        gt=0,
        lt=INT64_LIMIT,
        description="cap on prompt + response tokens of this request",
    )
    min_new_tokens: int = Field(
        default=0,
        ge=0,
        lt=INT64_LIMIT,
        description="generate at least N tokens before end-of-sequence may stop",
    )
    max_new_tokens: int | None = Field(
        default=None,
        ge=0,
        lt=INT64_LIMIT,
        description="maximum tokens to generate per prompt (default: the room left in the context)",
    )
    ignore_eos: bool = Field(
        default=False,
        description="keep generating past end-of-sequence (always max-new-tokens tokens)",
    )
    top_p: float = Field(
        default=0.9, gt=0.0, le=1.0, description="nucleus sampling threshold in (0, 1]"
    )
    top_k: int | None = Field(
        default=None,
        gt=0,
        lt=INT64_LIMIT,
        description="sample only among the k most likely tokens (more than the vocabulary, "
        "-1 or 0: all)",
    )
    temperature: float | None = Field(
        default=None,
        ge=0.0,
        le=MAX_TEMPERATURE,
        description="rescale logits; 0 (or below 1e-5) means greedy",
    )
    do_sample: bool = Field(default=True, description="sample; False: greedy decoding")
    return_full_text: bool = Field(
        default=False, description="prefix the generated text with the prompt"
    )
    stop: tuple[str, ...] = Field(
        default=(),
        description=f"stop string; the text ends before it (repeatable: at most "
        f"{MAX_STOP_STRINGS}, of at most {MAX_STOP_STRING_LENGTH} characters each)",
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        lt=INT64_LIMIT,
        description="seed for reproducible sampling (default: drawn from the engine's seed in "
        "arrival order: a fresh process repeats its answers to the same requests)",
    )

    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="return each generated token's log-probability and the N most likely "
        f"tokens at its position (0: the token's own only; at most {MAX_LOGPROBS})",
    )
    prompt_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="return each prompt token's log-probability (the first: none) and the N "
        "most likely tokens at its position, from the model's raw distribution",
    )
    logprobs_mode: Literal["raw", "processed"] = Field(
        default="raw",
        description="logprobs of the model's raw distribution, or 'processed': of the "
        "distribution sampled from (after penalties, temperature, top-k and top-p)",
    )

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, values: Any) -> Any:
        # min_tokens (vLLM's and OpenAI-compatible servers' name) is min_new_tokens.
        if isinstance(values, dict) and "min_tokens" in values:
            values = dict(values)
            alias = values.pop("min_tokens")
            if alias is None:  # (None: the default, as for every option)
                return values
            if values.get("min_new_tokens") is None:
                values["min_new_tokens"] = alias
            elif values["min_new_tokens"] != alias:  # parse() names min_tokens
                raise ValueError("min_tokens is another name of min_new_tokens: give one of them")
        return values

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, value: Any) -> Any:
        if value is None:
            return ()
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (list, tuple)):  # (pydantic's words: "a valid tuple")
            raise ValueError("must be a string or a list of strings")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings ({len(value)} given)")
        if any(len(s) > MAX_STOP_STRING_LENGTH for s in value):
            raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_LENGTH} characters")
        return value

    @field_validator("top_k", mode="before")
    @classmethod
    def _every_token(cls, value: Any) -> Any:
        if isinstance(value, bool):  # (before ExactTypes': False would read as 0, "all")
            raise ValueError("must be an integer, not a boolean")
        # -1 and 0 mean no top-k limit, as in vLLM's SamplingParams and on the HTTP routes
        if isinstance(value, int) and value < -1:  # ("greater than 0" would be wrong)
            raise ValueError("must be a positive integer, or -1 or 0 for every token")
        return None if isinstance(value, int) and value in (-1, 0) else value

    @field_validator("max_new_tokens")
    @classmethod
    def _not_below_min_new_tokens(cls, value: int | None, info: ValidationInfo) -> int | None:
        minimum = info.data.get("min_new_tokens", 0)
        if value is not None and minimum > value:
            raise ValueError(
                f"must be at least min_new_tokens ({minimum}); lower min_new_tokens or raise it"
            )
        return value

    @field_validator("top_p", "temperature", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        # before the bounds: NaN would read "should be greater than or equal to 0"
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @property
    def greedy(self) -> bool:
        """True when the request takes the most likely token at every step."""
        return not self.do_sample or (
            self.temperature is not None and self.temperature < GREEDY_TEMPERATURE
        )

    @classmethod
    def parse(cls, **options: Any) -> GenerateParams:
        """Validate keyword options; raise InvalidRequestError naming the bad field."""
        for alias, name in OPTION_ALIASES.items():
            given = options.get(alias) is not None and options.get(name) is not None
            if given and options[alias] != options[name]:  # (None: not given)
                raise InvalidRequestError(
                    f"invalid generation option {alias!r}: it is another name of {name}; "
                    "give one of them",
                    field=alias,
                )
        try:
            return cls(**options)
        except ValidationError as err:
            try:
                raise_option_error(err, "generation option", [*cls.model_fields, *OPTION_ALIASES])
            except InvalidRequestError as invalid:
                alias = next((a for a, n in OPTION_ALIASES.items() if n == invalid.field), None)
                if alias in options and invalid.field not in options:  # name what was given
                    message = str(invalid).replace(repr(invalid.field), repr(alias), 1)
                    raise InvalidRequestError(message, field=alias) from None
                raise
            raise  # unreachable; keeps type checkers calm


# max_new_tokens of a request that sets neither it nor max_length, by surface: the
# one place each is declared. The Python API (pipeline, AsyncEngine, mii.client)
# and gRPC leave it to GenerateParams (None: the room left in the context). The
# interactive surfaces deliberately show a short answer instead, and the OpenAI
# completions route follows OpenAI's documentation.
CLI_MAX_NEW_TOKENS = 48  # mii generate / mii demo: a quick look, in a terminal
MAGIC_MAX_NEW_TOKENS = 128  # %mii / %%mii: a paragraph, in a notebook cell
OPENAI_COMPLETIONS_MAX_TOKENS = 16  # POST /v1/completions: OpenAI's documented default
# (POST /v1/chat/completions has no fixed default in OpenAI's API: the engine's, None.)

# max_queued_requests of each replica of a deployment (mii.serve, mii serve): a
# server must refuse what it cannot start soon. 1024 = max_num_seqs' 128 running
# plus 896 queued. In-process (pipeline, AsyncEngine) there is no limit: a script
# queues as much as it wants.
DEPLOYMENT_MAX_QUEUED_REQUESTS = 1024

# EngineConfig.dtype's other names: vLLM's and torch's (half, float), DeepSpeed-MII's (fp16, ...)
DTYPE_ALIASES = {"half": "float16", "float": "float32",
                 "fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}  # fmt: skip


def dtype_by_name(value: Any) -> Any:
    """A torch dtype (``torch.bfloat16``, as vLLM and transformers take it) as its
    name; any other value as it is."""
    if type(value).__name__ == "dtype" and type(value).__module__ == "torch":
        return str(value).removeprefix("torch.")
    return value


class EngineConfig(SchedulingOptions):
    """Options of one engine: the model, the KV cache and the scheduler (the
    scheduler's from SchedulingOptions; no number given as a boolean: ExactTypes)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str = Field(
        min_length=1, description="Hugging Face hub id, local checkpoint directory or .gguf file"
    )
    tokenizer: str | None = Field(
        default=None, description="tokenizer hub id or directory (default: the model's)"
    )
    revision: str | None = Field(
        default=None, description="hub branch, tag or commit (default: the hub's default)"
    )
    dtype: Literal[  # (other names: DTYPE_ALIASES)
        "auto", "float32", "float16", "bfloat16", "half", "float", "fp16", "bf16", "fp32"
    ] = Field(
        default="auto",
        description="weight and activation dtype; auto: the checkpoint's (half = fp16 = "
        "float16, bf16 = bfloat16, float = fp32 = float32)",
    )
    device: str | None = Field(
        default=None, description="torch device: cuda, cuda:1, cpu... (default: cuda if any)"
    )
    load_format: Literal["auto", "safetensors", "pt", "dummy"] = Field(
        default="auto",
        description="checkpoint format; dummy = random weights of the real shapes",
    )
    trust_remote_code: bool = Field(
        default=False, description="allow the checkpoint's own Python code, as in transformers"
    )
    max_length: int | None = Field(
        default=None,
        gt=0,
        description="engine-wide cap on prompt + response tokens (default: the model config's)",
    )
    kv_block_size: int = Field(default=16, gt=0, le=1024, description="tokens per KV cache block")
    # fp8: scale 1, clamped to +-448; half the memory and half the bytes each decode step reads.
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        default="auto",
        description="KV cache dtype: auto (the activations') or fp8 (e4m3, half the memory)",
    )
    num_kv_blocks: int | None = Field(
        default=None,
        gt=0,
        description="size of the KV block pool (default: sized from free memory)",
    )
    # docs/quantization.md. A pre-quantized checkpoint (compressed-tensors or
    # fbgemm_fp8 FP8) loads as such whatever this says.
    quantization: Literal["none", "fp8"] = Field(
        default="none",
        description="weight quantization: fp8 = linear layers' weights quantized at load to "
        "float8 e4m3 with per-output-channel scales (LM head and embeddings stay 16-bit)",
    )
    kv_cache_memory_fraction: float = Field(
        default=0.85,
        gt=0.0,
        le=1.0,
        description="share of the free GPU memory (after loading) the KV block pool takes "
        "(mii serve's --gpu-memory-utilization: vLLM's name, whose share is of the whole "
        "GPU, weights included; docs/cli.md)",
    )
    cpu_kv_cache_bytes: int = Field(
        default=1 << 30, gt=0, description="bytes of the KV block pool on the CPU"
    )
    enable_prefix_caching: bool = Field(
        default=True,
        description="reuse the KV of prompt prefixes already computed (shared system "
        "prompts, chat history, n > 1): only the rest of a prompt runs",
    )
    max_queued_requests: int | None = Field(
        default=None,
        gt=0,
        lt=INT64_LIMIT,
        description="requests the engine holds, queued or being generated; beyond, a new "
        "one is refused at once (ServerOverloadedError: HTTP 429 / gRPC RESOURCE_EXHAUSTED, "
        "with a Retry-After) "
        "(default: no limit in-process; a deployment's replicas default to "
        f"{DEPLOYMENT_MAX_QUEUED_REQUESTS} each)",
    )
    # > 1 runs one process per rank (torchrun, or the worker processes of a
    # deployment), see mii.engine.distributed.
    tensor_parallel: int = Field(default=1, gt=0, description="ranks the model is split over")
    seed: int = Field(
        default=0,
        description="seed of torch at load time (and of the dummy weights) and of the "
        "sampling of requests that give no seed: each draws its seed, in arrival order, "
        "from a stream this starts (the same requests in the same order sample the same "
        "tokens; a request's own seed makes it reproducible whatever else runs)",
    )
    cuda_graphs: bool | None = Field(
        default=None,
        description="replay decode passes as CUDA graphs "
        "(default: on for CUDA when the model supports it)",
    )
    max_graph_batch: int = Field(
        default=256, gt=0, description="largest decode batch replayed as a CUDA graph"
    )
    compile: bool = Field(
        default=False, description="torch.compile the model around the attention op"
    )
    # Host work overlaps the GPU; on the CPU nothing overlaps.
    async_scheduling: bool | None = Field(
        default=None,
        description="schedule and launch pass N+1 before reading pass N's tokens "
        "(default: on for CUDA)",
    )

    @field_validator("dtype", mode="before")
    @classmethod
    def _torch_dtype_by_name(cls, value: Any) -> Any:
        return dtype_by_name(value)

    @field_validator("dtype")
    @classmethod
    def _canonical_dtype(cls, value: str) -> str:
        return DTYPE_ALIASES.get(value, value)

    @field_validator("quantization", mode="before")
    @classmethod
    def _no_quantization(cls, value: Any) -> Any:
        """None means no quantization (vLLM's ``quantization=None``)."""
        return "none" if value is None else value

    @classmethod
    def parse(cls, model: str, **options: Any) -> EngineConfig:
        """Validate engine options; raise InvalidRequestError naming the bad field."""
        if isinstance(model, os.PathLike):  # a pathlib.Path to a checkpoint or .gguf file
            model = os.fspath(model)
        try:
            return cls(model=model, **options)
        except ValidationError as err:
            raise_option_error(err, "engine option", cls.model_fields, GenerateParams.model_fields)
            raise
