# Thirty-eighth session, call 1: short_prompt_reserve in the long-context mix it was built for
# (the thirty-seventh session measured only FastGen-length prompts, read in a pass or two).
# Llama-3-8B shape with its 131k window, HTTP: a quarter of the requests are documents ~N(32000)
# tokens, three quarters chat turns ~N(128), generation ~N(60), 48 requests at 1.2 offered,
# reserve default (1,024 of the 4,096 budget) vs 0 (FCFS), alternated twice.
# On an H200 first the batch-1 measurement still owed there (docs/runs/2026-12-07-s32/call5.sh).
export OUT
nvidia-smi --query-gpu=name --format=csv,noheader | tee /tmp/gpu.txt
if grep -q H200 /tmp/gpu.txt; then
  bash docs/runs/2026-12-07-s32/call5.sh > $OUT/call5.log 2>&1
  mkdir -p $OUT/call5 && mv $OUT/call.tgz $OUT/call5/ 2>/dev/null
  tail -8 $OUT/call5.log
fi
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
step() {  # tag, seconds, command...
  local tag=$1 limit=$2; shift 2
  [ $((SECONDS + limit)) -gt 575 ] && { echo "[$SECONDS s] stop before $tag"; return; }
  timeout $limit "$@" --json $OUT/raw/$tag.json > $OUT/raw/$tag.log 2>&1
  echo "[$SECONDS s] $tag rc=$?"; grep -E '^\[serving\] +[0-9.]+ |prompts:|deployment up' $OUT/raw/$tag.log | tail -n 4 | cut -c1-200; pack
}
mixed="python3 benchmarks/serving.py --http --no-offline --model llama3-8b-131k --prompt-mean 32000 --gen-mean 60 --short-share 0.75 --short-mean 128 --num-requests 48 --rates 1.2 --warmup 4"
step long_default_1 130 $mixed
step long_off_1 130 $mixed --short-prompt-reserve 0
step long_default_2 130 $mixed
step long_off_2 130 $mixed --short-prompt-reserve 0
