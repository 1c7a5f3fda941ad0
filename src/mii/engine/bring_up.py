"""Bringing an engine up, one named step at a time.

``EngineCore.__init__`` runs the steps in this order: join the tensor-parallel
group (when the model is split), load the model and tokenizer, size and
allocate the KV cache, compile the model (when asked), capture decode CUDA
graphs (on CUDA), and freeze the startup heap. Each step is a function of the
engine options and what the earlier steps made.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mii.config import EngineConfig, GenerateParams
from mii.engine import distributed, heap, pass_budget
from mii.engine.cuda_graphs import CudaGraphRunner
from mii.engine.distributed import TPGroup
from mii.engine.kv_cache import BlockManager, allocate_kv_tensors, choose_num_blocks
from mii.engine.model_runner import ModelRunner
from mii.engine.scheduler import ScheduledChunk
from mii.engine.sequence import Sequence
from mii.errors import InvalidRequestError
from mii.models import loader
from mii.models.base import CausalLM
from mii.ops.attention import FP8_KV_DTYPE
from mii.ops.dispatch import triton_attention_enabled

log = logging.getLogger(__name__)


def join_group(config: EngineConfig) -> tuple[torch.device, TPGroup | None]:
    """This process's device, and its tensor-parallel group when the model is split."""
    device = loader.default_device(config.device)
    if config.tensor_parallel <= 1:
        return device, None
    group = distributed.join(config.tensor_parallel, device.type)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", group.local_rank)  # one GPU per rank
    group.device = device
    return device, group


@dataclass
class LoadedModel:
    """The model and what requests are checked and ended by."""

    model: CausalLM
    tokenizer: Any
    dtype: torch.dtype
    vocab_size: int
    max_length: int  # the engine's cap on prompt + response
    eos_token_ids: list[int]  # every id that ends generation


def load_model(config: EngineConfig, device: torch.device) -> LoadedModel:
    """Read the checkpoint's config, build the model (this rank's shard) with its
    weights, and load the tokenizer."""
    model_dir = loader.resolve_model_dir(
        config.model, config.revision, weights=config.load_format != "dummy"
    )
    hf_config = loader.read_hf_config(model_dir)
    dtype = loader.choose_dtype(hf_config, config.dtype)
    torch.manual_seed(config.seed)
    model = loader.build_model(
        hf_config,
        model_dir,
        dtype,
        device,
        config.load_format,
        config.seed,
        quantization=config.quantization,
    )
    tokenizer = loader.load_tokenizer(model_dir, config.tokenizer, config.trust_remote_code)
    return LoadedModel(
        model,
        tokenizer,
        dtype,
        vocab_size=int(hf_config["vocab_size"]),
        max_length=loader.engine_max_length(config.max_length, model.max_positions),
        eos_token_ids=_eos_token_ids(hf_config, model_dir, tokenizer),
    )


def _eos_token_ids(hf_config: dict, model_dir: Path, tokenizer) -> list[int]:
    """Every id that ends generation: from config.json, generation_config.json and the tokenizer."""
    ids: set[int] = set()

    def take(value) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))

    take(hf_config.get("eos_token_id"))
    gen_file = model_dir / "generation_config.json"
    if gen_file.is_file():
        take(loader.read_json_object(gen_file).get("eos_token_id"))
    take(getattr(tokenizer, "eos_token_id", None))
    return sorted(ids)


@dataclass
class KVCache:
    """The KV cache tensors: ``num_blocks`` blocks that sequences own, plus one."""

    tensors: list[tuple[torch.Tensor, torch.Tensor]]  # (keys, values) per layer
    num_blocks: int  # block ``num_blocks`` is the scratch block (see allocate_kv_cache)
    dtype: torch.dtype


def scheduling_defaults(
    config: EngineConfig, loaded: LoadedModel, device: torch.device
) -> EngineConfig:
    """``config`` with token_budget / max_num_seqs left unset chosen for the device
    and, on CUDA, for the model's matmul work per token (engine/pass_budget.py)."""
    budget = None
    if device.type == "cuda" and config.token_budget is None:
        budget = pass_budget.default_token_budget(loaded.model, device)
    return config.with_device_defaults(device.type, cuda_budget=budget)


def allocate_kv_cache(
    config: EngineConfig,
    loaded: LoadedModel,
    device: torch.device,
    group: TPGroup | None,
) -> KVCache:
    """Size the KV pool (the option, or what free memory holds) and allocate it."""
    kv_dtype = FP8_KV_DTYPE if config.kv_cache_dtype == "fp8" else loaded.dtype
    kv_spec = loaded.model.kv_spec
    num_blocks = choose_num_blocks(
        kv_spec,
        config.kv_block_size,
        kv_dtype,
        device,
        requested=config.num_kv_blocks,
        memory_fraction=config.kv_cache_memory_fraction,
        cpu_bytes=config.cpu_kv_cache_bytes,
        max_length=loaded.max_length,
        max_num_seqs=config.max_num_seqs,
    )
    if group is not None:  # every rank must index the same blocks
        num_blocks = distributed.agree_on_min(group, num_blocks)
    # One block more than the pool: the scratch block that padded rows of a
    # CUDA-graph pass write into. No sequence ever owns it.
    tensors = allocate_kv_tensors(kv_spec, num_blocks + 1, config.kv_block_size, kv_dtype, device)
    return KVCache(tensors, num_blocks, kv_dtype)


