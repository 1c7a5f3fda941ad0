# Twenty-second session: FastGen serving over HTTP with each FP8 half alone (issue 19's
# explanation rests on them: the fp8 KV cache alone was 12.33 effective with the old
# tensor-core decode, FP8 weights alone 15.19), then the bf16 defaults in the same call.
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
serve wfp8 --quantization fp8
serve bf16
