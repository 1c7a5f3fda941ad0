"""Run a benchmark with the one-row launch of 16-bit weights of few bands as before
this session (CORES_CONFIG, 8-row bands of 1,024 columns; the A/B's other arm).

    python old_cores.py benchmarks/latency.py [args]
"""

import runpy
import sys

from mii.ops import triton_gemv_launch

triton_gemv_launch.BF16_CORES_FEW_BANDS_CONFIG = triton_gemv_launch.CORES_CONFIG
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
