# Twenty-fourth session, call 1: batch 1 on the CUDA cores (GemvConfig.cores, MII_GEMV_ONE_ROW).
# 1. the new kernel's tests on CUDA; 2. batch 1 end to end, the first-guess CORES_CONFIG
# against the production launches, alternated (FP8 weights: cores-fp8 vs tensor; bf16: cores
# vs tensor); 3. gemv_cores_sweep (Llama-2-7B projections, 1 row) for the launch to keep.
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
cat $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_triton_gemv_cores.py > $OUT/raw/tests_cores.log 2>&1; tail -n 2 $OUT/raw/tests_cores.log; pack
lat() {  # tag, MII_GEMV_ONE_ROW, latency.py options
  local tag=$1 choice=$2; shift 2
  MII_GEMV_ONE_ROW=$choice timeout 100 python3 benchmarks/latency.py "$@" --json $OUT/raw/$tag.json > $OUT/raw/$tag.log 2>&1
  echo "$tag $(grep -o '"decode_tok_s": [0-9.]*' $OUT/raw/$tag.log) $(grep -o '"fraction_of_bandwidth_floor": [0-9.]*' $OUT/raw/$tag.log)"; pack
}
lat fp8_tensor_1 tensor --quantization fp8
lat fp8_cores_1 cores-fp8 --quantization fp8
lat fp8_tensor_2 tensor --quantization fp8
lat fp8_cores_2 cores-fp8 --quantization fp8
lat bf16_tensor_1 tensor
lat bf16_cores_1 cores
timeout 300 python3 benchmarks/gemv_cores_sweep.py --json $OUT/raw/cores_sweep.json > $OUT/raw/cores_sweep.log 2>&1
grep "M=1" $OUT/raw/cores_sweep.log | cut -c1-250; tail -n 3 $OUT/raw/cores_sweep.log | cut -c1-300; pack
