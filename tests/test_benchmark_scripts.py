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
