# Twenty-ninth session, call 1. On an H200: the twenty-eighth session's call 2 (the 16-bit few-band
# one-row launch A/B at batch 1 and the one-row sweep). On an H100 (none of that is new there):
# the GPU test files of scripts/gpu_run.sh, at this tree (a second try: call 1b).
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
# (the first try's 330 s stopped these at 44 %, no failure by then: the whole list this time)
timeout $((560 - SECONDS)) bash scripts/gpu_run.sh tests > $OUT/raw/tests_summary.txt 2>&1
cp $OUT/gpu_tests.log $OUT/raw/ 2>/dev/null; rm -f $OUT/gpu_tests.log
echo "[$SECONDS s] gpu_run.sh tests: $(grep -E 'passed|failed' $OUT/raw/gpu_tests.log | tail -n 1)"
grep -E "^(FAILED|ERROR)" $OUT/raw/gpu_tests.log | head -20
(cd $OUT/raw && tar czf ../call.tgz . ) && rm -rf $OUT/raw
