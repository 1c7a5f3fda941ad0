# Twenty-fourth session, call 6: the CUDA-core launch with every row of a 2-4 row batch in one
# program (each weight converted once; GemvConfig.block_m 2 or 4, slices narrowed in proportion).
# 1. its tests on CUDA; 2. latency.py --batch 2 / 4 (per-request decode tok/s), CORES_MAX_ROWS
# raised to 4 vs the default (1: tensor-core launches past one row), alternated, FP8 and bf16;
# 3. gemv_cores_sweep --rows 2 as time allows.
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_triton_gemv_cores.py > $OUT/raw/tests_cores.log 2>&1; tail -n 1 $OUT/raw/tests_cores.log; pack
lat() {  # tag, CORES_MAX_ROWS, latency.py options
  local tag=$1 rows=$2; shift 2
  timeout 45 python3 -c "
import runpy, sys
import mii.ops.triton_gemv_launch as launch
launch.CORES_MAX_ROWS = int(sys.argv[1])
sys.argv = ['benchmarks/latency.py'] + sys.argv[2:]
runpy.run_path('benchmarks/latency.py', run_name='__main__')" $rows "$@" --repeats 2 --json $OUT/raw/$tag.json > $OUT/raw/$tag.log 2>&1
  echo "$tag $(grep -o '"decode_tok_s": [0-9.]*' $OUT/raw/$tag.log) $(grep -o '"fraction_of_bandwidth_floor": [0-9.]*' $OUT/raw/$tag.log)"; pack
}
for b in 2 4; do
  lat fp8_b${b}_cores 4 --batch $b --quantization fp8
  lat fp8_b${b}_default 1 --batch $b --quantization fp8
  lat bf16_b${b}_cores 4 --batch $b
  lat bf16_b${b}_default 1 --batch $b
done
timeout 110 python3 benchmarks/gemv_cores_sweep.py --rows 2 --json $OUT/raw/cores_rows2.json > $OUT/raw/cores_rows2.log 2>&1
grep "M=" $OUT/raw/cores_rows2.log | cut -c1-250; pack
