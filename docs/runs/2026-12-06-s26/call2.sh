# Twenty-sixth session, call 2: every test file with GPU cases (scripts/gpu_run.sh's `tests` list plus
# the CUDA-core GEMV and library-attention files), one file at a time so that a time limit cuts one file,
# not the record; seconds since start on every line.
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
for f in test_library_attention test_triton_gemv_cores test_fp8_activations test_triton_kernels test_triton_gemv \
  test_triton_gemv_gated test_triton_moe test_moe_grouped_mm test_fused_elementwise test_transfer test_fp8_kv_cache \
  test_pdl test_gpu test_grammar_mask test_fp8_gpu test_fp8_kernels_gpu test_triton_gemv_fp8 test_triton_moe_fp8; do
  [ $SECONDS -gt 540 ] && { echo "[$SECONDS s] stop before $f"; break; }
  timeout $((570 - SECONDS)) python3 -m pytest -q -p no:cacheprovider --tb=short tests/$f.py > $OUT/raw/$f.log 2>&1
  echo "[$SECONDS s] $f: $(tail -n 1 $OUT/raw/$f.log)"; grep -E "^(FAILED|ERROR)" $OUT/raw/$f.log | head -5; pack
done
