# Twenty-second session, second call. On an H200: FastGen serving over HTTP with the fp8 KV
# cache alone and the bf16 defaults (same call), then decode_sweep --one-query (is 32 keys /
# 4 warps / 3 stages, swept on an H100, the H200's best launch too?). On an H100 (first run
# of this file): FP8 weights + the fp8 KV cache in the same serving workload (completes call 1's
# H100 table); on an H100 again (call 3): the GPU test files at this tree.
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
cat $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
serve() {  # name, then engine flags
  local name=$1; shift
  timeout 170 python3 benchmarks/serving.py --prompt-mean 2600 --gen-mean 60 --rates 16 20 --num-requests 200 --no-offline --http "$@" --json $OUT/raw/serving_$name.json > $OUT/raw/serving_$name.log 2>&1
  echo "== $name"; sed -n '/^serving /,$p' $OUT/raw/serving_$name.log | head -4 | cut -c1-200; pack
}
if grep -q H200 $OUT/raw/gpu.txt; then
  serve kvfp8 --kv-cache-dtype fp8
  serve bf16
  timeout 300 python3 benchmarks/decode_sweep.py --one-query --json $OUT/raw/one_query.json > $OUT/raw/one_query.log 2>&1
  grep -v "^cores " $OUT/raw/one_query.log | head -4 | cut -c1-300; pack
elif [ "${CALL:-2}" = 2 ]; then
  serve fp8both --quantization fp8 --kv-cache-dtype fp8
else
  OUT=$OUT/raw timeout 480 bash scripts/gpu_run.sh tests > $OUT/raw/tests.log 2>&1; tail -n 4 $OUT/raw/tests.log; pack
fi
