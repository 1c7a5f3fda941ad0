# Twenty-fourth session, call 3: MII_GEMV_ONE_ROW=cores now the default, with launches by
# weight shape (8-row bands where few, else 4-row bands; 2 warps for float8 weights).
# 1. batch 1 end to end, three arms alternated per model: the default (per shape), one
# launch for every weight (CORES_CONFIG, call 2's arm), the tensor-core launches;
# 2. the GPU test files of the kernels and models at the defaults.
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
cat $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
lat() {  # tag, MII_GEMV_ONE_ROW, uniform (1: CORES_CONFIG for every weight), latency.py options
  local tag=$1 choice=$2 uniform=$3; shift 3
  MII_GEMV_ONE_ROW=$choice timeout 100 python3 -c "
import runpy, sys
import mii.ops.triton_gemv_launch as launch
if sys.argv[1] == '1':
    launch.CORES_MANY_BANDS_CONFIG = launch.FP8_CORES_MANY_BANDS_CONFIG = launch.CORES_CONFIG
sys.argv = ['benchmarks/latency.py'] + sys.argv[2:]
runpy.run_path('benchmarks/latency.py', run_name='__main__')" $uniform "$@" --json $OUT/raw/$tag.json > $OUT/raw/$tag.log 2>&1
  echo "$tag $(grep -o '"decode_tok_s": [0-9.]*' $OUT/raw/$tag.log) $(grep -o '"fraction_of_bandwidth_floor": [0-9.]*' $OUT/raw/$tag.log)"; pack
}
for model in llama2-7b llama3-8b; do
  for q in fp8 bf16; do
    opts="--model $model"; [ $q = fp8 ] && opts="$opts --quantization fp8"
    lat ${model}_${q}_shape cores 0 $opts
    lat ${model}_${q}_uniform cores 1 $opts
    lat ${model}_${q}_tensor tensor 0 $opts
  done
done
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_triton_gemv_cores.py tests/test_triton_gemv.py tests/test_triton_gemv_gated.py tests/test_fp8_gpu.py tests/test_triton_gemv_fp8.py tests/test_fp8_activations.py tests/test_pdl.py > $OUT/raw/tests.log 2>&1; tail -n 3 $OUT/raw/tests.log; pack