def warn_if_pool_short(pool_tokens: int, max_length: int) -> None:
    """Warn when the KV pool holds fewer tokens than one sequence may reach (vLLM
    refuses to start; here a small pool is a choice, said once at startup)."""
    if pool_tokens < max_length:
        log.warning(
            "the KV cache holds %d tokens, fewer than max_length=%d: a longer prompt "
            "is refused, and an answer stops (finish_reason 'length') at %d tokens of "
            "prompt and answer, whatever its max_new_tokens; raise num_kv_blocks (or "
            "kv_cache_memory_fraction) or lower max_length",
            pool_tokens,
            max_length,
            pool_tokens,
        )


def kv_cache_dtype_name(dtype: torch.dtype) -> str:
    """The KV cache's dtype as the engine option names it: "fp8", or the model's
    dtype ("bfloat16", "float16", "float32") that "auto" stands for."""
    return "fp8" if dtype == FP8_KV_DTYPE else str(dtype).removeprefix("torch.")


def prefix_caching_allowed(config: EngineConfig, model: CausalLM) -> bool:
    """Whether prefix caching may run: asked for (the default) and the KV of a
    prefix does not depend on what follows it. It does under length-dependent rope
    scalings (dynamic NTK, longrope: keys are rotated for the whole sequence's
    length) and Phi-3's recompute past the original context; caching is off for
    those models, and the log says so."""
    if not config.enable_prefix_caching:
        return False
    length_dependent = any(getattr(m, "length_dependent", False) for m in model.modules())
    if length_dependent or model.rope_recompute_at is not None:
        log.info(
            "prefix caching is off for %s: its rope scaling rotates keys by the whole "
            "sequence's length, so a prefix's KV cannot be shared",
            config.model,
        )
        return False
    windows = {w for m in model.modules() if (w := getattr(m, "sliding_window", None))}
    if windows:
        log.info(
            "prefix caching is on with a sliding window of %s tokens: a sequence's blocks "
            "all stay cached, also those its attention no longer reads",
            "/".join(str(w) for w in sorted(windows)),
        )
    return True


def bound_prompt_attention_plans() -> None:
    """``MII_PROMPT_ATTENTION=library``: torch's bounded cuDNN attention plans, asked
    for before anything runs (``ops/library_attention.py``), and said in the log."""
    from mii.ops.library_attention import BOUNDED_PLANS_ENV, bound_cudnn_plans

    if bound_cudnn_plans():
        log.info(
            "MII_PROMPT_ATTENTION=library: %s=1 set for this process (cuDNN attention "
            "plans keyed on power-of-two lengths, for every caller)",
            BOUNDED_PLANS_ENV,
        )


def compile_model(config: EngineConfig, runner: ModelRunner, blocks: BlockManager) -> float:
    """torch.compile the model when asked (``compile=True``); warm-up seconds."""
    if not config.compile:
        return 0.0
    if not triton_attention_enabled(runner.device):
        raise InvalidRequestError(
            "compile=True needs a CUDA device and the Triton attention kernels",
            field="compile",
        )
    start = time.perf_counter()
    runner.enable_compile()
    # Compile now, on a prompt-sized and a decode-sized pass, not on the first request.
    for length in (17, 1):
        seq = Sequence("warm-up", [1] * length, GenerateParams(), 1, 0)
        blocks.allocate(seq, length)
        try:
            runner.run([ScheduledChunk(seq, length)])
        finally:
            blocks.free(seq)
    return time.perf_counter() - start


def capture_graphs(
    config: EngineConfig, runner: ModelRunner, kv_cache: KVCache, max_length: int
) -> float:
    """Capture decode CUDA graphs when on CUDA and the model allows it; seconds spent."""
    # The torch reference attention loops over host-side lengths, which a graph
    # would freeze: graphs need the Triton kernels, which read lengths on the GPU.
    capturable = triton_attention_enabled(runner.device) and runner.model.supports_cuda_graphs
    wanted = capturable if config.cuda_graphs is None else config.cuda_graphs
    if not wanted:
        return 0.0
    if not capturable:
        raise InvalidRequestError(
            "cuda_graphs=True needs a CUDA device, the Triton attention kernels "
            "(MII_ATTENTION unset or 'triton') and, for MoE models, the grouped "
            "expert kernel (MII_MOE unset or 'triton')",
            field="cuda_graphs",
        )
    block = config.kv_block_size
    graphs = CudaGraphRunner(
        runner.model,
        runner.forward,
        kv_cache.tensors,
        block,
        max_batch=min(config.max_graph_batch, config.max_num_seqs),
        max_blocks_per_seq=(max_length + block - 1) // block,
        scratch_block=kv_cache.num_blocks,
        device=runner.device,
    )
    seconds = graphs.capture()
    runner.graphs = graphs
    return seconds


def freeze_heap(device: torch.device) -> bool:
    """Keep full garbage collections off the startup heap (engine/heap.py): they
    would walk it and idle the GPU. On CUDA, where such pauses cost the most;
    returns whether this engine froze it (and must thaw it when released)."""
    if device.type != "cuda":
        return False
    heap.freeze_startup_heap()
    return True
