# Twenty-seventh session, call 1: 1. on an H200, benchmarks/gemv_cores_sweep.py (the CUDA-core
# one-row launches were swept on an H100 only; the H200's 43 % more bandwidth may want more bytes
# in flight), Llama-2-7B then Llama-3-8B, now with the engine's own launch timed beside the best;
# 2. the GPU test files not run last session, one file at a time, seconds since start on each line.
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
cat $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
if grep -q H200 $OUT/raw/gpu.txt; then
  for model in llama2-7b llama3-8b; do
    timeout 170 python3 benchmarks/gemv_cores_sweep.py --model $model --json $OUT/raw/sweep_$model.json > $OUT/raw/sweep_$model.log 2>&1
    echo "[$SECONDS s] sweep $model"; grep "M=1" $OUT/raw/sweep_$model.log | cut -c1-260; pack
  done
fi
for f in test_fp8_gpu test_triton_gemv_fp8 test_fp8_kernels_gpu test_triton_moe_fp8 test_structured_output test_gpu; do
  [ $SECONDS -gt 560 ] && { echo "[$SECONDS s] stop before $f"; break; }
  timeout $((585 - SECONDS)) python3 -m pytest -q -p no:cacheprovider --tb=short tests/$f.py > $OUT/raw/$f.log 2>&1
  echo "[$SECONDS s] $f: $(tail -n 1 $OUT/raw/$f.log)"; grep -E "^(FAILED|ERROR)" $OUT/raw/$f.log | head -5; pack
done
