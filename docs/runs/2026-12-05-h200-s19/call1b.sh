# call 1b (nineteenth session, not run): W1 Llama-2-7B with the fp8 KV cache,
# MII_DECODE_ONE_QUERY=dot vs cores, alternated
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
for choice in dot cores dot cores; do
  n=1; while [ -e "$OUT/raw/w1_fp8kv_${choice}_$n.log" ]; do n=$((n+1)); done
  MII_DECODE_ONE_QUERY=$choice timeout 120 python3 benchmarks/throughput.py --kv-cache-dtype fp8 --json $OUT/raw/w1_fp8kv_${choice}_$n.json > $OUT/raw/w1_fp8kv_${choice}_$n.log 2>&1
  echo "w1 fp8kv $choice #$n $(grep -o '"seconds": [0-9.]*\|"x_compute_floor": [0-9.]*' $OUT/raw/w1_fp8kv_${choice}_$n.log | tr '\n' ' ')"; pack
done
