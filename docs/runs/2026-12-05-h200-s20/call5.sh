# call 5 (twentieth session): W1 Llama-2-7B bf16 defaults vs FP8 weights + the fp8 KV
# cache, alternated (the second and third samples of call 1's pair)
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
for n in 2 3; do for tag in bf16_defaults fp8w_fp8kv; do
  opts=""; [ $tag = fp8w_fp8kv ] && opts="--quantization fp8 --kv-cache-dtype fp8"
  timeout 60 python3 benchmarks/throughput.py $opts --json $OUT/raw/${tag}_$n.json > $OUT/raw/${tag}_$n.log 2>&1
  echo "${tag}_$n $(grep -o '"seconds": [0-9.]*\|"x_compute_floor": [0-9.]*' $OUT/raw/${tag}_$n.log | tr '\n' ' ')"; pack
done; done
