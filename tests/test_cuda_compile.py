"""The CUDA-only branches of the decode kernels compile for Hopper (sm_90), on a
machine without a GPU.

The CPU interpreter never runs what only a GPU launch takes: programmatic
dependent launch (``griddepcontrol``), the L2 prefetches before its wait, and
Hopper's float8 conversions. A Triton error there (a constexpr branch that does
not type-check, a tensor where a scalar is needed) would show only on the GPU
machine. Triton compiles for a target it is told, down to the cubin (its own
``ptxas``), with no device present: ``tests/cuda_compile.py`` does that, in a
process without the interpreter, for the launches an H200 takes, and these tests
check that the PTX holds what each branch is for.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia", reason="Triton without its CUDA backend")


@pytest.fixture(scope="module")
def compiled() -> dict:
    """Every case compiled, in two processes at once (each one's imports take seconds;
    one process took 45 s of a 2-core CI machine's otherwise single-core suite)."""
    script = Path(__file__).with_name("cuda_compile.py")
    shards = 2
    runs = [
        subprocess.Popen(
            [sys.executable, str(script), "--shard", f"{i}/{shards}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(shards)
    ]
    result = {}
    # (a safety net: all cases took 299 s in one process on a 2-core machine under
    # heavy load)
    deadline = time.monotonic() + 1500
    try:
        for run in runs:
            out, err = run.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert run.returncode == 0, err[-3000:]
            result.update(json.loads(out.strip().splitlines()[-1]))
    finally:  # a failed or timed-out shard: stop the other one too
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.communicate()
    return result


def _facts(compiled: dict, case: str) -> dict:
    facts = compiled[case]
    assert "error" not in facts, f"{case} does not compile for sm_90: {facts.get('error')}"
    return facts


ATTENTION_CASES = [
    "attention-mha",
    "attention-gqa",
    "attention-gqa-fp8",
    "attention-mha-fp8",
    "attention-mha-fp8-pairs",
    "attention-gqa-d64-fp8",
    "attention-mha-d256",
    "attention-mha-fp8-one-query-split",
]


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_decode_attention_with_early_loads_and_merge_compiles_for_hopper(compiled, case):
    """Split-KV decode programs (one head; 4 heads of a KV head; an fp8 cache; heads
    of 64 and 256: one and four lines a row) with MII_ATTENTION_EARLY_LOADS=on and
    MII_SPLIT_KV_MERGE=kernel: one wait, the metadata loads and the K and V
    prefetches before it, the arrival count an acquire-release add after a barrier."""
    facts = _facts(compiled, case)
    assert facts["waits"] == 1 and facts["loads_before_wait"] > 0
    assert facts["prefetches"] > 0 and facts["prefetch_before_wait"]
    assert facts["atomics"] >= 2 and facts["acq_rel_adds"] == 1
    assert facts["barrier_before_atomic"]


def test_decode_attention_waiting_first_loads_nothing_before_its_wait(compiled):
    """MII_ATTENTION_EARLY_LOADS=off: the wait comes before any load or prefetch."""
    facts = _facts(compiled, "attention-gqa-wait-first")
    assert facts["waits"] == 1 and facts["loads_before_wait"] == 0
    assert facts["prefetches"] == 0


def test_rotary_cache_write_loads_nothing_before_its_wait(compiled):
    """Its rotary rows may be the previous kernel's output (length-dependent rope)."""
    facts = _facts(compiled, "rotary")
    assert facts["waits"] == 1 and facts["loads_before_wait"] == 0


@pytest.mark.parametrize("case", ["gemv-bf16", "gemv-fp8"])
def test_skinny_linear_split_k_compiles_for_hopper(compiled, case):
    """The decode GEMV as an H200 runs o_proj: split-K's arrival count, the weights'
    L2 prefetch before the wait; float8 weights with x quantized beforehand."""
    facts = _facts(compiled, case)
    assert facts["waits"] == 1 and facts["prefetch_before_wait"]
    assert facts["atomics"] >= 2


def test_float8_gemv_short_k_launch_compiles_for_hopper(compiled):
    """FP8_SHORT_K_CONFIG (o_proj: 512-column slices, unsplit): no arrival count."""
    facts = _facts(compiled, "gemv-fp8-short-k")
    assert facts["waits"] == 1 and facts["prefetch_before_wait"] and facts["atomics"] == 0


@pytest.mark.parametrize("case", ["rms-norm-fp8", "act-and-mul-fp8"])
def test_elementwise_kernels_writing_float8_copies_compile_for_hopper(compiled, case):
    """MII_FP8_FUSED_QUANT=on: the norm and the activation also store e4m3 values."""
    facts = _facts(compiled, case)
    assert facts["waits"] == 1 and facts["float8_converts"] > 0


@pytest.mark.parametrize(
    "case",
    ["rotary", "rms-norm-fp8", "attention-gqa", "gemv-bf16", "gemv-fp8", "gemv-fp8-cores"],
)
def test_kernels_let_their_successor_launch_after_their_wait_by_default(compiled, case):
    """MII_PDL_EARLY_RELEASE=off, and the skinny linear kernels always: one release,
    after the wait."""
    facts = _facts(compiled, case)
    assert facts["releases"] == 1 and not facts["release_before_wait"]


@pytest.mark.parametrize(
    ("case", "default_case"),
    [
        ("rotary-release-first", "rotary"),
        ("rms-norm-release-first", "rms-norm-fp8"),
        ("attention-gqa-release-first", "attention-gqa"),
    ],
)
def test_small_kernels_release_their_successor_before_waiting_when_asked(
    compiled, case, default_case
):
    """MII_PDL_EARLY_RELEASE=on: the release comes first, and the wait still comes
    before every load the kernel made after it (the rotary and norm kernels load
    nothing before it; attention only its tile table and block table, as without)."""
    facts = _facts(compiled, case)
    assert facts["waits"] == 1 and facts["releases"] == 1 and facts["release_before_wait"]
    assert facts["loads_before_wait"] == _facts(compiled, default_case)["loads_before_wait"]


@pytest.mark.parametrize("cache", ["bf16", "fp8"])
def test_grouped_query_decode_filling_16_rows_compiles_for_hopper(compiled, cache):
    """MII_GQA_DECODE_QUERIES=pack: packed decode programs multiply 16 rows (4 queries
    x 4 heads) where the whole-tile launch multiplies 64 (16 x 4, a decode using 4),
    with the early loads before the one wait and the merge after the launch."""
    suffix = "-fp8" if cache == "fp8" else ""
    facts = _facts(compiled, f"attention-gqa{suffix}-fill-rows")
    assert facts["dot_rows"] == [16]
    assert _facts(compiled, f"attention-gqa{suffix}")["dot_rows"] == [64]
    assert facts["waits"] == 1 and facts["loads_before_wait"] > 0
    assert facts["prefetches"] > 0 and facts["prefetch_before_wait"]
    assert facts["atomics"] == 0 and facts["pipelined_loops"] >= 2


# The skinny kernel's one-row launches on the CUDA cores (MII_GEMV_ONE_ROW=cores).
GEMV_CORES_CASES = [
    "gemv-bf16-cores", "gemv-bf16-cores-many-bands", "gemv-fp8-cores", "gemv-fp8-cores-gated",
    "gemv-fp8-cores-f32", "gemv-fp8-cores-rows4",
]  # fmt: skip

ALL_CASES = [
    *ATTENTION_CASES, "attention-gqa-wait-first", "attention-gqa-fill-rows",
    "attention-gqa-fp8-fill-rows", "attention-gqa-merge-after", "rotary", "gemv-bf16", "gemv-fp8",
    "gemv-fp8-short-k", "rms-norm-fp8", "act-and-mul-fp8", "moe-fp8-decode", "moe-fp8-prompt",
    "moe-fp8-decode-swapped", "gemv-bf16-gated", "gemv-fp8-gated", *GEMV_CORES_CASES,
]  # fmt: skip


@pytest.mark.parametrize("case", ALL_CASES)
def test_pipelined_loops_wait_for_no_load_of_their_own_trip(compiled, case):
    """Triton pipelines the loads that feed a dot; a load it leaves out (a vector of
    one 16-bit value per thread, a row's scale that feeds no dot) makes every trip
    of the weight loop wait for the L2 cache. Two did: the per-slice x scales of the
    float8 GEMV and of the float8 expert GEMM (loaded a trip ahead since; on an H200
    the float8 qkv GEMV went from 17.9 to 17.2 us)."""
    facts = _facts(compiled, case)
    if facts["stages"] == 2:
        # A 2-stage pipeline loads each trip's block ids just before the copies they
        # address, so every trip waits for them (an L2 round trip). Loading them a
        # trip ahead changed nothing on the H200 (the sixteenth session, 5754250:
        # every GQA decode launch within 1 %, W1 Llama-3-8B 5.24 / 5.26 vs 5.22 s):
        # other programs hide the wait. Any other waited load is a regression.
        waited = facts["waited_loads_in_pipelined_loops"] - facts["waited_block_id_loads"]
        assert waited == 0
    else:
        assert facts["waited_loads_in_pipelined_loops"] == 0


@pytest.mark.parametrize(
    "case",
    [
        "gemv-bf16",
        "gemv-fp8",
        "gemv-fp8-short-k",
        "moe-fp8-decode",
        "moe-fp8-prompt",
        "moe-fp8-decode-swapped",
        "gemv-bf16-gated",
        "gemv-fp8-gated",
        *GEMV_CORES_CASES,
    ],
)
def test_weight_loops_are_software_pipelined(compiled, case):
    """The GEMMs' weight loops stream through asynchronous copies, stages ahead (as
    a launch compiles them: with its arguments' alignment); else the test above
    would hold for loops that wait for every load."""
    assert _facts(compiled, case)["pipelined_loops"] >= 1


def test_swapped_float8_decode_tile_multiplies_float8_on_wgmma(compiled):
    """MII_MOE_SWAP_AB=on: Mixtral's 16-pair float8 decode tile, computed transposed
    (the weights on the tensor cores' 64-row side, as the skinny decode kernel),
    multiplies float8 by float8 on wgmma; the plain tile runs mma.sync on weights
    converted to f16 (256 conversions a trip)."""
    swapped = _facts(compiled, "moe-fp8-decode-swapped")
    assert swapped["wgmma"] > 0 and swapped["float8_converts"] == 0
    assert _facts(compiled, "moe-fp8-decode")["float8_converts"] > 0


def test_fp8_cache_values_read_as_pairs_take_no_byte_gathers(compiled):
    """An fp8 cache's values feed the P x V product in the operand layout that runs
    along the keys, while the cache stores them along the head dimension. Read as
    float8 (MII_FP8_KV_VALUES=bytes) that transposition compiles to one
    shared-memory load per byte (ld.shared.b8); read as 16-bit pairs (pairs) it is
    ldmatrix.trans, as for a bf16 cache, and no byte loads remain."""
    as_bytes = _facts(compiled, "attention-mha-fp8")
    pairs = _facts(compiled, "attention-mha-fp8-pairs")
    bf16 = _facts(compiled, "attention-mha")
    assert as_bytes["shared_byte_loads"] >= 128 and as_bytes["transposed_ldmatrix"] == 0
    assert pairs["shared_byte_loads"] == 0 and pairs["transposed_ldmatrix"] > 0
    assert bf16["shared_byte_loads"] == 0 and bf16["transposed_ldmatrix"] > 0


@pytest.mark.parametrize(
    "case", ["attention-mha-fp8-one-query", "attention-mha-fp8-one-query-split"]
)
def test_one_query_decode_loop_is_pipelined_and_reduces_within_warps(compiled, case):
    """MII_DECODE_ONE_QUERY=cores: the CUDA-core key loop is software-pipelined (its
    loads feed no product, so only the loop's own stages ask for it) beside the two
    product loops, and its steps reduce only along the head dimension, never over the
    keys, which would cross warps through shared memory each step (each lane keeps its
    own softmax; the merge is after the loop)."""
    facts = _facts(compiled, case)
    assert facts["pipelined_loops"] == 3 and facts["one_query_loops"] == 1
    assert facts["one_query_key_reductions"] == 0


@pytest.mark.parametrize("case", GEMV_CORES_CASES)
def test_one_row_gemv_multiplies_on_the_cuda_cores(compiled, case):
    """MII_GEMV_ONE_ROW=cores: no matrix product at all (no 16-row tile, no wgmma),
    float8 weights converted by the e4m3x2 instructions, the weights' L2 prefetch
    before the wait, and no reduction across threads inside the weight loop (each
    lane keeps its sum; one reduction after it)."""
    facts = _facts(compiled, case)
    assert facts["dot_rows"] == [] and facts["wgmma"] == 0 and facts["mma_sync"] == 0
    assert (facts["float8_converts"] > 0) == ("fp8" in case)
    assert facts["prefetches"] > 0 and facts["prefetch_before_wait"]
    assert facts["one_query_loops"] == 1 and facts["reductions_in_loops_without_products"] == 0
    # (the one-query attention loop reduces over the head dimension each step: counted)
    assert _facts(compiled, "attention-mha-fp8-one-query")["reductions_in_loops_without_products"]
