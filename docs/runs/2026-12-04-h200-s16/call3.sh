# call 3 (sixteenth session): MII_GQA_DECODE_QUERIES pack (now the default) vs tile at batch 1 and at 32k context, Llama-3 shapes
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
for q in tile pack tile pack; do
  n=1; while [ -e "$OUT/raw/latency_l3_$q$n.log" ]; do n=$((n+1)); done
  MII_GQA_DECODE_QUERIES=$q timeout 80 python3 benchmarks/latency.py --model llama3-8b --json $OUT/raw/latency_l3_$q$n.json > $OUT/raw/latency_l3_$q$n.log 2>&1
  echo "latency llama3 $q #$n $(grep -o '"decode_tok_s": [0-9.]*\|"fraction_of_bandwidth_floor": [0-9.]*' $OUT/raw/latency_l3_$q$n.log | tr '\n' ' ')"
  (cd $OUT/raw && tar czf ../call.tgz .)
done
for q in pack tile; do
  MII_GQA_DECODE_QUERIES=$q timeout 120 python3 benchmarks/long_context.py --json $OUT/raw/long_$q.json > $OUT/raw/long_$q.log 2>&1
  echo "== long context $q"; tail -25 $OUT/raw/long_$q.log | grep -i "ttft\|tok_s\|floor\|fraction" | head -12
  (cd $OUT/raw && tar czf ../call.tgz .)
done
