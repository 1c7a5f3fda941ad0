# Twenty-fourth session, call 5: does the CUDA-core launch (one row per program, the band's
# other rows from L2) also beat the tensor-core launches at 2 and 4 rows? (CORES_MAX_ROWS = 1.)
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
timeout 280 python3 benchmarks/gemv_cores_sweep.py --rows 2 4 --json $OUT/raw/cores_rows.json > $OUT/raw/cores_rows.log 2>&1
grep "M=" $OUT/raw/cores_rows.log | cut -c1-250; tail -n 2 $OUT/raw/cores_rows.log | cut -c1-200; pack
