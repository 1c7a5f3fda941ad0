"""Every benchmark script imports and parses its options on a machine without a
GPU: they run only on the lent device, where a broken import costs device time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Scripts have a main block; the other modules (common.py, serving_load.py) are their helpers.
SCRIPTS = sorted(
    p.name
    for p in (ROOT / "benchmarks").glob("*.py")
    if 'if __name__ == "__main__":' in p.read_text()
)


def test_every_script_is_listed():
    assert {"throughput.py", "latency.py", "serving.py", "gemv_sweep.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help(script, tmp_path):
    """Run as the docs show (``python benchmarks/NAME.py``), from anywhere: only mii
    itself on the path, not the repository root (each script puts it there)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_no_benchmark_module_hides_an_installed_one():
    """``python benchmarks/NAME.py`` puts benchmarks/ first on the path, so a module
    there named as an installed package replaces it for everything the script
    imports: benchmarks/kernels.py once hid the ``kernels`` package that
    transformers 5.25 imports, and every script that loaded a model failed."""
    import importlib.util

    clashes = {}
    for module in (ROOT / "benchmarks").glob("*.py"):
        spec = importlib.util.find_spec(module.stem)
        if spec is not None and Path(spec.origin or "").parent != module.parent:
            clashes[module.name] = spec.origin
    assert not clashes


def test_quantization_option_reaches_the_engine_options():
    """``--quantization fp8`` of latency.py / throughput.py becomes the engine
    option, and the latency floor counts one byte per linear weight."""
    import argparse

    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.common import (
            LLAMA2_7B,
            add_engine_arguments,
            engine_options,
            num_params,
            weight_bytes,
        )
    finally:
        sys.path.remove(str(ROOT))
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    result: dict = {}
    options = engine_options(parser.parse_args(["--quantization", "fp8"]), result, {})
    assert options["quantization"] == "fp8" and result["quantization"] == "fp8"
    assert "quantization" not in engine_options(parser.parse_args([]), {}, {})
    embeddings = 2 * LLAMA2_7B["vocab_size"] * LLAMA2_7B["hidden_size"]
    assert weight_bytes(LLAMA2_7B) == 2 * num_params(LLAMA2_7B)
    assert weight_bytes(LLAMA2_7B, "fp8") == num_params(LLAMA2_7B) + embeddings


def test_serving_roofline_counts_the_decode_steps_kv_reads():
    """FastGen's long-prompt request on Llama-2-7B (32 KV heads): 2,600 prompt
    tokens, 60 generated. Compute alone: 2 x 6.74 B params x 2,660 tokens = 35.9
    TFLOP (46.6 ms at 770 TFLOP/s). The roofline adds the causal attention (1.8
    TFLOP) and 60 reads of ~2,630 tokens x 512 KiB of KV = 82.7 GB (19.7 ms at
    4.2 TB/s): 68.6 ms, 14.6 requests/s instead of the compute-only 21.5."""
    from benchmarks.common import LLAMA2_7B
    from benchmarks.serving import floors
    from benchmarks.serving_load import Request

    requests = [Request("x", 2600, 60)] * 100
    result = floors(LLAMA2_7B, requests, tflops=770.0, copy_tb_s=4.2)
    assert result["compute_ceiling_rps"] == pytest.approx(21.5, rel=0.01)
    assert result["roofline_floor_s"] == pytest.approx(6.86, rel=0.01)
    assert result["roofline_ceiling_rps"] == pytest.approx(14.6, rel=0.01)


