# Twenty-seventh session, call 5 (an H200 only; elsewhere it stops at once): the 32k prompt with
# MII_PROMPT_ATTENTION=library (bounded cuDNN plans, 02da101) vs the Triton prompt kernel, as call 4
# on the H100; then the bounded-plans op check (plans.py, bounded=1).
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
cat $OUT/raw/gpu.txt
grep -q H200 $OUT/raw/gpu.txt || { echo "not an H200: stop"; exit 0; }
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
long() {
  MII_PROMPT_ATTENTION=$2 timeout 110 python3 benchmarks/long_context.py --repeats 2 --json $OUT/raw/$1.json > $OUT/raw/$1.log 2>&1
  echo "[$SECONDS s] $1 $(grep -o '"ttft_s": [0-9.]*\|"ttft_floor_s": [0-9.]*\|"ttft_over_floor": [0-9.]*\|"decode_tok_s": [0-9.]*' $OUT/raw/$1.log | tr '\n' ' ')"; pack
}
long long_library library
long long_triton triton
TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 timeout 60 python3 docs/runs/2026-12-06-s27/plans.py > $OUT/raw/plans_1.log 2>&1
echo "[$SECONDS s] plans"; grep -v Warning $OUT/raw/plans_1.log | tail -14; pack
