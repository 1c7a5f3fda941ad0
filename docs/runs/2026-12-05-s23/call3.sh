# Twenty-third session, call 3: W1 (Llama-2-7B, fp8 KV cache, engine defaults) with the
# CUDA-core decode programs' unsplit launch narrow (16 keys / 2 warps / 3 stages, the new
# default) vs wide (32 / 4 / 3, as before), alternated; then the fp8-cache GPU tests.
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
cat $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
w1() {  # tag, env assignment, throughput.py options
  local tag=$1 env=$2; shift 2
  env $env timeout 90 python3 benchmarks/throughput.py "$@" --json $OUT/raw/$tag.json > $OUT/raw/$tag.log 2>&1
  echo "$tag $(grep -o '"seconds": [0-9.]*\|"x_compute_floor": [0-9.]*' $OUT/raw/$tag.log | tr '\n' ' ')"; pack
}
w1 fp8kv_narrow_1 MII_ONE_QUERY_UNSPLIT_LAUNCH=narrow --kv-cache-dtype fp8
w1 fp8kv_wide_1 MII_ONE_QUERY_UNSPLIT_LAUNCH=wide --kv-cache-dtype fp8
w1 fp8kv_narrow_2 MII_ONE_QUERY_UNSPLIT_LAUNCH=narrow --kv-cache-dtype fp8
w1 fp8kv_wide_2 MII_ONE_QUERY_UNSPLIT_LAUNCH=wide --kv-cache-dtype fp8
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_kv_cache.py > $OUT/raw/tests_fp8_kv.log 2>&1; tail -n 2 $OUT/raw/tests_fp8_kv.log; pack
