# Prepared in the twentieth session for the next one with an H200: call1.sh (W1 fp8 KV dot vs
# cores, bf16 defaults, FP8 weights + fp8 KV) on the H200: issue 20's W1 ratio there
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
w1() {  # tag, env assignment, throughput.py options
  local tag=$1 env=$2; shift 2
  env $env timeout 90 python3 benchmarks/throughput.py "$@" --json $OUT/raw/$tag.json > $OUT/raw/$tag.log 2>&1
  echo "$tag $(grep -o '"seconds": [0-9.]*\|"x_compute_floor": [0-9.]*' $OUT/raw/$tag.log | tr '\n' ' ')"; pack
}
w1 fp8kv_dot_1 MII_DECODE_ONE_QUERY=dot --kv-cache-dtype fp8
w1 fp8kv_cores_1 MII_DECODE_ONE_QUERY=cores --kv-cache-dtype fp8
w1 fp8kv_dot_2 MII_DECODE_ONE_QUERY=dot --kv-cache-dtype fp8
w1 fp8kv_cores_2 MII_DECODE_ONE_QUERY=cores --kv-cache-dtype fp8
w1 bf16_defaults MII_UNUSED=1
w1 fp8w_fp8kv MII_UNUSED=1 --quantization fp8 --kv-cache-dtype fp8
w1 bf16_defaults_2 MII_UNUSED=1
w1 fp8w_fp8kv_2 MII_UNUSED=1 --quantization fp8 --kv-cache-dtype fp8
