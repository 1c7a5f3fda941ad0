# Twenty-first session: on an H200, issue 20's W1 ratio (next_call2 of the twentieth session);
# on any other card, the GPU test files at this commit (gpu_run.sh tests) and the HTTP route.
export OUT
mkdir -p $OUT/raw
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  bash docs/runs/2026-12-05-h200-s20/next_call2.sh
  exit
fi
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
cat $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
OUT=$OUT/raw timeout 420 bash scripts/gpu_run.sh tests > $OUT/raw/tests.log 2>&1; tail -n 4 $OUT/raw/tests.log; pack
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gateway.py tests/test_admission.py tests/test_fastapi_example.py > $OUT/raw/http_tests.log 2>&1; tail -n 2 $OUT/raw/http_tests.log; pack
