# call 4 (twentieth session): the nineteenth session's Inductor max-autotune GEMM sweep, Llama-3-8B
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
timeout 280 python3 benchmarks/gemm_sweep.py --mode inductor --models llama3-8b --rows 240 4096 --json $OUT/raw/gemm_inductor.json > $OUT/raw/gemm_inductor.log 2>&1; grep "^inductor\|Error" $OUT/raw/gemm_inductor.log | tail -12; pack
