# Thirty-seventh session, call 3: the chat/long mix again after the review's fixes (fe8f00d: the first
# long prompt waiting keeps a slot, shorts take at most half of what decodes leave, whole) and with
# the prompt classes following the draw (call 1's "short" row held ~5 % FastGen prompts under 1,364
# tokens). Half chat turns ~N(128), half FastGen prompts ~N(2600), 20 offered, reserve default
# (1,024) vs 0, alternated twice, Llama-2-7B, HTTP.
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
cat $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
step() {  # tag, seconds, command...
  local tag=$1 limit=$2; shift 2
  [ $((SECONDS + limit)) -gt 470 ] && { echo "[$SECONDS s] stop before $tag"; return; }
  timeout $limit "$@" --json $OUT/raw/$tag.json > $OUT/raw/$tag.log 2>&1
  echo "[$SECONDS s] $tag rc=$?"; grep -E '^ +[0-9.]+ |prompts:' $OUT/raw/$tag.log | tail -n 3 | cut -c1-200; pack
}
mixed="python3 benchmarks/serving.py --http --no-offline --num-requests 160 --rates 20 --short-share 0.5 --short-mean 128"
step mixed_default_1 100 $mixed
step mixed_off_1 100 $mixed --short-prompt-reserve 0
step mixed_default_2 100 $mixed
step mixed_off_2 100 $mixed --short-prompt-reserve 0
