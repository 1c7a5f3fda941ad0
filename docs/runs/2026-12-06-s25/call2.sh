# Twenty-fifth session, call 2: 1. the GPU test files of the kernels and models at the defaults
# (the one-row kernel's later edits: its own module, the fitted stage count, the block_m branch);
# 2. 2-4 rows in one CUDA-core program (GemvConfig.block_m, off: CORES_MAX_ROWS=1) vs the default
# tensor-core launches, latency.py --batch 2 / 4, FP8 and bf16, alternated; 3. the Mixtral-8x7B
# shape at batch 1 in bf16 (issue 20's 80 % target) with the new default vs tensor.
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
cat $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_triton_gemv_cores.py tests/test_triton_gemv.py tests/test_triton_gemv_gated.py tests/test_fp8_gpu.py tests/test_triton_gemv_fp8.py tests/test_fp8_activations.py tests/test_pdl.py > $OUT/raw/tests.log 2>&1
echo "[$SECONDS s] tests: $(tail -n 1 $OUT/raw/tests.log)"; grep -E "^(FAILED|ERROR)" $OUT/raw/tests.log | head; pack
lat() {  # tag, CORES_MAX_ROWS, latency.py options
  local tag=$1 rows=$2; shift 2
  timeout 60 python3 -c "
import runpy, sys
import mii.ops.triton_gemv_launch as launch
launch.CORES_MAX_ROWS = int(sys.argv[1])
sys.argv = ['benchmarks/latency.py'] + sys.argv[2:]
runpy.run_path('benchmarks/latency.py', run_name='__main__')" $rows "$@" --repeats 2 --json $OUT/raw/$tag.json > $OUT/raw/$tag.log 2>&1
  echo "[$SECONDS s] $tag $(grep -o '"decode_tok_s": [0-9.]*' $OUT/raw/$tag.log) $(grep -o '"fraction_of_bandwidth_floor": [0-9.]*' $OUT/raw/$tag.log)"; pack
}
for b in 2 4; do
  lat fp8_b${b}_cores 4 --batch $b --quantization fp8
  lat fp8_b${b}_default 1 --batch $b --quantization fp8
  lat bf16_b${b}_cores 4 --batch $b
  lat bf16_b${b}_default 1 --batch $b
done
mix() {
  MII_GEMV_ONE_ROW=$2 timeout 120 python3 benchmarks/latency.py --model mixtral-8x7b --repeats 2 --json $OUT/raw/$1.json > $OUT/raw/$1.log 2>&1
  echo "[$SECONDS s] $1 $(grep -o '"decode_tok_s": [0-9.]*' $OUT/raw/$1.log) $(grep -o '"fraction_of_bandwidth_floor": [0-9.]*' $OUT/raw/$1.log)"; pack
}
# the bf16 Mixtral shape (93 GB) fits an H200 only
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  mix mixtral_bf16_cores cores
  mix mixtral_bf16_tensor tensor
else
  timeout 90 python3 benchmarks/attention_peers.py --json $OUT/raw/attention_peers.json > $OUT/raw/attention_peers.log 2>&1
  echo "[$SECONDS s] attention peers:"; cut -c1-400 $OUT/raw/attention_peers.log; pack
fi
