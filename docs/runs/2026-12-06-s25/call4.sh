# Twenty-fifth session, call 4: 1. MII_PROMPT_ATTENTION=library (long prompt chunks through
# cuDNN's SDPA) on the GPU: its tests, and the one-row fp8_activations tests call 2 failed
# (reference fixed); 2. the 32k prompt (Llama-3-8B shape) with the library vs the Triton
# prompt kernel, alternated.
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name --format=csv,noheader
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_library_attention.py "tests/test_fp8_activations.py::test_at_one_row_no_copy_is_made_and_no_launch_quantizes" > $OUT/raw/tests.log 2>&1
echo "[$SECONDS s] tests: $(tail -n 1 $OUT/raw/tests.log)"; grep -E "^(FAILED|ERROR|E )" $OUT/raw/tests.log | head -20; pack
long() {
  MII_PROMPT_ATTENTION=$2 timeout 100 python3 benchmarks/long_context.py --repeats 2 --json $OUT/raw/$1.json > $OUT/raw/$1.log 2>&1
  echo "[$SECONDS s] $1 $(grep -o '"ttft_s": [0-9.]*\|"ttft_over_floor": [0-9.]*\|"decode_tok_s": [0-9.]*' $OUT/raw/$1.log | tr '\n' ' ')"; pack
}
long long_library library
long long_triton triton
long long_library_2 library
