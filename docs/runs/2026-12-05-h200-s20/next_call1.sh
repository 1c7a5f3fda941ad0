# Prepared in the twentieth session for the next one with an H200 (it got H100s only):
# the fp8-KV one-head decode on the CUDA cores (default since a917b19, swept on an H100)
# on the H200: its GPU tests, then decode_sweep --one-query (is 32 keys / 4 warps / 3
# stages still the best launch there?)
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
cat $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_kv_cache.py > $OUT/raw/tests_fp8kv.log 2>&1; tail -n 3 $OUT/raw/tests_fp8kv.log; pack
timeout 330 python3 benchmarks/decode_sweep.py --one-query --json $OUT/raw/one_query.json > $OUT/raw/one_query.log 2>&1
grep -v "^cores " $OUT/raw/one_query.log | head -4 | cut -c1-300; pack
