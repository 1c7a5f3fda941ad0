# Twenty-sixth session, call 1: MII_PROMPT_ATTENTION=library without the KV-head repeat (4402c61)
# against the Triton prompt kernel: 1. the 32k prompt end to end (Llama-3-8B shape), alternated;
# 2. the attention op on the last 4,096-query chunk of a 32k prompt (opbench.py), alternated.
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
long long_library_1 library
long long_triton_1 triton
long long_library_2 library
long long_triton_2 triton
timeout 90 python3 docs/runs/2026-12-06-s25/opbench.py > $OUT/raw/opbench.log 2>&1
echo "[$SECONDS s] opbench:"; cat $OUT/raw/opbench.log | tail -12; pack
