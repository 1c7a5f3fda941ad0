# call 1 (eighteenth session): W1 Llama-3-8B decode passes kernel by kernel; the fp8 KV W1 breakdown;
# Llama-3-8B W1 at budget 8192/512 beside the defaults
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
timeout 200 python3 benchmarks/pass_breakdown.py --model llama3-8b --records $OUT/raw/passes_llama3.json > $OUT/raw/breakdown_llama3.log 2>&1
grep -A24 "=== profile of 5 decode" $OUT/raw/breakdown_llama3.log | tr -s " " | cut -c1-190; grep -A14 '"groups"' $OUT/raw/breakdown_llama3.log | tr -d ' \n'; echo; pack
for cfg in 4096:256 8192:512 4096:256 8192:512; do b=${cfg%:*}; s=${cfg#*:}
  n=1; while [ -e "$OUT/raw/w1_l3_${b}_${s}_$n.log" ]; do n=$((n+1)); done
  timeout 150 python3 benchmarks/throughput.py --model llama3-8b --token-budget $b --max-num-seqs $s --json $OUT/raw/w1_l3_${b}_${s}_$n.json > $OUT/raw/w1_l3_${b}_${s}_$n.log 2>&1
  echo "w1 l3 $b/$s #$n $(grep -o '"seconds": [0-9.]*\|"x_compute_floor": [0-9.]*' $OUT/raw/w1_l3_${b}_${s}_$n.log | tr '\n' ' ')"; pack
done
timeout 200 python3 benchmarks/pass_breakdown.py --kv-cache-dtype fp8 --records $OUT/raw/passes_fp8.json > $OUT/raw/breakdown_fp8.log 2>&1
grep -A24 "=== profile of 5 decode" $OUT/raw/breakdown_fp8.log | tr -s " " | cut -c1-190; grep -A14 '"groups"' $OUT/raw/breakdown_fp8.log | tr -d ' \n'; echo; pack
