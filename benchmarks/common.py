"""Shared pieces of the benchmarks: model shapes, the roofline, and JSON output."""

from __future__ import annotations

import json
import os
import platform
import random
import string
import subprocess
import tempfile
import time
from pathlib import Path

import torch

# Llama-2-7B's architecture (random weights are fine: speed does not depend on them).
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
}
# Llama-3-8B: grouped-query attention (8 KV heads for 32 query heads), a wider MLP
# and a 128k vocabulary; the layout of most current models.
LLAMA3_8B = LLAMA2_7B | {
    "vocab_size": 128256,
    "intermediate_size": 14336,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
# Llama-3.1-8B: the same layers with a 131k window (llama3 rope scaling), for the
# long-context benchmark.
LLAMA3_8B_131K = LLAMA3_8B | {
    "max_position_embeddings": 131072,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
# Llama-3-70B: 80 layers of hidden 8192; fits one H200 only with float8 weights
# (``--quantization fp8``: ~70 GB, against ~140 GB in bf16).
LLAMA3_70B = LLAMA3_8B | {
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}
# Mixtral-8x7B: Llama-3-8B's attention layout with 8 experts of intermediate 14336
# per layer, 2 routed per token (46.7B parameters, 12.9B active per token; ~93 GB in
# bf16, so one H200 holds it with ~40 GB left for the KV cache).
MIXTRAL_8X7B = LLAMA3_8B | {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

SHAPES = {
    "llama2-7b": LLAMA2_7B,
    "llama3-8b": LLAMA3_8B,
    "llama3-8b-131k": LLAMA3_8B_131K,
    "llama3-70b": LLAMA3_70B,
    "mixtral-8x7b": MIXTRAL_8X7B,
}


def model_dir(shape: str, full_vocab: bool = False) -> str:
    """A checkpoint folder with only config.json and a tokenizer (use load_format='dummy').

    The tokenizer is the demo's (512 tokens: most ids a random model generates
    decode to no text), or with ``full_vocab`` one of exactly the model's
    vocabulary size, so that every generated token makes text as with the real
    tokenizer: what streaming costs (detokenizing, one SSE chunk per piece of
    text) depends on it."""
    from mii.demo import _CORPUS, train_tokenizer

    path = Path(tempfile.gettempdir()) / f"mii-bench-{shape}{'-full-vocab' if full_vocab else ''}"
    if not (path / "config.json").is_file():
        path.mkdir(parents=True, exist_ok=True)
        vocab_size = SHAPES[shape]["vocab_size"]
        texts = synthetic_text(vocab_size) if full_vocab else _CORPUS.splitlines() * 4
        train_tokenizer(texts, vocab_size if full_vocab else 512).save_pretrained(path)
        (path / "config.json").write_text(json.dumps(SHAPES[shape]))  # last: the folder is whole
    return str(path)


def synthetic_text(words: int, seed: int = 0) -> list[str]:
    """Lines of about ``words`` distinct random lowercase words (3-9 letters): enough
    distinct pieces for a byte-level BPE to reach that many tokens (a few seconds)."""
    rng = random.Random(seed)
    unique = sorted(
        {"".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(words)}
    )
    return [" ".join(unique[i : i + 50]) for i in range(0, len(unique), 50)]


def num_params(config: dict, active: bool = False) -> int:
    """Parameters of the model; with ``active`` those one token uses (a mixture of
    experts runs ``num_experts_per_tok`` of its ``num_local_experts`` MLPs): the
    count behind compute floors (2 FLOPs per active parameter per token) and batch
    1's bandwidth floor (each active weight read once per token)."""
    h, i, layers, v = (
        config["hidden_size"],
        config["intermediate_size"],
        config["num_hidden_layers"],
        config["vocab_size"],
    )
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    experts = config.get("num_local_experts", 0)
    used = config.get("num_experts_per_tok", experts) if active else experts
    mlp = 3 * h * i * used + h * experts if experts else 3 * h * i  # + the router
    per_layer = h * (h + 2 * kv) + h * h + mlp
    return layers * per_layer + 2 * v * h


def projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """The [N, K] weights of a dense decoder layer's projections (qkv, o and gate_up
    fused as mii loads them) and of the LM head, for kernel timings."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    return {
        "qkv": (h + 2 * kv, h),
        "o": (h, h),
        "gate_up": (2 * i, h),
        "down": (h, i),
        "lm_head": (v, h),
    }


def hf_config(config: dict):
    """The transformers config of a benchmark shape (Llama or Mixtral), for the HF peer."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    return AutoConfig.for_model(config["model_type"], **fields)


def weight_bytes(config: dict, quantization: str = "none") -> int:
    """Bytes of weights read per decoded token at batch 1 (bf16; a mixture of
    experts reads its routed experts only; with ``quantization="fp8"`` the
    decoder's linear weights take one byte each, the embedding, LM head and
    routers stay bf16: docs/quantization.md)."""
    unquantized = unquantized_params(config)
    linear = num_params(config, active=True) - unquantized
    return unquantized * 2 + linear * (1 if quantization == "fp8" else 2)


def unquantized_params(config: dict) -> int:
    """Parameters that stay 16-bit under FP8 weights: embeddings, LM head, MoE routers."""
    embeddings = 2 * config["vocab_size"] * config["hidden_size"]
    experts = config.get("num_local_experts", 0)
    return embeddings + config["num_hidden_layers"] * config["hidden_size"] * experts


def roofline(device: torch.device, fp8: bool = False) -> dict:
    """Measured bf16 matmul TFLOP/s and device-to-device copy bandwidth (read + write);
    with ``fp8`` also the float8 matmul rate (``matmul_fp8_tflops``: ``torch._scaled_mm``
    with row-wise scales, as FP8 weights' prompt passes run it; None where the GPU
    has no FP8 tensor cores)."""
    if device.type != "cuda":
        return {}
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    flops = 2 * 8192**3
    tflops = flops / _time_cuda(lambda: a @ b) / 1e12
    src = torch.randn(2 * 1024**3 // 2, device=device, dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    copy_s = _time_cuda(lambda: dst.copy_(src))
    rates = {
        "matmul_bf16_tflops": round(tflops, 1),
        "copy_tb_per_s": round(2 * src.numel() * 2 / copy_s / 1e12, 3),
    }
    if fp8:
        rates["matmul_fp8_tflops"] = _fp8_matmul_tflops(a, b)
    return rates


def _fp8_matmul_tflops(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if torch.cuda.get_device_capability(a.device) < (8, 9):
        return None
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    scale_a = torch.ones(a.shape[0], 1, device=a.device)
    scale_b = torch.ones(1, b.shape[0], device=a.device)

    def matmul():
        # the second operand column-major, as fp8_linear passes a weight
        return torch._scaled_mm(a8, b8.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=a.dtype)

    return round(2 * a.shape[0] * a.shape[1] * b.shape[0] / _time_cuda(matmul) / 1e12, 1)


# GPU cycles the stream spins before a timed batch of calls (~2.5 ms on an H100 /
# H200): long enough for the host to queue the batch behind it.
QUEUE_SPIN_CYCLES = 5_000_000


def _time_cuda(fn, repeat: int = 20, calls: int = 1) -> float:
    """Median seconds of one ``fn()`` on the GPU. ``calls`` > 1 times that many calls
    and divides, queued behind a GPU spin so that they run back to back as a CUDA
    graph replays them: a small kernel's own time, without the host's launch cost
    (cuBLAS spends ~20 µs on the host per call, which an interval the host fills
    call by call would count as GPU time)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if calls > 1:
            torch.cuda._sleep(QUEUE_SPIN_CYCLES)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


def sweep_summary(timed: list, default_s: float, nbytes: int, copy_bw: float) -> dict:
    """A launch sweep's row: ``timed`` is [(seconds, setting)] sorted fastest first;
    times in µs and as fractions of the copy bandwidth for ``nbytes`` moved."""
    best_s, best = timed[0]
    return {
        "default_us": round(default_s * 1e6, 1),
        "default_of_copy_bw": round(nbytes / default_s / copy_bw, 3),
        "best_us": round(best_s * 1e6, 1),
        "best_of_copy_bw": round(nbytes / best_s / copy_bw, 3),
        "best": tuple(best),
        "top5": [(round(s * 1e6, 1), tuple(c)) for s, c in timed[:5]],
    }


def environment() -> dict:
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    # MII_COMMIT first: the device machine's copy of the tree may carry a stale .git.
    info["commit"] = os.environ.get("MII_COMMIT") or _git_head()
    # Kernel choices overridden for this run (MII_GEMV=torch, MII_FUSED=torch, ...).
    choices = {k: v for k, v in os.environ.items() if k.startswith("MII_") and k != "MII_COMMIT"}
    if choices:
        info["kernel_choices"] = choices
    return info


def _git_head() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL
        ).strip()
    except Exception:
        return "unknown"


def write_json(path: str | None, result: dict) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).write_text(text)


async def timed_stream(engine, prompt: list[int], params: dict) -> dict:
    """One streamed request: seconds to its first piece and decode tokens/s after it."""
    start = time.perf_counter()
    first = None
    async for piece in engine.stream(prompt, **params):
        if first is None:
            first = time.perf_counter()
        count = piece.generated_length
    end = time.perf_counter()
    return {"ttft_s": first - start, "decode_tok_s": (count - 1) / (end - first)}


def serve_other_ranks(path: str, options: dict) -> bool:
    """Under ``torchrun --nproc-per-node N`` with ``--tensor-parallel N``: on ranks
    > 0, hold this rank's shard and run rank 0's passes until it stops, then
    return True (the caller exits); on rank 0, or without tensor parallelism, False."""
    import os

    if options.get("tensor_parallel", 1) == 1 or os.environ.get("RANK", "0") == "0":
        return False
    from mii.config import EngineConfig
    from mii.engine.core import EngineCore

    config = EngineConfig.parse(path, load_format="dummy", dtype="bfloat16", **options)
    EngineCore(config).serve_until_stopped()
    return True


def add_engine_arguments(parser) -> None:
    """Options both offline benchmarks share: compile, scheduling, tensor parallelism,
    KV cache dtype, weight quantization."""
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split the model over N GPUs; run under `torchrun --nproc-per-node N`",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "fp8"],
        default="auto",
        help="KV cache dtype (fp8: half the bytes per cached token)",
    )
    parser.add_argument(
        "--quantization",
        choices=["none", "fp8"],
        default="none",
        help="weight quantization (fp8: linear weights in float8 e4m3, quantized at load)",
    )
    parser.add_argument(
        "--sync-scheduling",
        action="store_true",
        help="read each pass's tokens before launching the next (default on CUDA: async)",
    )


def engine_options(args, result: dict, options: dict) -> dict:
    """``options`` plus those of ``add_engine_arguments``, recorded in ``result``."""
    if args.compile:
        options["compile"] = True
    if args.sync_scheduling:
        options["async_scheduling"] = False
    if args.tensor_parallel > 1:
        options["tensor_parallel"] = args.tensor_parallel
    if args.kv_cache_dtype != "auto":
        options["kv_cache_dtype"] = args.kv_cache_dtype
    if args.quantization != "none":
        options["quantization"] = args.quantization
    result["kv_cache_dtype"] = args.kv_cache_dtype
    result["quantization"] = args.quantization
    result["async_scheduling"] = not args.sync_scheduling
    result["tensor_parallel"] = args.tensor_parallel
    return options
