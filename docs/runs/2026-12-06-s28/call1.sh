# Twenty-eighth session, call 1: MII_PROMPT_ATTENTION=library (cuDNN for long prompt chunks, bounded
# plans) vs the Triton prompt kernel (the default): 1. the 32k prompt end to end (as the twenty-seventh
# session's call 4/5); 2. FastGen serving over HTTP with each, alternated (its ever-new chunk lengths are
# what the bounded plans are for); rates by card (H200 16 20, else 12 16), offline maximum each.
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
cat $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
long() {
  MII_PROMPT_ATTENTION=$2 timeout 110 python3 benchmarks/long_context.py --repeats 2 --json $OUT/raw/$1.json > $OUT/raw/$1.log 2>&1
  echo "[$SECONDS s] $1 $(grep -o '"ttft_s": [0-9.]*\|"ttft_floor_s": [0-9.]*\|"ttft_over_floor": [0-9.]*\|"decode_tok_s": [0-9.]*' $OUT/raw/$1.log | tr '\n' ' ')"; pack
}
RATES="12 16"; grep -q H200 $OUT/raw/gpu.txt && RATES="16 20"
serve() {
  [ $SECONDS -gt 400 ] && { echo "[$SECONDS s] stop before $1"; return; }
  MII_PROMPT_ATTENTION=$2 timeout 190 python3 benchmarks/serving.py --prompt-mean 2600 --gen-mean 60 --rates $RATES --num-requests 160 --http --json $OUT/raw/$1.json > $OUT/raw/$1.log 2>&1
  echo "[$SECONDS s] $1"; sed -n '/^serving /,$p' $OUT/raw/$1.log | head -20; pack
}
long long_library library
long long_triton triton
serve serving_library library
serve serving_triton triton
