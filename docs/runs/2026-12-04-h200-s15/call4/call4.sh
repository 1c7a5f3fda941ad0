# call 4: MII_ATTENTION_OVERLAP correctness on the GPU, then W1 (Llama-2-7B, Llama-3-8B) off vs streams
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k "second_stream or fused_rotary" 2>&1 | tail -3
MII_ATTENTION_OVERLAP=streams timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "matches_hf_on_gpu" 2>&1 | tail -3
for run in "llama3-8b off" "llama3-8b streams" "llama2-7b off" "llama2-7b streams" "llama3-8b off" "llama3-8b streams"; do
  read -r model spec <<< "$run"; {
    n=1; while [ -e "$OUT/w1_${model}_$spec$n.log" ]; do n=$((n+1)); done
    MII_ATTENTION_OVERLAP=$spec timeout 100 python3 benchmarks/throughput.py --model $model --json $OUT/w1_${model}_$spec$n.json > $OUT/w1_${model}_$spec$n.log 2>&1
    echo "$model $spec$n $(grep -o '"seconds": [0-9.]*\|"x_compute_floor": [0-9.]*' $OUT/w1_${model}_$spec$n.log | tr '\n' ' ')"
  }
done
cd $OUT && tar czf /tmp/call4.tgz . && mv /tmp/call4.tgz .
