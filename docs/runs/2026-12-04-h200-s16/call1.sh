# call 1 (sixteenth session): MII_GQA_DECODE_QUERIES=pack on the GPU: correctness, kernel sweep, W1 Llama-3 A/B
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv > $OUT/gpu.txt
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k "grouped_query_decode_layouts" 2>&1 | tail -3
MII_GQA_DECODE_QUERIES=pack timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "matches_hf_on_gpu" 2>&1 | tail -3
timeout 150 python3 benchmarks/decode_sweep.py --gqa-only --json $OUT/decode_gqa.json > $OUT/decode_gqa.log 2>&1; grep "GQA\| x " $OUT/decode_gqa.log | cut -c1-300 | head -30
timeout 90 python3 benchmarks/mixed_attention.py --json $OUT/mixed_attention.json > $OUT/mixed_attention.log 2>&1; tail -8 $OUT/mixed_attention.log | cut -c1-300
for spec in tile pack; do
  MII_GQA_DECODE_QUERIES=$spec timeout 100 python3 benchmarks/throughput.py --model llama3-8b --json $OUT/w1_l3_$spec.json > $OUT/w1_l3_$spec.log 2>&1
  echo "w1 llama3 $spec $(grep -o '"seconds": [0-9.]*\|"x_compute_floor": [0-9.]*' $OUT/w1_l3_$spec.log | tr '\n' ' ')"
done
cd $OUT && tar czf /tmp/call.tgz . && mv /tmp/call.tgz .
