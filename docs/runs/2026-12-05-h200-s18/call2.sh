# call 2 (eighteenth session): is token budget 8192 / 512 sequences a better CUDA default?
# W1 (Llama-2-7B and Llama-3-8B shapes) and FastGen serving over HTTP at 16 and 20 offered, each beside the defaults.
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
for model in llama2-7b llama3-8b; do for cfg in 4096:256 8192:512; do b=${cfg%:*}; s=${cfg#*:}
  tag=w1_${model}_${b}_${s}
  timeout 120 python3 benchmarks/throughput.py --model $model --token-budget $b --max-num-seqs $s --json $OUT/raw/$tag.json > $OUT/raw/$tag.log 2>&1
  echo "$tag $(grep -o '"seconds": [0-9.]*\|"x_compute_floor": [0-9.]*' $OUT/raw/$tag.log | tr '\n' ' ')"; pack
done; done
for opts in "" "--token-budget 8192 --max-num-seqs 512"; do
  tag=serving_http_$(echo "x $opts" | tr -c 'a-z0-9\n' '_' | tr -s _)
  timeout 170 python3 benchmarks/serving.py --prompt-mean 2600 --gen-mean 60 --rates 16 20 --num-requests 160 --no-offline --http $opts --json $OUT/raw/$tag.json > $OUT/raw/$tag.log 2>&1
  echo "== $tag"; sed -n '/^serving /,$p' $OUT/raw/$tag.log | head -12; pack
done
