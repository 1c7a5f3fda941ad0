"""Every ``MII_*`` environment switch, declared once: its type, default and meaning.

| variable | values (default first) | what it chooses |
|---|---|---|
| ``MII_ATTENTION`` | ``triton``, ``torch``, ``auto`` | paged attention on CUDA (auto = triton) |
| ``MII_FUSED`` | ``auto``, ``triton``, ``torch`` | fused RMSNorm and gated-activation kernels |
| ``MII_GEMV`` | ``auto``, ``triton``, ``torch`` | the skinny matrix-vector kernel for decode |
| ``MII_MOE`` | ``auto``, ``triton``, ``torch`` | the grouped expert kernel of MoE layers |
| ``MII_PDL`` | ``auto``, ``off`` | programmatic dependent launch (Hopper and newer) |
| ``MII_FP8_KERNELS`` | ``triton``, ``off`` | Triton kernels reading float8 weights (CUDA) |
| ``MII_MOE_ROUTING`` | ``auto``, ``torch``, ``fused`` | one-launch MoE routing (auto: small) |
| ``MII_SPLIT_KV_MERGE`` | ``launch``, ``kernel`` | who merges split-KV decode slices |
| ``MII_ATTENTION_EARLY_LOADS`` | ``on``, ``off`` | decode attention's reads before the PDL wait |
| ``MII_ATTENTION_OVERLAP`` | ``off``, ``streams``, ``priority`` | decode tiles on a 2nd stream |
| ``MII_PROMPT_ATTENTION`` | ``triton``, ``library`` | long prompt chunks: Triton or cuDNN SDPA |
| ``MII_GQA_DECODE_QUERIES`` | ``pack``, ``tile`` | queries per grouped-query decode pass |
| ``MII_FP8_KV_VALUES`` | ``bytes``, ``pairs`` | how attention reads an fp8 cache's values |
| ``MII_DECODE_ONE_QUERY`` | ``dot``, ``cores`` | fp8-cache one-head decode: products or cores |
| ``MII_ONE_QUERY_UNSPLIT_LAUNCH`` | ``wide``, ``narrow`` | unsplit CUDA-core decode: 4 or 2 warps |
| ``MII_GEMV_ONE_ROW`` | ``cores``, ``tensor``, ``cores-fp8`` | batch-1 skinny kernel on the cores |
| ``MII_FP8_FUSED_QUANT`` | ``norm``, ``off``, ``on`` | norm / act kernels write x's float8 copy |
| ``MII_PDL_EARLY_RELEASE`` | ``off``, ``on`` | small kernels release their successor first |
| ``MII_GATED_GEMV`` | ``auto``, ``on``, ``off`` | act(gate) * up in the decode gate/up kernel |
| ``MII_MOE_PROMPT_GEMM`` | ``auto``, ``triton``, ``grouped_mm`` | large MoE passes' GEMMs |
| ``MII_CACHE_DIR`` | a directory (``~/.cache/mii``) | demo model, converted GGUF files, registry |
| ``MII_GGUF_CACHE_DIR`` | a directory (``$MII_CACHE_DIR/gguf``) | converted GGUF checkpoints only |
| ``MII_API_KEY`` | unset, a key | the API key of deployments and clients |
| ``MII_REPLICA_TOKEN`` | unset, a token | internal: what a replica's port requires |
| ``MII_TP_STORE_SECRET`` | unset, a secret | internal: the secret key prefix of a TP store |
| ``MII_TP_FAIL_AT_PASS`` | unset, ``RANK:N`` | tests only: that rank fails on its N-th pass |
| ``MII_PASS_DELAY_S`` | ``0``, seconds | tests only: every forward pass takes at least this long |

For the kernel switches, ``auto`` takes Triton on CUDA and torch elsewhere,
``triton`` forces the kernel (CPU tests run it interpreted), ``torch`` forces
the torch code (``ops/dispatch.py``).

Every switch is read when it is used, never cached at import: tests set them
with ``monkeypatch.setenv``, and ``MII_PDL`` is read at each kernel launch
(``MII_PASS_DELAY_S`` is used, and so read, when an engine starts). A
value outside a switch's choices raises ``ValueError`` naming the variable and
the values it takes. Only ``MII_*`` switches live here: the launcher's
variables (``RANK``, ``WORLD_SIZE``, ...) and Triton's belong to those tools.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Switch(Generic[T]):
    """One environment variable: ``get()`` reads and parses it now."""

    name: str
    default: str  # the value when the variable is unset
    doc: str
    parse: Callable[[str, str], T]  # (name, raw value) -> value; ValueError when invalid

    def get(self) -> T:
        return self.parse(self.name, os.environ.get(self.name, self.default))

    def as_set(self) -> str | None:
        """The variable's text as set (None when unset), once it parses: what another
        process is given (str() of a parsed value may not parse back)."""
        value = os.environ.get(self.name)
        if value is not None:
            self.parse(self.name, value)
        return value


def _quoted_list(values: tuple[str, ...]) -> str:
    """'a', 'b' or 'c'"""
    quoted = [repr(v) for v in values]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _one_of(*choices: str) -> Callable[[str, str], str]:
    """A parser accepting exactly ``choices``."""

    def parse(name: str, value: str) -> str:
        if value == "":  # set but empty counts as unset, as shells often leave it
            return choices[0]
        if value not in choices:
            raise ValueError(f"{name} must be {_quoted_list(choices)}, not {value!r}")
        return value

    return parse


def _directory(name: str, value: str) -> Path:
    # Set but empty counts as unset, as shells often leave it.
    return Path(value) if value else Path.home() / ".cache" / "mii"


# ----- kernel choices ---------------------------------------------------------


def _choice(name: str, doc: str, *choices: str) -> Switch[str]:
    """A switch that takes one of ``choices``; the first is its default."""
    return Switch(name, choices[0], doc, _one_of(*choices))


KERNEL_CHOICES = ("auto", "triton", "torch")

ATTENTION = _choice(
    "MII_ATTENTION",
    "paged attention on CUDA: the Triton kernels (also 'auto', as the other kernel "
    "switches say it), or the torch reference",
    "triton",
    "torch",
    "auto",
)
FUSED = _choice(
    "MII_FUSED", "fused RMSNorm and gated activations (ops/fused_elementwise.py)", *KERNEL_CHOICES
)
GEMV = _choice(
    "MII_GEMV", "the skinny matrix-vector kernel for decode (ops/triton_gemv.py)", *KERNEL_CHOICES
)
MOE = _choice(
    "MII_MOE", "the grouped expert kernel of MoE layers (ops/triton_moe.py)", *KERNEL_CHOICES
)
PDL = _choice("MII_PDL", "programmatic dependent launch in the decode chain", "auto", "off")
FP8_KERNELS = _choice(
    "MII_FP8_KERNELS",
    "Triton kernels that read float8 weights on CUDA sm_89+ (the skinny decode kernel "
    "with float8 products, the grouped MoE kernel): on by default (H200, Llama-2-7B "
    "batch 1: 350 tok/s against 165 with torch._scaled_mm and 250 in bf16); off: "
    "decode batches too take torch._scaled_mm (where it runs: bf16, sizes multiples "
    "of 16; else the dequantizing reference), experts dequantized into the 16-bit kernel",
    "triton",
    "off",
)

MOE_ROUTING = _choice(
    "MII_MOE_ROUTING",
    "MoE routing with the grouped kernel: 'auto' fuses softmax, top-k, renormalisation "
    "and the expert layout into one launch for passes of up to FUSED_ROUTING_MAX_PAIRS "
    "(token, expert) pairs and uses torch operations past it (H200, Mixtral: batch 1 "
    "126.1 vs 118.9 tok/s; a 1,024-token layer 1.59 vs 1.41 ms); 'torch' or 'fused' "
    "for every pass",
    "auto",
    "torch",
    "fused",
)

SPLIT_KV_MERGE = _choice(
    "MII_SPLIT_KV_MERGE",
    "who merges the slices of split-KV decode attention: a merge launch after the "
    "attention ('launch'), or the last of each tile's programs to finish, inside the "
    "attention launch ('kernel': one launch fewer per layer; ops/triton_arrivals.py). "
    "H200, batch 1, a layer's qkv + rotary + attention + o in a graph (decode_sweep "
    "--batch1-step): 'kernel' saves 0.1-1.1 us with Llama-2-7B's 32 KV heads and costs "
    "2.7-4.4 us with Llama-3-8B's 8, so 'launch' stays the default",
    "launch",
    "kernel",
)
ATTENTION_EARLY_LOADS = _choice(
    "MII_ATTENTION_EARLY_LOADS",
    "with PDL, the attention kernel reads its tile table, lengths and block table and "
    "pulls its first keys' K/V lines into L2 before waiting for the rotary + KV write "
    "kernel, which writes none of them ('on'); 'off' waits first. H200: Llama-2-7B "
    "batch 1 252.8 vs 250.7 tok/s; a layer's attention step 0.6-1.6 us faster in 5 of 6 "
    "shapes (decode_sweep --batch1-step)",
    "on",
    "off",
)
PROMPT_ATTENTION = _choice(
    "MII_PROMPT_ATTENTION",
    "prompt chunks of at least LIBRARY_MIN_QUERIES tokens: the Triton prompt kernel "
    "('triton'), or torch's SDPA, cuDNN's on NVIDIA GPUs ('library': 570 against 430 "
    "TFLOP/s on a 32k prompt's last 4,096-token chunk on an H200, "
    "benchmarks/attention_peers.py; 32k-prompt TTFT 1.29 vs 1.39 s there, but a plan per "
    "new chunk shape: ops/library_attention.py)",
    "triton",
    "library",
)
ATTENTION_OVERLAP = _choice(
    "MII_ATTENTION_OVERLAP",
    "a mixed pass's two attention launches (prompt tiles, bound by the tensor cores; "
    "decode tiles, bound by the KV reads): one after the other ('off'), or the decode "
    "tiles on a second stream so the two can share the multiprocessors ('streams'; "
    "'priority': that stream at high priority). H200, one layer of a FastGen serving "
    "pass, Llama-2-7B: 317 us of prompt tiles + 600 us of decode tiles take 912 us one "
    "after the other, 855 on two streams (benchmarks/mixed_attention.py: a prompt "
    "program's registers leave decode programs little room beside it); end to end "
    "within noise (W1 Llama-3-8B 5.44 vs 5.45 s, HTTP serving 11.96 vs 11.85 "
    "effective req/s), so off",
    "off",
    "streams",
    "priority",
)
GQA_DECODE_QUERIES = _choice(
    "MII_GQA_DECODE_QUERIES",
    "grouped-query decode programs (4 query heads of one KV head each): their rows "
    "hold the whole 16-query tile for every head ('tile': 64 rows, of which a decode "
    "uses 4), or as many queries as fill 16 rows with the heads ('pack': a decode's 4 "
    "rows in one 16-row product, a quarter of the products and softmax; a tile of more "
    "queries takes one pass over its keys per 4). H200, 32 query heads on 8 KV heads "
    "(decode_sweep --gqa-only, two calls): 'pack' 173.5 / 145.3 / 86.0 us against "
    "192.6 / 156.2 / 114.7 at 256 x 640 / 32 x 4,096 / 4 x 16,384 keys (bf16 cache), "
    "155.9 / 116.6 / 80.6 against 189.6 / 143.9 / 103.8 (fp8); W1 Llama-3-8B 5.22-5.26 s "
    "against 5.34-5.35 (three and two runs, one call)",
    "pack",
    "tile",
)
FP8_KV_VALUES = _choice(
    "MII_FP8_KV_VALUES",
    "attention over an fp8 KV cache: how the values reach the P x V product. 'bytes': "
    "as float8, converted to float16 where the product reads them; compiled for sm_90 "
    "that read is one shared-memory load per byte (the product wants each thread's "
    "values along the keys, the cache stores them along the head dimension), 256 a "
    "step. 'pairs': as 16-bit pairs of neighbouring dimensions, transposed by "
    "ldmatrix.trans as a bf16 cache's values are, each pair decoded to two float16 by "
    "bit operations (exact) and multiplied in two half-width products: the same "
    "numbers. Slower on the H200 (decode_sweep, Llama-2-7B heads: 544 vs 501 us at 256 "
    "sequences x 640 keys, 268 vs 167 us at 4 x 16,384; W1 with the fp8 cache 38.5 vs "
    "39.9 req/s), so 'bytes'",
    "bytes",
    "pairs",
)
DECODE_ONE_QUERY = _choice(
    "MII_DECODE_ONE_QUERY",
    "decode programs of one query head (models without grouped-query attention, as "
    "Llama-2-7B) on an fp8 KV cache: the scores and the weighted values as 16-row "
    "tensor-core products of which a decode uses one row, the fp8 keys and values "
    "converted to float16 and passed through shared memory ('dot'), or as one row "
    "on the CUDA cores in float32, each key and value converted where it is loaded "
    "('cores'; decode_sweep on an H100, 2026-12-05: 72-90 % of copy bandwidth against "
    "55-86 % for 'dot')",
    "cores",
    "dot",
)
ONE_QUERY_UNSPLIT_LAUNCH = _choice(
    "MII_ONE_QUERY_UNSPLIT_LAUNCH",
    "MII_DECODE_ONE_QUERY=cores programs that fill the GPU without split-KV: the "
    "split-KV launch's 32 keys a step on 4 warps ('wide'), or 16 keys on 2 warps from "
    "ONE_QUERY_NARROW_MIN_PER_SM programs per multiprocessor ('narrow': 6-10 % faster "
    "in the H200's decode_sweep at 233 x 760 and 64 x 2,600 keys, but on the H100 "
    "W1 with the fp8 cache took as long or 1 % longer; ops/triton_attention.py)",
    "wide",
    "narrow",
)
GEMV_ONE_ROW = _choice(
    "MII_GEMV_ONE_ROW",
    "decode batches of one row in the skinny linear kernel: on the CUDA cores in "
    "float32, each weight converted where it is loaded and x unquantized ('cores', "
    "the default; 'cores-fp8': float8 weights only), or as 16-row tensor-core "
    "products of which batch 1 uses one row, float8 weights with x quantized to e4m3 "
    "('tensor'). H100, batch 1 (2026-12-05): Llama-2-7B FP8 333.5 vs 321.0 tok/s, "
    "bf16 200.5 vs 196.3; Llama-3-8B FP8 294.3 vs 278.6, bf16 181.2 vs 177.2 "
    "(ops/triton_gemv_launch.py CORES_CONFIG)",
    "cores",
    "tensor",
    "cores-fp8",
)
FP8_FUSED_QUANT = _choice(
    "MII_FP8_FUSED_QUANT",
    "float8 decode: the RMSNorm and act(gate) * up kernels also write their output "
    "quantized in the slices the next float8 skinny kernel reads ('on', "
    "ops/fp8_activations.py: one quantization launch fewer per projection, the same "
    "numbers; 'norm', the default: the RMSNorm only, so act * up stays in the gated "
    "gate/up kernel); 'off' quantizes in a launch of its own. H200, Llama-2-7B FP8 "
    "batch 1, the norm one program per slice: 384.0 / 384.2 ('norm') vs 382.0 ('on') "
    "vs 376.3 / 376.5 tok/s ('off')",
    "norm",
    "off",
    "on",
)
GATED_GEMV = _choice(
    "MII_GATED_GEMV",
    "decode batches of gated MLPs: act(gate) * up computed in the epilogue of the "
    "skinny gate/up kernel, whose programs each read a band of gate rows and the "
    "matching up rows ('on', ops/triton_gemv.skinny_gated_linear: one launch fewer per "
    "layer, the same numbers); 'off': the projection, then the act-and-mul kernel; "
    "'auto': on for float8 weights only. H200, batch 1, Llama-2-7B: FP8 376.97 vs "
    "372.06 tok/s ('on' vs 'off'); bf16 242.7 / 243.0 vs 250.9 / 251.0, and 232.7 vs "
    "239.6 with MII_PDL=off too: with 16-bit weights the gated kernel itself costs more "
    "than the launch it saves (why is not yet measured)",
    "auto",
    "on",
    "off",
)
PDL_EARLY_RELEASE = _choice(
    "MII_PDL_EARLY_RELEASE",
    "with PDL, the decode chain's small kernels (norm, act * up, quantization, rotary + "
    "KV write, attention, split merge) let their successor launch as soon as they start, "
    "before their own wait ('on'), so the next skinny linear kernel's programs take the "
    "SMs the previous one frees during its tail and prefetch their weights into L2 "
    "meanwhile; 'off' lets it launch only after the wait. Every kernel still waits for "
    "its predecessor's completion before it reads an activation (ops/triton_pdl.py). "
    "H200, batch 1, two runs each: Llama-2-7B 248.7 / 248.7 ('on') vs 250.9 / 251.0 "
    "tok/s, FP8 weights 362.6 vs 372.1, so 'off' stays the default",
    "off",
    "on",
)

MOE_PROMPT_GEMM = _choice(
    "MII_MOE_PROMPT_GEMM",
    "the experts' matmuls of MoE passes of at least ops/moe_grouped_mm.GROUPED_MM_MIN_PAIRS "
    "(token, expert) pairs, 16-bit experts: 'auto' takes torch._grouped_mm (CUTLASS) on "
    "CUDA where it applies (bfloat16, sm_90+; H200, Mixtral layer: 4,096 tokens 5.24 vs "
    "6.48 ms, 1,024 tokens 1.67 vs 1.76 ms) and the grouped Triton kernel elsewhere; "
    "'triton' or 'grouped_mm' for every such pass",
    "auto",
    "triton",
    "grouped_mm",
)

# ----- files ------------------------------------------------------------------

CACHE_DIR: Switch[Path] = Switch(
    "MII_CACHE_DIR",
    "",
    "where the demo checkpoint, converted GGUF files and the deployment registry live "
    "(default ~/.cache/mii)",
    _directory,
)


def _optional_directory(name: str, value: str) -> Path | None:
    return Path(value).expanduser() if value else None  # set but empty counts as unset


GGUF_CACHE_DIR: Switch[Path | None] = Switch(
    "MII_GGUF_CACHE_DIR",
    "",
    "where converted GGUF checkpoints live, when not under MII_CACHE_DIR/gguf: one "
    "conversion shared by deployments whose registries differ, or kept on a larger disk",
    _optional_directory,
)


# ----- secrets -----------------------------------------------------------------
# Secrets travel between mii's processes in the environment, never on a command
# line: /proc/PID/cmdline (``ps``) is readable by every local user, a process's
# environment only by its owner.


def _secret(name: str, value: str) -> str | None:
    return value or None  # set but empty counts as unset


API_KEY: Switch[str | None] = Switch(
    "MII_API_KEY",
    "",
    "the API key a deployment requires (when mii.serve / mii serve get none) and that "
    "clients send (when mii.client gets none and the deployment's record has none)",
    _secret,
)
REPLICA_TOKEN: Switch[str | None] = Switch(
    "MII_REPLICA_TOKEN",
    "",
    "internal, set by a deployment for its replicas: the token their ports require "
    "(mii.rpc.auth); a new random one at every start",
    _secret,
)
TP_STORE_SECRET: Switch[str | None] = Switch(
    "MII_TP_STORE_SECRET",
    "",
    "internal, set by a replica for its tensor-parallel ranks: a random prefix of every "
    "key of their coordination store, so that another local process cannot read or "
    "write the group's keys (mii.engine.tp_store)",
    _secret,
)


# ----- fault injection: tests only ----------------------------------------------
# Never set these in production: they make a healthy engine fail on purpose.


def _rank_and_pass(name: str, value: str) -> tuple[int, int] | None:
    if not value:
        return None
    rank, _, count = value.partition(":")
    try:
        return int(rank), int(count)
    except ValueError:
        raise ValueError(f"{name} must be 'RANK:N' (two integers), not {value!r}") from None


TP_FAIL_AT_PASS: Switch[tuple[int, int] | None] = Switch(
    "MII_TP_FAIL_AT_PASS",
    "",
    "fault injection, tests only: 'RANK:N' makes that tensor-parallel rank raise on its N-th pass",
    _rank_and_pass,
)


def _seconds(name: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0.0 <= seconds < float("inf"):
        raise ValueError(f"{name} must be a number of seconds >= 0, not {value!r}")
    return seconds


PASS_DELAY_S: Switch[float] = Switch(
    "MII_PASS_DELAY_S",
    "0",
    "fault injection, tests only: each forward pass is held this many seconds (a slow "
    "device, whatever the machine's speed; read when an engine starts)",
    _seconds,
)


# Every switch above, in the order of the table in this module's docstring.
SWITCHES: tuple[Switch, ...] = (
    ATTENTION,
    FUSED,
    GEMV,
    MOE,
    PDL,
    FP8_KERNELS,
    MOE_ROUTING,
    SPLIT_KV_MERGE,
    ATTENTION_EARLY_LOADS,
    ATTENTION_OVERLAP,
    PROMPT_ATTENTION,
    GQA_DECODE_QUERIES,
    FP8_KV_VALUES,
    DECODE_ONE_QUERY,
    ONE_QUERY_UNSPLIT_LAUNCH,
    GEMV_ONE_ROW,
    FP8_FUSED_QUANT,
    PDL_EARLY_RELEASE,
    GATED_GEMV,
    MOE_PROMPT_GEMM,
    CACHE_DIR,
    GGUF_CACHE_DIR,
    API_KEY,
    REPLICA_TOKEN,
    TP_STORE_SECRET,
    TP_FAIL_AT_PASS,
    PASS_DELAY_S,
)
