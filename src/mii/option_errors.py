"""One InvalidRequestError from pydantic's error list for a set of options: the
first bad option named, with what was given, and for an unknown name a hint: the
option DeepSpeed-MII's or vLLM's name means here, else the nearest known name."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from pydantic import ValidationError

from mii.errors import InvalidRequestError

# DeepSpeed-MII's names that ported code passes: what to write here instead.
DEEPSPEED_MII_NAMES = {
    name: (
        f" (DeepSpeed-MII's {name}: its keys are plain keyword arguments here, e.g. "
        "mii.serve(model, deployment_name=..., tensor_parallel=..., max_length=...))"
    )
    for name in ("mii_config", "model_config")
} | {"port_number": " (DeepSpeed-MII's port_number is port here: mii.serve(model, port=...))"}
_ENGINE_HINT = (
    " (DeepSpeed-MII's {name}: the engine's options are flat keywords here: token_budget "
    "(tokens per forward pass, ~max_ragged_batch_size), max_num_seqs "
    "(~max_ragged_sequence_count), num_kv_blocks or kv_cache_memory_fraction; "
    "docs/from_deepspeed_mii.md)"
)
_NOT_NEEDED = {
    "torch_dist_port": "the ranks' ports are chosen by mii",
    "zmq_port_number": "the ranks' ports are chosen by mii",
    "replica_configs": "replicas are placed by replica_num and device_map",
    "sync_debug": "no such mode",
    "profile_model_time": "no such mode",
    "checkpoint_dict": "the checkpoint is read from model_name_or_path",
    "task": "text generation is the one task",
}
DEEPSPEED_MII_NAMES |= {
    name: _ENGINE_HINT.format(name=name)
    for name in (
        "inference_engine_config",
        "state_manager",
        "max_ragged_batch_size",
        "max_ragged_sequence_count",
    )
} | {
    name: f" (DeepSpeed-MII's {name}: not needed here, {why}; remove it)"
    for name, why in _NOT_NEEDED.items()
}
# vLLM's names (its LLM / SamplingParams keywords) whose option here has another name.
VLLM_NAMES = {
    "max_tokens": "max_new_tokens",
    "max_model_len": "max_length",
    "gpu_memory_utilization": "kv_cache_memory_fraction",
    "tensor_parallel_size": "tensor_parallel",
    "max_num_batched_tokens": "token_budget",
}
STREAM_HINT = (
    " (streaming is a method: AsyncEngine.stream(prompt, ...), a client's "
    "stream(prompt, ...) or generate(..., streaming_fn=...))"
)


N_HINT = (
    " (one answer per prompt here: for several answers to one prompt pass it several "
    "times, with different seeds when seeded; the OpenAI routes take n)"
)


def unknown_name_hint(name: str, known: Iterable[str], per_request: Iterable[str] = ()) -> str:
    """What to write instead of the unknown option ``name`` ('' when nothing is near);
    ``per_request``: the generation options, when ``known`` are the engine's."""
    known, per_request = list(known), set(per_request) - set(known)
    ours = VLLM_NAMES.get(name, name)  # vLLM's max_tokens: max_new_tokens here
    if ours in per_request:
        said = f"vLLM's {name} is {ours} here, " if ours != name else f"{name} is "
        return (
            f" ({said}a generation option: give it with each request, e.g. "
            f"pipe(prompts, {ours}=...) or client.generate(prompts, {ours}=...))"
        )
    if name in DEEPSPEED_MII_NAMES:
        return DEEPSPEED_MII_NAMES[name]
    if name in VLLM_NAMES and VLLM_NAMES[name] in known:
        return f" (vLLM's {name} is {VLLM_NAMES[name]} here)"
    if name == "stream":
        return STREAM_HINT
    if name in ("n", "best_of") and "max_new_tokens" in known:  # a generation option
        return N_HINT
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    return f" (did you mean {near[0]!r}?)" if near else ""


def raise_option_error(
    err: ValidationError, what: str, known: Iterable[str] = (), per_request: Iterable[str] = ()
) -> None:
    """Turn pydantic's error list into one InvalidRequestError naming the first bad
    field; ``known``: the valid names, for the hint after an unknown one
    (``per_request``: unknown_name_hint's)."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or None
    if field is None:  # a rule about several options; its message names them
        message = f"invalid {what}s: {first['msg'].removeprefix('Value error, ')}"
    elif first["type"] == "extra_forbidden":
        message = f"unknown {what} {field!r}" + unknown_name_hint(field, known, per_request)
    else:
        shown = repr(first.get("input"))
        if len(shown) > 200:  # e.g. thousands of stop strings: the message stays short
            shown = shown[:200] + "..."
        said = first["msg"].removeprefix("Value error, ")
        message = f"invalid {what} {field!r}: {said} (got {shown})"
    raise InvalidRequestError(message, field=field) from None
