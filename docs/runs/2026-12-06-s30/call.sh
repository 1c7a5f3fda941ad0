# Thirtieth session, one device call: bash docs/runs/2026-12-06-s30/call.sh first|a|b
# first: on an H200 the twenty-eighth session's call 2 (the 16-bit few-band one-row launch A/B at
# batch 1 and the one-row sweep, which has never had an H200), elsewhere the first half of the GPU
# test list. a / b: one half of the GPU test list (scripts/gpu_run.sh tests-a / tests-b; the whole
# list does not fit one 10-minute call).
export OUT
half=${1:?first, a or b}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee /tmp/gpu.txt
if [ "$half" = first ] && grep -q H200 /tmp/gpu.txt; then
  bash docs/runs/2026-12-06-s28/call2.sh
  exit 0
fi
[ "$half" = first ] && half=a
mkdir -p $OUT/raw
cp /tmp/gpu.txt $OUT/raw/gpu.txt
timeout $((570 - SECONDS)) bash scripts/gpu_run.sh tests-$half > $OUT/raw/tests_summary.txt 2>&1
mv $OUT/gpu_tests_$half.log $OUT/raw/ 2>/dev/null
echo "[$SECONDS s] gpu_run.sh tests-$half: $(grep -E 'passed|failed' $OUT/raw/gpu_tests_$half.log | tail -n 1)"
grep -E "^(FAILED|ERROR)" $OUT/raw/gpu_tests_$half.log | head -20
(cd $OUT/raw && tar czf ../call.tgz . ) && rm -rf $OUT/raw
