# Twenty-fourth session, call 2: CORES_CONFIG now 8 x 1024 on 4 warps (call 1's sweep).
# 1. batch 1 end to end, MII_GEMV_ONE_ROW cores vs tensor alternated: Llama-2-7B FP8 and bf16,
# Llama-3-8B bf16 and FP8; 2. GPU tests with the cores launch on (models through it);
# 3. gemv_cores_sweep over a wider space (4-32 row bands, up to 4096-column slices, PDL
# prefetch depth), Llama-2-7B then Llama-3-8B.
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
cat $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
lat() {  # tag, MII_GEMV_ONE_ROW, latency.py options
  local tag=$1 choice=$2; shift 2
  MII_GEMV_ONE_ROW=$choice timeout 100 python3 benchmarks/latency.py "$@" --json $OUT/raw/$tag.json > $OUT/raw/$tag.log 2>&1
  echo "$tag $(grep -o '"decode_tok_s": [0-9.]*' $OUT/raw/$tag.log) $(grep -o '"fraction_of_bandwidth_floor": [0-9.]*' $OUT/raw/$tag.log)"; pack
}
lat fp8_cores_1 cores --quantization fp8
lat fp8_tensor_1 tensor --quantization fp8
lat fp8_cores_2 cores --quantization fp8
lat fp8_tensor_2 tensor --quantization fp8
lat bf16_cores_1 cores
lat bf16_tensor_1 tensor
lat bf16_cores_2 cores
lat bf16_tensor_2 tensor
lat llama3_bf16_cores cores --model llama3-8b
lat llama3_bf16_tensor tensor --model llama3-8b
lat llama3_fp8_cores cores --model llama3-8b --quantization fp8
lat llama3_fp8_tensor tensor --model llama3-8b --quantization fp8
MII_GEMV_ONE_ROW=cores timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_gemv_cores.py tests/test_triton_gemv_gated.py tests/test_fp8_gpu.py tests/test_triton_gemv_fp8.py > $OUT/raw/tests_cores_on.log 2>&1; tail -n 3 $OUT/raw/tests_cores_on.log; pack
timeout 120 python3 benchmarks/gemv_cores_sweep.py --json $OUT/raw/cores_sweep2.json > $OUT/raw/cores_sweep2.log 2>&1
grep "M=1" $OUT/raw/cores_sweep2.log | cut -c1-250; pack
timeout 100 python3 benchmarks/gemv_cores_sweep.py --model llama3-8b --json $OUT/raw/cores_sweep2_llama3.json > $OUT/raw/cores_sweep2_llama3.log 2>&1
grep "M=1" $OUT/raw/cores_sweep2_llama3.log | cut -c1-250; pack
