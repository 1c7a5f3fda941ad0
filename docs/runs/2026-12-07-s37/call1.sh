# Thirty-seventh session, call 1: short prompts beside long prefills (short_prompt_reserve,
# default a quarter of the token budget) against the reserve off, alternated, on whatever card
# came. FastGen's workload over HTTP at 16 offered (prompts ~N(2600): few fit the 1,024-token
# reserve; checks that nothing is lost), then a mix: half the requests chat turns ~N(128)
# among FastGen's long prompts, at 12 and 20 offered (TTFT of the short ones), Llama-2-7B.
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
  echo "[$SECONDS s] $tag rc=$?"; grep -E '^ +[0-9.]+ |prompts:' $OUT/raw/$tag.log | tail -n 8 | cut -c1-200; pack
}
fastgen="python3 benchmarks/serving.py --http --no-offline --num-requests 160 --rates 16"
mixed="python3 benchmarks/serving.py --http --no-offline --num-requests 160 --rates 12 20 --short-share 0.5 --short-mean 128"
step fastgen_default 110 $fastgen
step fastgen_off 110 $fastgen --short-prompt-reserve 0
step mixed_off 130 $mixed --short-prompt-reserve 0
step mixed_default 130 $mixed
step fastgen_default_2 110 $fastgen
step fastgen_off_2 110 $fastgen --short-prompt-reserve 0
