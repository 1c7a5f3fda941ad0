# Twenty-third session, call 4. Call 3 (an H100): W1 with the fp8 cache 6.40 / 6.40 s narrow
# vs 6.33 / 6.35 wide, so the narrow unsplit launch, swept faster on the H200, is 1 % slower
# end to end on the H100. On an H200: the same W1 A/B, alternated, then FastGen serving with
# the fp8 cache narrow vs wide. On an H100: decode_sweep --one-query with every setting kept.
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
if grep -q H200 $OUT/raw/gpu.txt; then
  w1 fp8kv_narrow_1 MII_ONE_QUERY_UNSPLIT_LAUNCH=narrow --kv-cache-dtype fp8
  w1 fp8kv_wide_1 MII_ONE_QUERY_UNSPLIT_LAUNCH=wide --kv-cache-dtype fp8
  w1 fp8kv_narrow_2 MII_ONE_QUERY_UNSPLIT_LAUNCH=narrow --kv-cache-dtype fp8
  w1 fp8kv_wide_2 MII_ONE_QUERY_UNSPLIT_LAUNCH=wide --kv-cache-dtype fp8
  timeout 130 python3 benchmarks/serving.py --prompt-mean 2600 --gen-mean 60 --rates 16 --num-requests 200 --no-offline --http --kv-cache-dtype fp8 --json $OUT/raw/serving_kvfp8_narrow.json > $OUT/raw/serving_kvfp8_narrow.log 2>&1
  sed -n '/^serving /,$p' $OUT/raw/serving_kvfp8_narrow.log | head -3 | cut -c1-200; pack
else
  timeout 300 python3 benchmarks/decode_sweep.py --one-query --json $OUT/raw/one_query.json > $OUT/raw/one_query.log 2>&1
  grep -v "^cores " $OUT/raw/one_query.log | head -4 | cut -c1-300; pack
fi
