# Prepared in the twentieth session for the next one with an H200: FastGen serving over
# HTTP with FP8 weights + the fp8 KV cache, its decode attention now on the CUDA cores
# (the fourteenth session, with the 16-row products: 16.1-16.4 effective req/s at 16 offered)
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
for rate in 16 20; do
  timeout 250 python3 benchmarks/serving.py --prompt-mean 2600 --gen-mean 60 --rates $rate --num-requests 200 --no-offline --http --quantization fp8 --kv-cache-dtype fp8 --json $OUT/raw/serving_fp8_$rate.json > $OUT/raw/serving_fp8_$rate.log 2>&1
  sed -n '/^serving /,$p' $OUT/raw/serving_fp8_$rate.log | head -6; pack
done
