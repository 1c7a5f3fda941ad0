# Twenty-ninth session, call 1. On an H200: the twenty-eighth session's call 2 (the 16-bit few-band
# one-row launch A/B at batch 1 and the one-row sweep). On an H100 (none of that is new there):
# the GPU test files of scripts/gpu_run.sh plus the serving tests, at this tree.
export OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee /tmp/gpu.txt
if grep -q H200 /tmp/gpu.txt; then
  bash docs/runs/2026-12-06-s28/call2.sh
  exit 0
fi
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
cp /tmp/gpu.txt $OUT/raw/gpu.txt
timeout 330 bash scripts/gpu_run.sh tests > $OUT/raw/tests_summary.txt 2>&1
echo "[$SECONDS s] gpu_run.sh tests: $(tail -n 1 $OUT/raw/tests_summary.txt)"
cp $OUT/gpu_tests.log $OUT/raw/ 2>/dev/null; rm -f $OUT/gpu_tests.log
timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_structured_serving.py tests/test_structured_output.py > $OUT/raw/structured.log 2>&1
echo "[$SECONDS s] structured: $(tail -n 1 $OUT/raw/structured.log)"
(cd $OUT/raw && tar czf ../call.tgz . ) && rm -rf $OUT/raw
