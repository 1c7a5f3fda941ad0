# Twenty-first session: FP8 weights + the fp8 KV cache over HTTP at 20 and 24 offered
# req/s (at 16 the deployment was not saturated: served 14.12 = what arrived, TTFT p99 0.27 s).
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
for rate in 20 24; do
  timeout 250 python3 benchmarks/serving.py --prompt-mean 2600 --gen-mean 60 --rates $rate --num-requests 200 --no-offline --http --quantization fp8 --kv-cache-dtype fp8 --json $OUT/raw/serving_fp8_$rate.json > $OUT/raw/serving_fp8_$rate.log 2>&1
  sed -n '/^serving /,$p' $OUT/raw/serving_fp8_$rate.log | tail -1; pack
done
