# Twenty-fifth session, call 1 (for an H200): the batch-1 CUDA-core default (MII_GEMV_ONE_ROW=cores,
# launches by weight shape) against the tensor-core launches, same call, alternated per model:
# 1. the cores tests on this card; 2. batch 1 end to end, Llama-2-7B and Llama-3-8B, FP8 and bf16;
# 3. decode at a 32k context (Llama-3-8B shape). Seconds since start on every line.
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
cat $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_triton_gemv_cores.py > $OUT/raw/tests_cores.log 2>&1
echo "[$SECONDS s] cores tests: $(tail -n 1 $OUT/raw/tests_cores.log)"; pack
lat() {  # tag, MII_GEMV_ONE_ROW, latency.py options
  local tag=$1 choice=$2; shift 2
  MII_GEMV_ONE_ROW=$choice timeout 90 python3 benchmarks/latency.py "$@" --json $OUT/raw/$tag.json > $OUT/raw/$tag.log 2>&1
  echo "[$SECONDS s] $tag $(grep -o '"decode_tok_s": [0-9.]*' $OUT/raw/$tag.log) $(grep -o '"fraction_of_bandwidth_floor": [0-9.]*' $OUT/raw/$tag.log)"; pack
}
for model in llama2-7b llama3-8b; do
  for q in fp8 bf16; do
    opts="--model $model"; [ $q = fp8 ] && opts="$opts --quantization fp8"
    lat ${model}_${q}_cores cores $opts
    lat ${model}_${q}_tensor tensor $opts
  done
done
long() {
  MII_GEMV_ONE_ROW=$2 timeout 110 python3 benchmarks/long_context.py --json $OUT/raw/$1.json > $OUT/raw/$1.log 2>&1
  echo "[$SECONDS s] $1 $(grep -o '"decode_tok_s": [0-9.]*\|"decode_fraction_of_floor": [0-9.]*\|"ttft_s": [0-9.]*' $OUT/raw/$1.log | tr '\n' ' ')"; pack
}
long long_cores cores
long long_tensor tensor
# 4. prompt attention against flash and cuDNN SDPA (is a library kernel worth running the
# 32k prompt's chunks through on this card?)
timeout 90 python3 benchmarks/attention_peers.py --json $OUT/raw/attention_peers.json > $OUT/raw/attention_peers.log 2>&1
echo "[$SECONDS s] attention peers:"; cat $OUT/raw/attention_peers.log | cut -c1-400; pack
