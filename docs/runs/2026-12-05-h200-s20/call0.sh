# call 0 (twentieth session, H100): the nineteenth session's call1.sh, run as it was
# (MII_DECODE_ONE_QUERY=cores) against the 16-row products: GPU correctness, the
# kernel sweep (W1 both ways: call1b.sh)
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
cat $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_kv_cache.py > $OUT/raw/tests_fp8kv.log 2>&1; tail -3 $OUT/raw/tests_fp8kv.log
MII_DECODE_ONE_QUERY=cores timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_kv_cache.py tests/test_triton_kernels.py -x > $OUT/raw/tests_cores.log 2>&1; tail -3 $OUT/raw/tests_cores.log; pack
timeout 360 python3 benchmarks/decode_sweep.py --one-query --json $OUT/raw/one_query.json > $OUT/raw/one_query.log 2>&1
grep -v "^cores " $OUT/raw/one_query.log | tail -8 | cut -c1-400; pack
