# Twenty-second session, fourth call. On an H200: decode_sweep --one-query (is the H100's
# 32 keys / 4 warps / 3 stages the H200's best launch too?), then the fp8 KV cache alone in
# FastGen serving. On an H100: this session's HTTP / deployment tests under the device's
# Python 3.12 + transformers 5.17, then the GPU test files call 3 did not reach.
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
cat $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
if grep -q H200 $OUT/raw/gpu.txt; then
  timeout 300 python3 benchmarks/decode_sweep.py --one-query --json $OUT/raw/one_query.json > $OUT/raw/one_query.log 2>&1
  grep -v "^cores " $OUT/raw/one_query.log | head -4 | cut -c1-300; pack
  timeout 170 python3 benchmarks/serving.py --prompt-mean 2600 --gen-mean 60 --rates 16 20 --num-requests 200 --no-offline --http --kv-cache-dtype fp8 --json $OUT/raw/serving_kvfp8.json > $OUT/raw/serving_kvfp8.log 2>&1
  sed -n '/^serving /,$p' $OUT/raw/serving_kvfp8.log | head -4 | cut -c1-200; pack
else
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_sampling_defaults.py tests/test_remote_terminate.py tests/test_registry.py tests/test_gateway.py tests/test_serve_cli.py > $OUT/raw/tests_http.log 2>&1; tail -n 3 $OUT/raw/tests_http.log; pack
  timeout 280 python3 -m pytest -q -p no:cacheprovider tests/test_pdl.py tests/test_gpu.py tests/test_fp8_gpu.py tests/test_fp8_kernels_gpu.py tests/test_triton_gemv_fp8.py tests/test_triton_moe_fp8.py tests/test_fp8_activations.py tests/test_grammar_mask.py > $OUT/raw/tests_gpu_rest.log 2>&1; tail -n 3 $OUT/raw/tests_gpu_rest.log; pack
fi
