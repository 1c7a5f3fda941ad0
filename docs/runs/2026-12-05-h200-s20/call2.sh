# call 2 (twentieth session): the fp8-KV GPU tests with the CUDA-core one-head decode
# (now the default), W1 FP8 weights with the bf16 cache, FastGen serving over HTTP with
# FP8 weights + the fp8 cache
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_kv_cache.py > $OUT/raw/tests_fp8kv.log 2>&1; tail -n 3 $OUT/raw/tests_fp8kv.log; pack
timeout 90 python3 benchmarks/throughput.py --quantization fp8 --json $OUT/raw/fp8w.json > $OUT/raw/fp8w.log 2>&1
echo "fp8w $(grep -o '"seconds": [0-9.]*\|"x_compute_floor": [0-9.]*' $OUT/raw/fp8w.log | tr '\n' ' ')"; pack
timeout 170 python3 benchmarks/serving.py --prompt-mean 2600 --gen-mean 60 --rates 16 --num-requests 160 --no-offline --http --quantization fp8 --kv-cache-dtype fp8 --json $OUT/raw/serving_fp8.json > $OUT/raw/serving_fp8.log 2>&1
sed -n '/^serving /,$p' $OUT/raw/serving_fp8.log | head -12; pack
