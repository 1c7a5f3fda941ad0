"""Run a benchmark with the engine's one-row CUDA-core launches replaced, weight by
weight, by the fastest launch of benchmarks/gemv_cores_sweep.py JSON files (a
tryout: the engine's own choice is ops/triton_gemv_launch.py's cores_for).

    python swept_cores.py SWEEP.json [SWEEP.json ...] -- benchmarks/latency.py [args]
"""

import json
import runpy
import sys
from pathlib import Path

from mii.ops import triton_gemv
from mii.ops.triton_gemv_launch import GemvConfig

split = sys.argv.index("--")
best = {}
for path in sys.argv[1:split]:
    for row in json.loads(Path(path).read_text())["rows"]:
        for kind in ("fp8", "bf16"):
            if kind in row:
                best[(row["n"], row["k"], kind == "fp8")] = GemvConfig(*row[kind]["best"])
print(f"swept launches for {len(best)} weights", flush=True)
engine_launch = triton_gemv._launch


def launch(x, weight, scale, bias, config, gated=0):
    if config.cores and x.shape[0] == 1:
        config = best.get((weight.shape[0], weight.shape[1], scale is not None), config)
    return engine_launch(x, weight, scale, bias, config, gated)


triton_gemv._launch = launch
sys.argv = sys.argv[split + 1 :]
runpy.run_path(sys.argv[0], run_name="__main__")
