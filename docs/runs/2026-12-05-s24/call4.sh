# Twenty-fourth session, call 4: the batch-1 CUDA-core default (MII_GEMV_ONE_ROW=cores) against
# the tensor-core launches where batch 1 also reads other things: decode at a 32k context
# (Llama-3-8B shape, long_context.py) and the Mixtral-8x7B shape in FP8 (experts in the MoE
# kernel; attention projections and router in the skinny one).
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
long() {
  MII_GEMV_ONE_ROW=$2 timeout 120 python3 benchmarks/long_context.py --json $OUT/raw/$1.json > $OUT/raw/$1.log 2>&1
  echo "$1 $(grep -o '"decode_tok_s": [0-9.]*\|"decode_fraction_of_floor": [0-9.]*\|"ttft_s": [0-9.]*' $OUT/raw/$1.log | tr '\n' ' ')"; pack
}
mix() {
  MII_GEMV_ONE_ROW=$2 timeout 150 python3 benchmarks/latency.py --model mixtral-8x7b --quantization fp8 --json $OUT/raw/$1.json > $OUT/raw/$1.log 2>&1
  echo "$1 $(grep -o '"decode_tok_s": [0-9.]*' $OUT/raw/$1.log) $(grep -o '"fraction_of_bandwidth_floor": [0-9.]*' $OUT/raw/$1.log)"; pack
}
long long_cores cores
long long_tensor tensor
mix mixtral_fp8_cores cores
mix mixtral_fp8_tensor tensor
