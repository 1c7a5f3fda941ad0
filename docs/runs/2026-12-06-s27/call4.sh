# Twenty-seventh session, call 4: MII_PROMPT_ATTENTION=library with bounded cuDNN plans
# (TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1, set by the library path; operands sequence-major):
# 1. plans.py: 12 serving-like chunk shapes in a fresh process, first and second call, with and
#    without the bounded plans, and the output against float32; 2. the GPU tests of the path;
# 3. the 32k prompt end to end, library (first repeat = a fresh process's plans) vs Triton.
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
cat $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
for bounded in 1 0; do
  TORCH_CUDNN_SDPA_AVOID_RECOMPILE=$bounded timeout 120 python3 docs/runs/2026-12-06-s27/plans.py > $OUT/raw/plans_$bounded.log 2>&1
  echo "[$SECONDS s] plans bounded=$bounded"; cat $OUT/raw/plans_$bounded.log | grep -v Warning | tail -15; pack
done
MII_PROMPT_ATTENTION=library timeout 100 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_library_attention.py > $OUT/raw/test_library_attention.log 2>&1
echo "[$SECONDS s] test_library_attention: $(tail -n 1 $OUT/raw/test_library_attention.log)"; pack
long() {
  [ $SECONDS -gt 470 ] && { echo "[$SECONDS s] stop before $1"; return; }
  MII_PROMPT_ATTENTION=$2 timeout 110 python3 benchmarks/long_context.py --repeats 2 --json $OUT/raw/$1.json > $OUT/raw/$1.log 2>&1
  echo "[$SECONDS s] $1 $(grep -o '"ttft_s": [0-9.]*\|"ttft_floor_s": [0-9.]*\|"ttft_over_floor": [0-9.]*\|"decode_tok_s": [0-9.]*' $OUT/raw/$1.log | tr '\n' ' ')"; grep -i "repeat\|ttft" $OUT/raw/$1.log | grep -v '"' | head -4; pack
}
long long_library library
long long_triton triton
