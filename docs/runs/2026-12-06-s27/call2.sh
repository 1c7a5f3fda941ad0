# Twenty-seventh session, call 2 (meant for an H200; an H100 answers the same question for itself):
# 1. benchmarks/gemv_cores_sweep.py, Llama-2-7B then Llama-3-8B (the CUDA-core one-row launches were
#    swept on an H100 only); 2. batch 1 end to end with the engine's launches vs the sweep's best per
#    weight (swept_cores.py), alternated: Llama-2-7B bf16, then as time allows Llama-3-8B bf16, FP8.
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
cat $OUT/raw/gpu.txt
# (any card: on an H100 it answers the same question for that card)
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
for model in llama2-7b llama3-8b; do
  timeout 170 python3 benchmarks/gemv_cores_sweep.py --model $model --json $OUT/raw/sweep_$model.json > $OUT/raw/sweep_$model.log 2>&1
  echo "[$SECONDS s] sweep $model"; grep "M=1" $OUT/raw/sweep_$model.log | cut -c1-300; pack
done
SWEEPS="$OUT/raw/sweep_llama2-7b.json $OUT/raw/sweep_llama3-8b.json"
lat() {  # tag, engine|swept, latency.py options
  local tag=$1 arm=$2; shift 2
  [ $SECONDS -gt 530 ] && { echo "[$SECONDS s] stop before $tag"; return; }
  if [ $arm = swept ]; then
    timeout 60 python3 docs/runs/2026-12-06-s27/swept_cores.py $SWEEPS -- benchmarks/latency.py --repeats 2 "$@" --json $OUT/raw/$tag.json > $OUT/raw/$tag.log 2>&1
  else
    timeout 60 python3 benchmarks/latency.py --repeats 2 "$@" --json $OUT/raw/$tag.json > $OUT/raw/$tag.log 2>&1
  fi
  echo "[$SECONDS s] $tag $(grep -o '"decode_tok_s": [0-9.]*' $OUT/raw/$tag.log | tail -1) $(grep -o '"fraction_of_bandwidth_floor": [0-9.]*' $OUT/raw/$tag.log | tail -1)"; pack
}
lat bf16_engine_1 engine
lat bf16_swept_1 swept
lat bf16_engine_2 engine
lat bf16_swept_2 swept
lat llama3_bf16_swept swept --model llama3-8b
lat llama3_bf16_engine engine --model llama3-8b
lat fp8_swept swept --quantization fp8
lat fp8_engine engine --quantization fp8
