# Thirty-second session, call 2 (after docs/runs/2026-12-06-s30/call.sh first, on the same machine):
# the engine defaults at HEAD on whatever card came, as users get them, to check that the product
# work since the last H200 record (twenty-sixth session) cost nothing: batch 1 (Llama-2-7B), the 32k
# prompt (Llama-3-8B shape), W1 (Llama-2-7B), FastGen serving over HTTP at 16 req/s offered (bf16
# defaults) with the offline maximum. Seconds since start on every line; a time limit cuts one step.
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
cat $OUT/raw/gpu.txt; git log -1 --format=%h > $OUT/raw/commit.txt 2>/dev/null
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
step() {  # tag, seconds, command...
  local tag=$1 limit=$2; shift 2
  [ $((SECONDS + limit)) -gt 585 ] && { echo "[$SECONDS s] stop before $tag"; return; }
  timeout $limit "$@" --json $OUT/raw/$tag.json > $OUT/raw/$tag.log 2>&1
  echo "[$SECONDS s] $tag rc=$?"; grep -v '^{"case' $OUT/raw/$tag.log | tail -n 6 | cut -c1-400; pack
}
step latency 70 python3 benchmarks/latency.py --repeats 2
step long_context 110 python3 benchmarks/long_context.py --repeats 2
step w1 120 python3 benchmarks/throughput.py
step serving_http 240 python3 benchmarks/serving.py --rates 16 --num-requests 160 --http
