# call 3: MII_ATTENTION_OVERLAP in one layer's mixed pass, then (if it wins) FastGen over HTTP
export OUT
timeout 200 bash scripts/gpu_run.sh mixed-attention > /dev/null
grep '^{' $OUT/mixed_attention.log | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l); r.pop('prompts', None); print(r)"
win=$(python3 -c "
import json; rows = json.load(open('$OUT/mixed_attention.json'))['rows']
r = [x for x in rows if x['case'] == 'serving-llama2'][0]
best = min(('streams', r['both_streams_us']), ('priority', r['both_priority_us']), key=lambda t: t[1])
print(best[0] if best[1] < 0.95 * r['both_us'] else '')")
echo "winner: '$win'"
if [ -n "$win" ]; then
  export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  ARGS="--prompt-mean 2600 --gen-mean 60 --rates 16 20 --num-requests 160 --no-offline --http"
  for spec in off $win; do
    n=1; while [ -e "$OUT/serving_$spec$n.log" ]; do n=$((n+1)); done
    t0=$(date +%s); MII_ATTENTION_OVERLAP=$spec timeout 170 python3 benchmarks/serving.py $ARGS --json $OUT/serving_$spec$n.json > $OUT/serving_$spec$n.log 2>&1
    echo "== $spec$n $(( $(date +%s) - t0 )) s"; sed -n '/^serving /,$p' $OUT/serving_$spec$n.log | head -8
  done
fi
cd $OUT && tar czf /tmp/call3.tgz . && mv /tmp/call3.tgz .
