# call 2 (sixteenth session): MII_ATTENTION_IDS_AHEAD and the pack launches: GPU tests, GQA sweep off/on, W1 Llama-3 A/B
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k "trip_ahead" 2>&1 | tail -2
for ahead in off on; do
  MII_ATTENTION_IDS_AHEAD=$ahead timeout 100 python3 benchmarks/decode_sweep.py --gqa-only --json $OUT/raw/decode_gqa_$ahead.json > $OUT/raw/decode_gqa_$ahead.log 2>&1
  echo "== sweep ids ahead $ahead"; grep "GQA" $OUT/raw/decode_gqa_$ahead.log | python3 -c "
import sys,ast
for l in sys.stdin:
    h,_,d=l.partition(': {'); d=ast.literal_eval('{'+d)
    print(h, {k[:-3]:v for k,v in d.items() if k.startswith('pack4') and k.endswith('_us')})"
done
for run in "tile off" "pack on" "tile on" "pack off" "pack on"; do
  read -r q a <<< "$run"; n=1; while [ -e "$OUT/raw/w1_l3_${q}_$a$n.log" ]; do n=$((n+1)); done
  MII_GQA_DECODE_QUERIES=$q MII_ATTENTION_IDS_AHEAD=$a timeout 100 python3 benchmarks/throughput.py --model llama3-8b --json $OUT/raw/w1_l3_${q}_$a$n.json > $OUT/raw/w1_l3_${q}_$a$n.log 2>&1
  echo "w1 llama3 queries=$q ahead=$a #$n $(grep -o '"seconds": [0-9.]*\|"x_compute_floor": [0-9.]*\|"matmul_bf16_tflops": [0-9.]*' $OUT/raw/w1_l3_${q}_$a$n.log | tr '\n' ' ')"
  (cd $OUT/raw && tar czf ../call.tgz .)
done
