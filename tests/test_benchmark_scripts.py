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
def test_script_help(script):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


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
