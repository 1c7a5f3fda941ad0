# Prepared in the twenty-second session (four H100s came, no H200) for the next one.
# Any card: the new GPU test of destroy() (graphs, graphs + compile) and the GPU test
# files the session's limits cut (call 3 / call 4). On an H200 also: decode_sweep
# --one-query (32 keys / 4 warps / 3 stages, the H100's best, on the H200?).
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
cat $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k destroy > $OUT/raw/tests_destroy.log 2>&1; tail -n 3 $OUT/raw/tests_destroy.log; pack
if grep -q H200 $OUT/raw/gpu.txt; then
  timeout 330 python3 benchmarks/decode_sweep.py --one-query --json $OUT/raw/one_query.json > $OUT/raw/one_query.log 2>&1
  grep -v "^cores " $OUT/raw/one_query.log | head -4 | cut -c1-300; pack
else
  timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_triton_gemv_fp8.py tests/test_triton_moe_fp8.py tests/test_fp8_activations.py tests/test_grammar_mask.py tests/test_fp8_kv_cache.py > $OUT/raw/tests_gpu_rest.log 2>&1; tail -n 3 $OUT/raw/tests_gpu_rest.log; pack
fi