def test_serving_floors_follow_the_fp8_options():
    """The same request with the engine options measured: an fp8 KV cache reads one
    byte per cached value (41.4 GB, 9.8 ms at 4.2 TB/s instead of 19.7), FP8 weights
    run the linear layers at the float8 rate (6.48 B of 6.74 B parameters; the 0.26 B
    of embeddings and LM head stay at the bf16 rate). Both: 2 x 2,660 x (0.262 B /
    770 + 6.476 B / 1,540) TFLOP/s = 24.2 ms + attention 2.3 ms + 9.8 ms = 36.3 ms."""
    from benchmarks.common import LLAMA2_7B, num_params
    from benchmarks.serving import floors
    from benchmarks.serving_load import Request

    requests = [Request("x", 2600, 60)] * 100
    plain = floors(LLAMA2_7B, requests, tflops=770.0, copy_tb_s=4.2)
    assert plain["floor_basis"] == {"weights": "bf16", "kv_cache": "bf16"}
    fp8_kv = floors(LLAMA2_7B, requests, tflops=770.0, copy_tb_s=4.2, kv_cache_dtype="fp8")
    assert fp8_kv["compute_floor_s"] == plain["compute_floor_s"]
    attention_s = 100 * 32 * 4 * 2600**2 // 2 * 4096 / 770e12  # 0.230 s
    kv_plain = plain["roofline_floor_s"] - plain["compute_floor_s"] - attention_s
    kv_fp8 = fp8_kv["roofline_floor_s"] - fp8_kv["compute_floor_s"] - attention_s
    assert kv_plain == pytest.approx(1.97, abs=0.02)
    assert kv_fp8 == pytest.approx(0.985, abs=0.02)
    both = floors(
        LLAMA2_7B, requests, tflops=770.0, copy_tb_s=4.2, fp8_tflops=1540.0, kv_cache_dtype="fp8"
    )
    assert both["floor_basis"] == {"weights": "fp8", "kv_cache": "fp8"}
    unquantized = 2 * LLAMA2_7B["vocab_size"] * LLAMA2_7B["hidden_size"]
    linear = num_params(LLAMA2_7B) - unquantized
    expected = 2 * 2660 * 100 * (unquantized / 770e12 + linear / 1540e12)
    assert both["compute_floor_s"] == pytest.approx(expected, abs=0.005)
    assert both["roofline_floor_s"] == pytest.approx(3.63, abs=0.02)


def test_mixtral_floors_count_active_parameters():
    """Mixtral-8x7B by hand: attention 4096 x (4096 + 2 x 1024) + 4096^2 = 41.9 M per
    layer, each expert 3 x 4096 x 14336 = 176.2 M, the router 4096 x 8; 32 layers plus
    embeddings and LM head 2 x 32000 x 4096: 46.70 B in all, 12.88 B with 2 of 8
    experts. Batch 1 reads the active weights (bf16), or with fp8 one byte per linear
    weight and two for embeddings, LM head and routers (32 x 4096 x 8). Serving's
    compute floor counts the active parameters too."""
    from benchmarks.common import MIXTRAL_8X7B, num_params, weight_bytes
    from benchmarks.serving import floors
    from benchmarks.serving_load import Request

    attention, expert, router = 41_943_040, 176_160_768, 32_768
    embeddings = 2 * 32_000 * 4096
    total = 32 * (attention + 8 * expert + router) + embeddings
    active = 32 * (attention + 2 * expert + router) + embeddings
    assert (total, active) == (46_702_526_464, 12_879_659_008)
    assert num_params(MIXTRAL_8X7B) == total
    assert num_params(MIXTRAL_8X7B, active=True) == active
    assert weight_bytes(MIXTRAL_8X7B) == 2 * active
    unquantized = embeddings + 32 * router
    assert weight_bytes(MIXTRAL_8X7B, "fp8") == 2 * unquantized + (active - unquantized)
    result = floors(MIXTRAL_8X7B, [Request("x", 1000, 100)] * 10, tflops=1000.0, copy_tb_s=4.0)
    assert result["compute_floor_s"] == pytest.approx(2 * active * 11_000 / 1e15, abs=0.005)


def test_serving_mixes_short_prompts_among_long_ones():
    """--short-share: that share of the requests gets a short prompt (chat turns among
    long documents), generations kept, everything within max_length; the rows per
    prompt class follow the draw, not the length (a long draw can be short)."""
    import random

    from benchmarks.serving_load import Request, Timing, by_prompt_class, mixed_lengths

    long_pairs = [(2600 if i % 9 else 700, 60 + i % 7) for i in range(400)]
    mixed, drawn_short = mixed_lengths(random.Random(3), 0.25, 128, long_pairs, 4096, 2)
    assert [gen for _, gen in mixed] == [gen for _, gen in long_pairs]
    short = [prompt for (prompt, _), pick in zip(mixed, drawn_short) if pick]
    assert 0.2 < len(short) / len(mixed) < 0.3
    assert 100 < sum(short) / len(short) < 156 and min(short) >= 2 and max(short) < 700
    kept = [pair for pair, pick, old in zip(mixed, drawn_short, long_pairs) if not pick]
    assert kept == [old for old, pick in zip(long_pairs, drawn_short) if not pick]
    assert all(prompt + gen <= 4096 for prompt, gen in mixed)
    requests = [Request("x", prompt, gen) for prompt, gen in mixed]
    classes = by_prompt_class(requests, [Timing() for _ in requests], drawn_short)
    assert [r.prompt_tokens for r in classes["short"][0]] == short
    assert 700 in [r.prompt_tokens for r in classes["long"][0]]
    assert len(classes["long"][0]) == len(mixed) - len(short) == len(classes["long"][1])
