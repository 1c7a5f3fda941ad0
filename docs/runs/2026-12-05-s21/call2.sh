# Twenty-first session: FastGen serving over HTTP with FP8 weights + the fp8 KV cache
# (decode attention on the CUDA cores, the default since a917b19) at 16 offered req/s,
# then the bf16 defaults at 16 (the same call: the issue 19 target is with defaults).
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
timeout 270 python3 benchmarks/serving.py --prompt-mean 2600 --gen-mean 60 --rates 16 --num-requests 200 --no-offline --http --quantization fp8 --kv-cache-dtype fp8 --json $OUT/raw/serving_fp8_16.json > $OUT/raw/serving_fp8_16.log 2>&1
sed -n '/^serving /,$p' $OUT/raw/serving_fp8_16.log | head -6; pack
timeout 270 python3 benchmarks/serving.py --prompt-mean 2600 --gen-mean 60 --rates 16 --num-requests 200 --no-offline --http --json $OUT/raw/serving_bf16_16.json > $OUT/raw/serving_bf16_16.log 2>&1
sed -n '/^serving /,$p' $OUT/raw/serving_bf16_16.log | head -6; pack
