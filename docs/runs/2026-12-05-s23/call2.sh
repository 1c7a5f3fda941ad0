# Twenty-third session, call 2 (call 1 got an H200). On an H200: FastGen serving over HTTP
# with the fp8 KV cache alone and the bf16 defaults (same call; 16 and 20 offered), then the
# GPU test files the twenty-second session's limits cut, as far as the call's time allows.
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
serve kvfp8 --kv-cache-dtype fp8
serve bf16
timeout 190 python3 -m pytest -q -p no:cacheprovider tests/test_triton_gemv_fp8.py tests/test_triton_moe_fp8.py tests/test_fp8_activations.py tests/test_grammar_mask.py tests/test_fp8_kv_cache.py > $OUT/raw/tests_gpu_rest.log 2>&1; tail -n 3 $OUT/raw/tests_gpu_rest.log; pack
