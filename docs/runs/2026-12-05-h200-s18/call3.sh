# call 3 (eighteenth session): W1's decode pass attention at one length vs W1's spread of lengths (same keys), bf16 and fp8
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1
timeout 200 python3 benchmarks/decode_sweep.py --mixed-lengths --json $OUT/mixed_lengths.json 2>&1 | tee $OUT/mixed_lengths.log | tail -8
