# Twenty-eighth session, call 2 (an H200 only; elsewhere it stops at once): the twenty-seventh
# session's call 3 on an H200: 16-bit o / down on 4-row bands of 2,048 columns
# (BF16_CORES_FEW_BANDS_CONFIG, the default since 22d6a1f) vs 8-row bands of 1,024 (before,
# docs/runs/2026-12-06-s27/old_cores.py), batch 1 end to end, alternated; the GPU tests of the
# launch; the Llama-2-7B one-row sweep (never run on an H200).
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
cat $OUT/raw/gpu.txt
grep -q H200 $OUT/raw/gpu.txt || { echo "not an H200: stop"; exit 0; }
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
lat() {  # tag, new|old, latency.py options
  local tag=$1 arm=$2; shift 2
  [ $SECONDS -gt 530 ] && { echo "[$SECONDS s] stop before $tag"; return; }
  if [ $arm = old ]; then
    timeout 60 python3 docs/runs/2026-12-06-s27/old_cores.py benchmarks/latency.py --repeats 2 "$@" --json $OUT/raw/$tag.json > $OUT/raw/$tag.log 2>&1
  else
    timeout 60 python3 benchmarks/latency.py --repeats 2 "$@" --json $OUT/raw/$tag.json > $OUT/raw/$tag.log 2>&1
  fi
  echo "[$SECONDS s] $tag $(grep -o '"decode_tok_s": [0-9.]*' $OUT/raw/$tag.log | tail -1) $(grep -o '"fraction_of_bandwidth_floor": [0-9.]*' $OUT/raw/$tag.log | tail -1)"; pack
}
lat bf16_new_1 new
lat bf16_old_1 old
lat bf16_new_2 new
lat bf16_old_2 old
lat llama3_bf16_old old --model llama3-8b
lat llama3_bf16_new new --model llama3-8b
timeout 100 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_triton_gemv_cores.py > $OUT/raw/test_triton_gemv_cores.log 2>&1
echo "[$SECONDS s] test_triton_gemv_cores: $(tail -n 1 $OUT/raw/test_triton_gemv_cores.log)"; pack
if grep -q H200 $OUT/raw/gpu.txt; then
  timeout 170 python3 benchmarks/gemv_cores_sweep.py --json $OUT/raw/sweep_llama2-7b.json > $OUT/raw/sweep_llama2-7b.log 2>&1
  echo "[$SECONDS s] sweep llama2-7b"; grep "M=1" $OUT/raw/sweep_llama2-7b.log | cut -c1-300; pack
fi
