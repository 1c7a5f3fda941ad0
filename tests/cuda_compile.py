"""Compiles the decode kernels' CUDA-only launches for Hopper (sm_90) with no GPU
present, for ``test_cuda_compile.py``: run as a script in a process of its own,
since the tests' process has the kernels in the CPU interpreter.

    python tests/cuda_compile.py [CASE ...]   # prints {case: facts or error} as JSON (all cases)
    python tests/cuda_compile.py --shard I/N  # every N-th case from the I-th (parallel processes)

Not imported by the tests: importing it takes the interpreter off for the process.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not interpreted ones
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mii.ops import fused_elementwise, triton_attention, triton_gemv, triton_moe

HOPPER = GPUTarget("cuda", 90, 32)

_ATTENTION_TYPES = {
    "Q": "*bf16",
    "K_cache": "*bf16",
    "V_cache": "*bf16",
    "Out": "*bf16",
    "Part_O": "*fp32",
    "Part_M": "*fp32",
    "Part_L": "*fp32",
    "Arrivals": "*i32",
    "block_tables": "*i32",
    "seq_lens": "*i32",
    "cu_seqlens_q": "*i32",
    "tile_seq": "*i32",
    "tile_start": "*i32",
    "scale": "fp32",
}


def _attention(
    pack: int,
    cache: str,
    head_dim: int = 128,
    early: bool = True,
    pdl: int = 1,
    v_pairs: bool = False,
    fill_rows: bool = False,
    merge: bool = True,
    one_query: bool = False,
    splits: int = 32,
):
    """Split-KV decode programs (``pack`` query heads of one KV head) with
    MII_ATTENTION_EARLY_LOADS=on (``early``; off: waiting first) and
    MII_SPLIT_KV_MERGE=kernel; ``pdl`` 2: MII_PDL_EARLY_RELEASE=on; ``v_pairs``: an
    fp8 cache's values read as 16-bit pairs (MII_FP8_KV_VALUES=pairs); ``fill_rows``:
    MII_GQA_DECODE_QUERIES=pack (16 // pack queries a pass), whose launch merges after;
    ``merge`` False: MII_SPLIT_KV_MERGE=launch, the whole tile's rows; ``one_query``:
    MII_DECODE_ONE_QUERY=cores; ``splits`` 1: programs that fill the GPU unsplit. Every case
    compiles with the launch settings (keys a step, warps, stages) the engine gives
    those programs (``triton_attention.launch_settings``)."""
    fp8 = cache != "bf16"
    merge_here = merge and not fill_rows
    launch, queries = triton_attention.launch_settings(
        16, fp8, pack, num_splits=splits, d_pad=head_dim, fill_rows=fill_rows
    )
    if one_query:
        # unsplit: as many programs as W1's decode passes have (the narrow launch)
        launch = triton_attention.one_query_launch(splits, 1 << 20, torch.device("cpu"))
    types = _ATTENTION_TYPES | {"K_cache": f"*{cache}", "V_cache": f"*{cache}"}
    constexprs = dict(
        GROUP=pack, NUM_HEADS=32, SPLIT=splits > 1, SPLIT_MIN_KEYS=128, KV_BLOCK=16,
        HEAD_DIM=head_dim, D_PAD=head_dim, BLOCK_M=16, BLOCK_N=max(launch["block_n"], 16),
        HAS_WINDOW=False, IEEE=False, UPCAST=False, KV_CAST=fp8, FP8_AS_F16=fp8,
        HEAD_MAJOR=pack > 1, PACK=pack, MERGE_HERE=merge_here, SPLITS_P2=32, EARLY=early,
        PREFETCH_KEYS=128 if early else 0, LINE=min(head_dim, 128 if fp8 else 64), PDL=pdl,
        V_PAIRS=v_pairs, QUERIES=queries,
        ONE_QUERY=launch["num_stages"] if one_query else 0,
    )  # fmt: skip
    return (
        triton_attention._paged_attention_kernel, types, constexprs,
        launch["num_stages"], launch["num_warps"],
    )  # fmt: skip


def _rotary(pdl: int = 1):
    """The rotary + KV write kernel (it waits before any load); ``pdl`` 2: it lets
    its successor launch before it waits (MII_PDL_EARLY_RELEASE=on)."""
    types = {n: "*bf16" for n in ("Q", "K", "V", "K_cache", "V_cache")}
    types |= {"positions": "*i64", "cos_sin": "*fp32", "slots": "*i64"}
    constexprs = dict(
        NUM_Q_HEADS=32, NUM_KV_HEADS=8, HEAD_DIM=128, ROT_HALF=64, H_PAD=32, HALF_PAD=64,
        D_PAD=128, HAS_ROTARY=True, CLAMP=False, PDL=pdl,
    )  # fmt: skip
    return triton_attention._rotary_cache_write_kernel, types, constexprs


def _skinny_linear(fp8: bool, short_k: bool = False, gated: bool = False):
    """The decode GEMV as an H200 runs o_proj at 2-16 rows (MII_GEMV_ONE_ROW=tensor at
    one): split-K, the weights' L2 prefetch; float8 weights with x quantized per
    slice beforehand (x_groups); ``short_k``: float8's launch for o_proj now
    (FP8_SHORT_K_CONFIG: 512-column slices, unsplit); ``gated``: act(gate) * up in
    the epilogue (MII_GATED_GEMV=on)."""
    types = {"X": "*fp8e4nv" if fp8 else "*bf16", "W": "*fp8e4nv" if fp8 else "*bf16"}
    types |= {"Scale": "*fp32", "Bias": "*bf16", "Out": "*bf16", "Partials": "*fp32"}
    types |= {"Arrivals": "*i32", "XScale": "*fp32"}
    constexprs = dict(
        HAS_BIAS=False, W_SCALED=fp8, DEQUANT=0, X_FP8=fp8, X_GROUPS=fp8, IEEE=False,
        UPCAST=False, SPLIT_K=1 if short_k else 4, BLOCK_M=16, BLOCK_N=64,
        BLOCK_K=512 if short_k else 256, PDL=True,
        PREFETCH_LINES=8, LINE=128 if fp8 else 64, GATED=1 if gated else 0, ROUND=False,
        CORES=False, LOOP_STAGES=4,
    )  # fmt: skip
    return triton_gemv._skinny_linear_kernel, types, constexprs


def _skinny_linear_cores(
    fp8: bool, many_bands: bool, gated: bool = False, x: str = "bf16", rows: int = 1
):
    """The decode GEMV at one row (MII_GEMV_ONE_ROW=cores, the default): the launch
    ``cores_for`` gives a weight of few bands (o, down: CORES_CONFIG for float8
    weights, BF16_CORES_FEW_BANDS_CONFIG for 16-bit ones) or of many
    (``many_bands``: qkv, gate_up), x unquantized; ``gated``: the gate/up kernel;
    ``x``: the activations' type (fp32: a float32 model); ``rows`` 2 or 4: every row
    in one program (under a raised CORES_MAX_ROWS), the slices narrowed."""
    from mii.ops import triton_gemv_launch as launch

    config = launch.CORES_CONFIG if fp8 else launch.BF16_CORES_FEW_BANDS_CONFIG
    if many_bands:
        config = launch.FP8_CORES_MANY_BANDS_CONFIG if fp8 else launch.CORES_MANY_BANDS_CONFIG
    if rows > 1:
        config = config._replace(block_m=rows, block_k=config.block_k // rows)
    types = {"X": f"*{x}", "W": "*fp8e4nv" if fp8 else "*bf16"}
    types |= {"Scale": "*fp32", "Bias": f"*{x}", "Out": f"*{x}", "Partials": "*fp32"}
    types |= {"Arrivals": "*i32", "XScale": "*fp32"}
    line = 128 if fp8 else 64
    constexprs = dict(
        HAS_BIAS=False, W_SCALED=fp8, DEQUANT=config.dequant, X_FP8=False, X_GROUPS=False,
        IEEE=x == "fp32", UPCAST=False, SPLIT_K=1, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, PDL=True, PREFETCH_LINES=config.prefetch_k // line, LINE=line,
        GATED=1 if gated else 0, ROUND=False, CORES=True, LOOP_STAGES=config.num_stages,
    )  # fmt: skip
    return (
        triton_gemv._skinny_linear_kernel, types, constexprs,
        config.num_stages, config.num_warps,
    )  # fmt: skip


def _rms_norm_fp8(pdl: int = 1):
    """RMSNorm with a residual writing its float8 copy (MII_FP8_FUSED_QUANT=on/norm):
    one program per 256-column slice of the row."""
    types = {n: "*bf16" for n in ("X", "Residual", "Out", "ResidualOut", "W")}
    types |= {"Q": "*fp8e4nv", "QScale": "*fp32", "eps": "fp32"}
    constexprs = dict(
        HAS_RESIDUAL=True, GEMMA=False, ROUND=False, BLOCK=4096, COLS=256, SLICE=256, PDL=pdl
    )
    return fused_elementwise._rms_norm_kernel, types, constexprs


def _act_and_mul_fp8():
    """act(gate) * up writing its float8 copy (MII_FP8_FUSED_QUANT=on)."""
    types = {"X": "*bf16", "Out": "*bf16", "Q": "*fp8e4nv", "QScale": "*fp32"}
    constexprs = dict(ACT=0, ROUND=False, BLOCK=1024, SLICE=256, PDL=True)
    return fused_elementwise._act_and_mul_kernel, types, constexprs


def _moe_fp8(decode: bool, swap_ab: bool = False):
    """The grouped expert GEMM on float8 experts, x quantized per slice beforehand
    (a_groups), with Mixtral's decode (16 x 64 x 512) or prompt (64 x 128 x 128) tiles;
    ``swap_ab``: the product computed transposed (MII_MOE_SWAP_AB=on)."""
    types = {"A": "*fp8e4nv", "B": "*fp8e4nv", "B_scale": "*fp32", "C": "*bf16"}
    types |= {"sorted_pairs": "*i32", "block_expert": "*i32", "pair_weights": "*bf16"}
    types |= {"A_scale": "*fp32"}
    tiles = (
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=512)
        if decode
        else dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128)
    )
    constexprs = dict(
        A_ROWS_PER_PAIR=1, HAS_WEIGHTS=True, B_SCALED=True, DEQUANT=0, A_FP8=True,
        A_GROUPS=True, IEEE=False, UPCAST=False, GROUP_M=0, SWAP_AB=swap_ab, **tiles,
    )  # fmt: skip
    return triton_moe._grouped_gemm_kernel, types, constexprs


CASES = {
    "rms-norm-fp8": _rms_norm_fp8,
    "act-and-mul-fp8": _act_and_mul_fp8,
    "attention-mha": lambda: _attention(1, "bf16"),
    "attention-gqa": lambda: _attention(4, "bf16"),
    "attention-gqa-fp8": lambda: _attention(4, "fp8e4nv"),
    "attention-mha-fp8": lambda: _attention(1, "fp8e4nv"),
    "attention-mha-fp8-pairs": lambda: _attention(1, "fp8e4nv", v_pairs=True),
    "attention-mha-fp8-one-query": lambda: _attention(1, "fp8e4nv", one_query=True, splits=1),
    "attention-mha-fp8-one-query-split": lambda: _attention(1, "fp8e4nv", one_query=True),
    "attention-gqa-d64-fp8": lambda: _attention(4, "fp8e4nv", head_dim=64),
    "attention-mha-d256": lambda: _attention(1, "bf16", head_dim=256),
    "attention-gqa-wait-first": lambda: _attention(4, "bf16", early=False),
    "attention-gqa-fill-rows": lambda: _attention(4, "bf16", fill_rows=True),
    "attention-gqa-fp8-fill-rows": lambda: _attention(4, "fp8e4nv", fill_rows=True),
    "attention-gqa-merge-after": lambda: _attention(4, "bf16", merge=False),
    "rotary": _rotary,
    # MII_PDL_EARLY_RELEASE=on: the successor launches before the wait
    "rotary-release-first": lambda: _rotary(pdl=2),
    "rms-norm-release-first": lambda: _rms_norm_fp8(pdl=2),
    "attention-gqa-release-first": lambda: _attention(4, "bf16", pdl=2),
    "gemv-bf16": lambda: _skinny_linear(False),
    "gemv-fp8": lambda: _skinny_linear(True),
    "gemv-fp8-short-k": lambda: _skinny_linear(True, short_k=True),
    "gemv-bf16-gated": lambda: _skinny_linear(False, gated=True),
    "gemv-fp8-gated": lambda: _skinny_linear(True, gated=True),
    "gemv-bf16-cores": lambda: _skinny_linear_cores(False, many_bands=False),
    "gemv-bf16-cores-many-bands": lambda: _skinny_linear_cores(False, many_bands=True),
    "gemv-fp8-cores": lambda: _skinny_linear_cores(True, many_bands=False),
    "gemv-fp8-cores-gated": lambda: _skinny_linear_cores(True, many_bands=True, gated=True),
    "gemv-fp8-cores-f32": lambda: _skinny_linear_cores(True, many_bands=False, x="fp32"),
    "gemv-fp8-cores-rows4": lambda: _skinny_linear_cores(True, many_bands=True, rows=4),
    "moe-fp8-decode": lambda: _moe_fp8(True),
    "moe-fp8-prompt": lambda: _moe_fp8(False),
    "moe-fp8-decode-swapped": lambda: _moe_fp8(True, swap_ab=True),
}


def ptx_for(
    kernel, types: dict[str, str], constexprs: dict, stages: int = 3, warps: int = 4
) -> tuple[str, str]:
    """PTX and TTGIR of ``kernel`` for sm_90 (compiled down to a cubin by Triton's ptxas);
    ``types``: the pointer and float arguments' Triton types (others are int32)."""
    parameters = inspect.signature(kernel.fn).parameters
    names = list(parameters)
    unknown = (set(constexprs) | set(types)) - set(names)
    if unknown:
        raise ValueError(f"not parameters of {kernel.fn.__name__}: {sorted(unknown)}")
    # constexprs left out take their defaults, as a launch that does not pass them
    constexprs = {
        **{
            n: p.default
            for n, p in parameters.items()
            if "constexpr" in str(p.annotation) and p.default is not inspect.Parameter.empty
        },
        **constexprs,
    }
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    # As a launch specialises them: pointers and the integers that are multiples of
    # 16 (sizes, strides) marked so; without, Triton neither vectorises nor pipelines.
    aligned = {n for n, t in signature.items() if t.startswith("*") or n in ALIGNED_INTS}
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(names.index(n),): v for n, v in constexprs.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    options = {"num_warps": warps, "num_stages": stages, "launch_pdl": True}
    compiled = triton.compile(source, target=HOPPER, options=options).asm
    return compiled["ptx"], compiled["ttgir"]


# The integer arguments a Llama-shaped decode launch passes as multiples of 16 (the
# attention's cache and row strides too: without, its loads compile byte by byte).
ALIGNED_INTS = {"N", "K", "k_per_split", "stride_xm", "stride_wn", "stride_om", "stride_am",
                "stride_be", "stride_bn", "stride_cm", "stride_qt", "stride_qh", "stride_cb",
                "stride_cs", "stride_ch", "stride_ot", "stride_oh"}  # fmt: skip


def facts(ptx: str, ttgir: str) -> dict:
    """What the tests check in a kernel's PTX and TTGIR."""
    wait = ptx.find("griddepcontrol.wait")
    release = ptx.find("griddepcontrol.launch_dependents")
    prefetch = ptx.find("prefetch.global.L2")
    atomic = ptx.find("atom.")
    return {
        "waits": ptx.count("griddepcontrol.wait"),
        "releases": ptx.count("griddepcontrol.launch_dependents"),
        "release_before_wait": 0 <= release < wait,
        "loads_before_wait": ptx[:wait].count("ld.global"),
        "prefetches": ptx.count("prefetch.global.L2"),
        "prefetch_before_wait": 0 <= prefetch < wait,
        # the arrival count: an acquire-release add at GPU scope, after a barrier
        "acq_rel_adds": ptx.count("atom.global.gpu.acq_rel.add"),
        "barrier_before_atomic": atomic < 0 or "bar.sync" in ptx[:atomic],
        "atomics": ptx.count("atom.global"),
        "float8_converts": ptx.count("e4m3x2"),
        # an operand gathered from shared memory one byte at a time
        "shared_byte_loads": ptx.count("ld.shared.b8"),
        "transposed_ldmatrix": len(re.findall(r"ldmatrix[.\w]*\.trans", ptx)),
        "wgmma": ptx.count("wgmma.mma_async"),
        "mma_sync": ptx.count("mma.sync"),
        # the row counts (M) of the kernel's matrix products
        "dot_rows": sorted(
            {int(m) for m in re.findall(r"(?:tt\.dot|warp_group_dot) .*?: tensor<(\d+)x", ttgir)}
        ),
        "pipelined_loops": len(pipelined_loops(ttgir)),
        "waited_loads_in_pipelined_loops": sum(waited_loads(ttgir)),
        # of those, the attention's block-table reads (vectors of int32 ids)
        "waited_block_id_loads": sum(waited_loads(ttgir, BLOCK_IDS)),
        # MII_DECODE_ONE_QUERY=cores: reductions over the keys (axis 0, across warps
        # through shared memory) in its key loop, the pipelined loop with no product
        "one_query_key_reductions": sum(
            sum('"tt.reduce"' in line and "axis = 0" in line for line in body)
            for body in pipelined_loops(ttgir)
            if not any("dot" in line for line in body)
        ),
        # any reduction (either axis) in such a loop: the one-row GEMV keeps none there
        "reductions_in_loops_without_products": sum(
            sum('"tt.reduce"' in line for line in body)
            for body in pipelined_loops(ttgir)
            if not any("dot" in line for line in body)
        ),
        "one_query_loops": sum(
            not any("dot" in line for line in body) for body in pipelined_loops(ttgir)
        ),
    }


def pipelined_loops(ttgir: str) -> list[list[str]]:
    """The bodies (TTGIR lines) of the innermost loops that hold asynchronous copies:
    the loops Triton's software pipeline took (a loop around them, as the attention
    kernel's passes over a tile's queries, is not one of them)."""
    return _loops_with_copies(ttgir.splitlines())


def _loops_with_copies(lines: list[str]) -> list[list[str]]:
    loops, i = [], 0
    while i < len(lines):
        if "scf.for" not in lines[i]:
            i += 1
            continue
        depth, body, i = lines[i].count("{") - lines[i].count("}"), [], i + 1
        while depth > 0 and i < len(lines):
            depth += lines[i].count("{") - lines[i].count("}")
            body.append(lines[i])
            i += 1
        if any("async_copy_global_to_local" in line for line in body):
            inner = _loops_with_copies(body)
            loops.extend(inner if inner else [body])
    return loops


# a load of a vector of int32 pointers: the attention's block ids
BLOCK_IDS = re.compile(r"tensor<\d+x!tt\.ptr<i32>")


def waited_loads(ttgir: str, only: re.Pattern | None = None) -> list[int]:
    """For each pipelined loop, the loads Triton left out of the pipeline whose value
    the same trip uses: each trip then waits for them (a load whose value only goes
    to the loop's yield is used by the next trip, so it is issued a trip ahead).
    ``only``: count the loads whose line matches it."""
    counts = []
    for body in pipelined_loops(ttgir):
        count = 0
        for at, line in enumerate(body):
            load = re.match(r"\s*(%[\w.]+) = tt\.load ", line)
            if load is None or (only is not None and not only.search(line)):
                continue
            used = re.compile(re.escape(load.group(1)) + r"\b")
            count += any(used.search(x) and "scf.yield" not in x for x in body[at + 1 :])
        counts.append(count)
    return counts


def main() -> None:
    result = {}
    names = sys.argv[1:] or list(CASES)
    if names[0] == "--shard":
        index, count = (int(n) for n in names[1].split("/"))
        names = list(CASES)[index::count]
    for name in names:
        try:
            case = CASES[name]()
            stages = case[3] if len(case) > 3 else 3  # ptx_for's default
            result[name] = facts(*ptx_for(*case)) | {"stages": stages}
        except Exception as error:  # reported to the test, which fails naming it
            result[name] = {"error": f"{type(error).__name__}: {error}"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
