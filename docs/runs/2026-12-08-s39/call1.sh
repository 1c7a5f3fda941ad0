# Thirty-ninth session, call 1 (599 s of device time left): the owed long-context mix of
# docs/runs/2026-12-07-s38/call1.sh cut to one alternation (default reserve, then 0), on any card,
# without the H200-only batch-1 part.
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
step() {  # tag, seconds, command...
  local tag=$1 limit=$2; shift 2
  [ $((SECONDS + limit)) -gt 420 ] && { echo "[$SECONDS s] stop before $tag"; return; }
  timeout $limit "$@" --json $OUT/raw/$tag.json > $OUT/raw/$tag.log 2>&1
  echo "[$SECONDS s] $tag rc=$?"; grep -E '^\[serving\] +[0-9.]+ |prompts:|deployment up' $OUT/raw/$tag.log | tail -n 4 | cut -c1-200; pack
}
mixed="python3 benchmarks/serving.py --http --no-offline --model llama3-8b-131k --prompt-mean 32000 --gen-mean 60 --short-share 0.75 --short-mean 128 --num-requests 48 --rates 1.2 --warmup 4"
step long_default_1 130 $mixed
step long_off_1 130 $mixed --short-prompt-reserve 0
