# Thirty-second session, call 5 (a short budget left): the core of the twenty-eighth session's call 2
# on an H200 only: batch 1 with 16-bit o / down on 4-row bands of 2,048 columns (the default since
# 22d6a1f) vs 8-row bands of 1,024 (docs/runs/2026-12-06-s27/old_cores.py), alternated, Llama-2-7B
# then Llama-3-8B shapes. Any other card stops at once.
export OUT
nvidia-smi --query-gpu=name --format=csv,noheader | tee /tmp/gpu.txt
grep -q H200 /tmp/gpu.txt || { echo "not an H200: stop"; exit 0; }
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
lat() {  # tag, new|old, latency.py options
  local tag=$1 arm=$2; shift 2
  [ $SECONDS -gt 220 ] && { echo "[$SECONDS s] stop before $tag"; return; }
  local run=benchmarks/latency.py
  [ $arm = old ] && run="docs/runs/2026-12-06-s27/old_cores.py benchmarks/latency.py"
  timeout 60 python3 $run --repeats 2 "$@" --json $OUT/raw/$tag.json > $OUT/raw/$tag.log 2>&1
  echo "[$SECONDS s] $tag $(grep -o '"decode_tok_s": [0-9.]*' $OUT/raw/$tag.log | tail -1) $(grep -o '"fraction_of_bandwidth_floor": [0-9.]*' $OUT/raw/$tag.log | tail -1)"; pack
}
lat bf16_new_1 new
lat bf16_old_1 old
lat bf16_new_2 new
lat bf16_old_2 old
lat llama3_bf16_old old --model llama3-8b
lat llama3_bf16_new new --model llama3-8b
