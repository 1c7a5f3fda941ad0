# Thirty-seventh session, call 2: on an H200, docs/runs/2026-12-07-s32/call5.sh (batch 1, the default
# 4-row bands vs the old 8-row ones, alternated); on any other card the engine's GPU tests
# (tests/test_gpu.py, tests/test_pdl.py: engine defaults on CUDA, now with short_prompt_reserve on).
export OUT
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  exec bash docs/runs/2026-12-07-s32/call5.sh
fi
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 420 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_pdl.py tests/test_short_prompt_reserve.py 2>&1 | tee $OUT/gpu_tests.log | tail -15
