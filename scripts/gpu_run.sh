#!/usr/bin/env bash
# One device-machine call: GPU tests, then benchmarks; logs and JSON go to $OUT.
#   bash scripts/gpu_run.sh [tests] [latency] [throughput N] [w1] [w1-sweep] [prefix-cache] [structured] [structured-sync] [serving] [serving-budget B S] [serving-http] [serving-http-with VAR=VALUE] [serving-http-opts "ARGS"] [serving-opts "ARGS"] [breakdown-serving-opts "ARGS"] [tp2-latency] [tp2-w1] [tp2-tests]
#   fp8 weights (issue 20): [latency-fp8w] [w1-fp8w] [gemv-fp8] [gemv-fp8-sweep] [moe-fp8] [latency-70b-fp8w] [w1-70b-fp8w] [tests-fp8] [tests-fp8-all] [gemv-gated] [gemv-gated-fp8] [latency-llama3-fp8w] [gemv-fp8-sweep-llama3]
#   Mixtral-8x7B shape: [latency-mixtral] [w1-mixtral] [latency-mixtral-fp8w] [w1-mixtral-fp8w] [moe-routing] [latency-mixtral-fused-routing]
#     [moe-grouped-mm] [w1-mixtral-grouped-mm] (torch._grouped_mm for large passes, MII_MOE_PROMPT_GEMM)
#     [moe-down-sweep] (the down projection's own tiles at decode sizes)
#   batch-1 decode attention: [decode-long] [decode-batch1] [decode-step] [tests-attention];
#   one switch set, A/B: [w1-with VAR=VALUE] [w1-llama3-with VAR=VALUE] [latency-with VAR=VALUE] [latency-fp8w-with VAR=VALUE] [latency-mixtral-with VAR=VALUE] [latency-mixtral-fp8w-with VAR=VALUE] [latency-llama3-with VAR=VALUE]; kernel times: [profile] [profile-nopdl] [profile-nopdl-fp8]
#   W1 pass by pass: [breakdown] [breakdown-llama3]; a mixed pass's attention launch by launch: [mixed-attention]
#   (every mode: see the case list below; logs and JSON land in $OUT, default /tmp/out)
# (tp2-*: a 2-GPU machine; NCCL's NVLink multicast stays off as the device tool asks)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# FastGen's serving workload (DESIGN.md "Benchmarks"), engine defaults; rates around
# the H200's saturation; ~4 min per serving mode (deployment, 4 rates, offline maximum).
SERVING="--prompt-mean 2600 --gen-mean 60 --rates 8 12 16 20 --num-requests 160"
GPU_TESTS_A="tests/test_triton_kernels.py tests/test_triton_gemv.py tests/test_triton_gemv_gated.py tests/test_triton_moe.py tests/test_moe_grouped_mm.py tests/test_fused_elementwise.py tests/test_transfer.py tests/test_fp8_kv_cache.py"
GPU_TESTS_B="tests/test_pdl.py tests/test_gpu.py tests/test_grammar_mask.py tests/test_fp8_gpu.py tests/test_fp8_kernels_gpu.py tests/test_triton_gemv_fp8.py tests/test_triton_moe_fp8.py tests/test_fp8_activations.py"
serving_report() { grep -q '^serving ' "$1" && sed -n '/^serving /,$p' "$1" || tail -30 "$1"; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
while [ $# -gt 0 ]; do
  case "$1" in
    # Every test file with GPU cases (the others run on CI's CPU machine). The whole list needs more
    # than one 10-minute device call: tests-a and tests-b are its two halves, one call each.
    tests) python3 -m pytest -q -p no:cacheprovider $GPU_TESTS_A $GPU_TESTS_B 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    tests-a) python3 -m pytest -q -p no:cacheprovider $GPU_TESTS_A 2>&1 | tee "$OUT/gpu_tests_a.log" | tail -25 ;;
    tests-b) python3 -m pytest -q -p no:cacheprovider $GPU_TESTS_B 2>&1 | tee "$OUT/gpu_tests_b.log" | tail -25 ;;
    tests-attention) python3 -m pytest -q -p no:cacheprovider tests/test_pdl.py tests/test_triton_kernels.py tests/test_triton_gemv.py tests/test_fp8_kv_cache.py tests/test_fp8_activations.py tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests_attention.log" | tail -25 ;;
    # One switch set for one batch-1 run (A/B): latency-with MII_SPLIT_KV_MERGE=kernel;
    # latency-fp8w-with VAR=VALUE: the same with FP8 weights. One summary line each.
    latency-with|latency-fp8w-with|latency-mixtral-with|latency-mixtral-fp8w-with|latency-llama3-with) mode=$1; shift
      tag=$(echo "${mode#latency-}_$1" | tr 'A-Z=-' 'a-z__'); extra=""
      base=$tag; n=1; while [ -e "$OUT/$tag.log" ]; do n=$((n + 1)); tag="${base}_run$n"; done  # a repeat keeps its own files
      case "$mode" in *mixtral*) extra="--model mixtral-8x7b" ;; *llama3*) extra="--model llama3-8b" ;; esac
      case "$mode" in *fp8w*) extra="$extra --quantization fp8" ;; esac
      env "$1" python3 benchmarks/latency.py $extra --json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1
      echo "$tag $(grep -o '"decode_tok_s": [0-9.]*' "$OUT/$tag.log") $(grep -o '"fraction_of_bandwidth_floor": [0-9.]*' "$OUT/$tag.log")" ;;
    # W1 with one switch set (A/B, no HF peer): w1-with MII_GQA_DECODE_QUERIES=pack; w1-llama3-with ...
    w1-with|w1-llama3-with) mode=$1; shift
      tag=$(echo "${mode%-with}_$1" | tr 'A-Z=-' 'a-z__'); extra=""
      base=$tag; n=1; while [ -e "$OUT/$tag.log" ]; do n=$((n + 1)); tag="${base}_run$n"; done
      case "$mode" in w1-llama3-with) extra="--model llama3-8b" ;; esac
      env "$1" python3 benchmarks/throughput.py $extra --json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1
      echo "$tag $(grep -o '"seconds": [0-9.]*' "$OUT/$tag.log") $(grep -o '"x_compute_floor": [0-9.]*' "$OUT/$tag.log")" ;;
    latency) python3 benchmarks/latency.py --hf --json "$OUT/latency.json" > "$OUT/latency.log" 2>&1; tail -40 "$OUT/latency.log" ;;
    throughput) shift; python3 benchmarks/throughput.py --num-requests "$1" --json "$OUT/throughput_$1.json" > "$OUT/throughput_$1.log" 2>&1; tail -40 "$OUT/throughput_$1.log" ;;
    kernels) python3 benchmarks/kernel_times.py --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1; tail -60 "$OUT/kernels.log" ;;
    profile) python3 benchmarks/profile_passes.py > "$OUT/profile.log" 2>&1; grep -A20 "^===" "$OUT/profile.log" | cut -c1-100 ;;
    # PDL off: kernels no longer start early and wait inside, so their durations are their own
    profile-nopdl) MII_PDL=off python3 benchmarks/profile_passes.py > "$OUT/profile_nopdl.log" 2>&1; grep -A20 "^===" "$OUT/profile_nopdl.log" | cut -c1-100 ;;
    profile-nopdl-fp8) MII_PDL=off python3 benchmarks/profile_passes.py --quantization fp8 > "$OUT/profile_nopdl_fp8.log" 2>&1; grep -A20 "^===" "$OUT/profile_nopdl_fp8.log" | cut -c1-100 ;;
    breakdown-llama3) python3 benchmarks/pass_breakdown.py --model llama3-8b --records "$OUT/passes_llama3.json" > "$OUT/breakdown_llama3.log" 2>&1; grep -v "^-\+" "$OUT/breakdown_llama3.log" | cut -c1-160 | tail -120 ;;
    latency-compile) python3 benchmarks/latency.py --compile --json "$OUT/latency_compile.json" > "$OUT/latency_compile.log" 2>&1; tail -30 "$OUT/latency_compile.log" ;;
    throughput-compile) shift; python3 benchmarks/throughput.py --compile --num-requests "$1" --json "$OUT/throughput_compile_$1.json" > "$OUT/throughput_compile_$1.log" 2>&1; tail -30 "$OUT/throughput_compile_$1.log" ;;
    serving) python3 benchmarks/serving.py $SERVING --json "$OUT/serving.json" > "$OUT/serving.log" 2>&1; serving_report "$OUT/serving.log" ;;
    # One switch set for the HTTP serving run (A/B): serving-http-with MII_ATTENTION_EARLY_LOADS=off
    serving-http-with) shift; tag=$(echo "serving_http_$1" | tr 'A-Z=-' 'a-z__')
      env "$1" python3 benchmarks/serving.py $SERVING --http --json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1; serving_report "$OUT/$tag.log" ;;
    # Serving with options past the defaults: serving-http-opts "--kv-cache-dtype fp8 --quantization fp8"
    # (serving-opts: over gRPC; breakdown-serving-opts: the same requests pass by pass).
    # ARGS split into words without globbing; a repeat keeps its own files (_runN).
    serving-http-opts|serving-opts|breakdown-serving-opts) mode=$1; shift
      read -ra extra <<< "$1"
      tag=$(echo "${mode%-opts}_$1" | tr -c 'A-Za-z0-9_\n' '_' | tr 'A-Z' 'a-z' | tr -s _ | sed 's/_$//')
      base=$tag; n=1; while [ -e "$OUT/$tag.log" ]; do n=$((n + 1)); tag="${base}_run$n"; done
      case "$mode" in
        serving-http-opts) python3 benchmarks/serving.py $SERVING "${extra[@]}" --http --json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1; serving_report "$OUT/$tag.log" ;;
        serving-opts) python3 benchmarks/serving.py $SERVING "${extra[@]}" --json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1; serving_report "$OUT/$tag.log" ;;
        *) python3 benchmarks/pass_breakdown.py --num-requests 160 --input-range 1820 3380 --output-len 60 --profile-passes 3 --records "$OUT/passes_$tag.json" "${extra[@]}" > "$OUT/$tag.log" 2>&1 || tail -30 "$OUT/$tag.log"
           grep -v "^-\+" "$OUT/$tag.log" | cut -c1-160 | grep -A14 "^=== profile\|ms_per_pass\|device_busy" | head -60 ;;
      esac ;;
    serving-http) python3 benchmarks/serving.py $SERVING --http --json "$OUT/serving_http.json" > "$OUT/serving_http.log" 2>&1; serving_report "$OUT/serving_http.log" ;;
    latency-sync) python3 benchmarks/latency.py --sync-scheduling --json "$OUT/latency_sync.json" > "$OUT/latency_sync.log" 2>&1; tail -30 "$OUT/latency_sync.log" ;;
    w1-sync) python3 benchmarks/throughput.py --sync-scheduling --json "$OUT/w1_sync.json" > "$OUT/w1_sync.log" 2>&1; tail -30 "$OUT/w1_sync.log" ;;
    tp2-latency) torchrun --standalone --nproc-per-node 2 benchmarks/latency.py --tensor-parallel 2 --json "$OUT/latency_tp2.json" > "$OUT/latency_tp2.log" 2>&1; tail -30 "$OUT/latency_tp2.log" ;;
    tp2-w1) torchrun --standalone --nproc-per-node 2 benchmarks/throughput.py --tensor-parallel 2 --json "$OUT/w1_tp2.json" > "$OUT/w1_tp2.log" 2>&1; tail -30 "$OUT/w1_tp2.log" ;;
    tp2-tests) python3 -m pytest -q -p no:cacheprovider tests/test_tensor_parallel.py 2>&1 | tee "$OUT/tp_tests.log" | tail -25 ;;
    breakdown) python3 benchmarks/pass_breakdown.py > "$OUT/breakdown.log" 2>&1; grep -v "^-\+" "$OUT/breakdown.log" | cut -c1-160 | tail -120 ;;
    breakdown-serving) python3 benchmarks/pass_breakdown.py --num-requests 160 --input-range 1820 3380 --output-len 60 --profile-passes 3 --records "$OUT/passes_serving.json" > "$OUT/breakdown_serving.log" 2>&1; grep -v "^-\+" "$OUT/breakdown_serving.log" | cut -c1-160 | tail -90 ;;
    breakdown-fp8) python3 benchmarks/pass_breakdown.py --kv-cache-dtype fp8 --profile-passes 0 --records "$OUT/passes_fp8.json" > "$OUT/breakdown_fp8.log" 2>&1; grep -v "^-\+" "$OUT/breakdown_fp8.log" | cut -c1-160 | tail -120 ;;
    mixed-attention) python3 benchmarks/mixed_attention.py --json "$OUT/mixed_attention.json" > "$OUT/mixed_attention.log" 2>&1; tail -12 "$OUT/mixed_attention.log" ;;
    decode-sweep) python3 benchmarks/decode_sweep.py --json "$OUT/decode_sweep.json" > "$OUT/decode_sweep.log" 2>&1; grep " x \|batch 1\|GQA" "$OUT/decode_sweep.log" ;;
    decode-long) python3 benchmarks/decode_sweep.py --long-context --json "$OUT/decode_long.json" > "$OUT/decode_long.log" 2>&1; grep "long context" "$OUT/decode_long.log" | cut -c1-400 || tail -20 "$OUT/decode_long.log" ;;
    decode-step) python3 benchmarks/decode_sweep.py --batch1-step --json "$OUT/decode_step.json" > "$OUT/decode_step.log" 2>&1; grep "batch1 step" "$OUT/decode_step.log" | cut -c1-420 || tail -20 "$OUT/decode_step.log" ;;
    decode-batch1) python3 benchmarks/decode_sweep.py --batch1-launch --json "$OUT/decode_batch1.json" > "$OUT/decode_batch1.log" 2>&1; grep "batch1 launch" "$OUT/decode_batch1.log" | cut -c1-420 || tail -20 "$OUT/decode_batch1.log" ;;
    gemv-sweep) python3 benchmarks/gemv_sweep.py --rows 1 16 64 128 256 --json "$OUT/gemv_sweep.json" > "$OUT/gemv_sweep.log" 2>&1; grep "M=" "$OUT/gemv_sweep.log" ;;
    latency-nopdl) MII_PDL=off python3 benchmarks/latency.py --json "$OUT/latency_nopdl.json" > "$OUT/latency_nopdl.log" 2>&1; tail -12 "$OUT/latency_nopdl.log" ;;
    latency-cublas) MII_GEMV=torch python3 benchmarks/latency.py --json "$OUT/latency_cublas.json" > "$OUT/latency_cublas.log" 2>&1; tail -12 "$OUT/latency_cublas.log" ;;
    w1-fp8-4096) python3 benchmarks/throughput.py --kv-cache-dtype fp8 --token-budget 4096 --json "$OUT/w1_fp8_4096.json" > "$OUT/w1_fp8_4096.log" 2>&1; tail -14 "$OUT/w1_fp8_4096.log" ;;
    latency-llama3) python3 benchmarks/latency.py --model llama3-8b --hf --json "$OUT/latency_llama3.json" > "$OUT/latency_llama3.log" 2>&1; tail -20 "$OUT/latency_llama3.log" ;;
    w1-llama3) python3 benchmarks/throughput.py --model llama3-8b --hf --json "$OUT/w1_llama3.json" > "$OUT/w1_llama3.log" 2>&1; tail -20 "$OUT/w1_llama3.log" ;;
    w1-fp8) python3 benchmarks/throughput.py --kv-cache-dtype fp8 --json "$OUT/w1_fp8.json" > "$OUT/w1_fp8.log" 2>&1; tail -30 "$OUT/w1_fp8.log" ;;
    latency-fp8) python3 benchmarks/latency.py --kv-cache-dtype fp8 --json "$OUT/latency_fp8.json" > "$OUT/latency_fp8.log" 2>&1; tail -30 "$OUT/latency_fp8.log" ;;
    w1-sweep) for cfg in 1024:128 2048:256 4096:256 8192:512; do b=${cfg%:*}; s=${cfg#*:}
        python3 benchmarks/throughput.py --token-budget $b --max-num-seqs $s --json "$OUT/w1_${b}_${s}.json" > "$OUT/w1_${b}_${s}.log" 2>&1
        echo "== budget $b seqs $s"; tail -6 "$OUT/w1_${b}_${s}.log"; done ;;
    serving-budget) shift; b=$1; shift; python3 benchmarks/serving.py $SERVING --token-budget $b --max-num-seqs $1 --no-offline --json "$OUT/serving_$b.json" > "$OUT/serving_$b.log" 2>&1; serving_report "$OUT/serving_$b.log" ;;
    structured) python3 benchmarks/structured.py --json "$OUT/structured.json" > "$OUT/structured.log" 2>&1; grep -E "^(compile|constrained|unconstrained|throughput_overhead_pct) " "$OUT/structured.log" || tail -20 "$OUT/structured.log" ;;
    structured-sync) python3 benchmarks/structured.py --sync-scheduling --json "$OUT/structured_sync.json" > "$OUT/structured_sync.log" 2>&1; grep -E "^(compile|constrained|unconstrained|throughput_overhead_pct) " "$OUT/structured_sync.log" || tail -20 "$OUT/structured_sync.log" ;;
    long-context) python3 benchmarks/long_context.py --hf --json "$OUT/long_context.json" > "$OUT/long_context.log" 2>&1; tail -45 "$OUT/long_context.log" ;;
    prefill-sweep) python3 benchmarks/prefill_sweep.py --json "$OUT/prefill_sweep.json" > "$OUT/prefill_sweep.log" 2>&1; grep -v '^{"case' "$OUT/prefill_sweep.log" | tail -12 ;;
    w1-nohf) python3 benchmarks/throughput.py --json "$OUT/w1.json" > "$OUT/w1.log" 2>&1; tail -14 "$OUT/w1.log" ;;
    latency-nohf) python3 benchmarks/latency.py --json "$OUT/latency.json" > "$OUT/latency.log" 2>&1; tail -14 "$OUT/latency.log" ;;
    prefix-cache) python3 benchmarks/prefix_cache.py --json "$OUT/prefix_cache.json" > "$OUT/prefix_cache.log" 2>&1; tail -12 "$OUT/prefix_cache.log" ;;
    latency-fp8w) python3 benchmarks/latency.py --quantization fp8 --json "$OUT/latency_fp8w.json" > "$OUT/latency_fp8w.log" 2>&1; tail -30 "$OUT/latency_fp8w.log" ;;
    w1-fp8w) python3 benchmarks/throughput.py --quantization fp8 --json "$OUT/w1_fp8w.json" > "$OUT/w1_fp8w.log" 2>&1; tail -30 "$OUT/w1_fp8w.log" ;;
    gemv-fp8) python3 benchmarks/gemv_sweep.py --fp8 --rows 1 4 16 64 --json "$OUT/gemv_fp8.json" > "$OUT/gemv_fp8.log" 2>&1; grep "M=" "$OUT/gemv_fp8.log" || tail -30 "$OUT/gemv_fp8.log" ;;
    gemv-fp8-sweep) python3 benchmarks/gemv_sweep.py --fp8 --fp8-sweep --rows 1 16 --json "$OUT/gemv_fp8_sweep.json" > "$OUT/gemv_fp8_sweep.log" 2>&1; grep "M=" "$OUT/gemv_fp8_sweep.log" || tail -30 "$OUT/gemv_fp8_sweep.log" ;;
    moe-routing) python3 benchmarks/moe_fp8.py --no-sweep --routing --json "$OUT/moe_routing.json" > "$OUT/moe_routing.log" 2>&1; grep "^tokens" "$OUT/moe_routing.log" || tail -30 "$OUT/moe_routing.log" ;;
    latency-mixtral-fused-routing) MII_MOE_ROUTING=fused python3 benchmarks/latency.py --model mixtral-8x7b --json "$OUT/latency_mixtral_fr.json" > "$OUT/latency_mixtral_fr.log" 2>&1; tail -12 "$OUT/latency_mixtral_fr.log" ;;
    moe-down-sweep) python3 benchmarks/moe_fp8.py --no-sweep --down-sweep --tokens 1 16 128 --json "$OUT/moe_down.json" > "$OUT/moe_down.log" 2>&1; grep "^tokens" "$OUT/moe_down.log" || tail -30 "$OUT/moe_down.log" ;;
    moe-grouped-mm) python3 benchmarks/moe_fp8.py --no-sweep --grouped-mm --tokens 16 128 1024 4096 --json "$OUT/moe_grouped_mm.json" > "$OUT/moe_grouped_mm.log" 2>&1; grep "^tokens" "$OUT/moe_grouped_mm.log" || tail -30 "$OUT/moe_grouped_mm.log" ;;
    w1-mixtral-grouped-mm) MII_MOE_PROMPT_GEMM=grouped_mm python3 benchmarks/throughput.py --model mixtral-8x7b --num-requests 128 --json "$OUT/w1_mixtral_gmm.json" > "$OUT/w1_mixtral_gmm.log" 2>&1; tail -14 "$OUT/w1_mixtral_gmm.log" ;;
    moe-fp8-decode) python3 benchmarks/moe_fp8.py --tokens 1 16 --bf16-sweep --json "$OUT/moe_fp8_decode.json" > "$OUT/moe_fp8_decode.log" 2>&1; grep "^tokens" "$OUT/moe_fp8_decode.log" || tail -30 "$OUT/moe_fp8_decode.log" ;;
    moe-fp8) python3 benchmarks/moe_fp8.py --bf16-sweep --json "$OUT/moe_fp8.json" > "$OUT/moe_fp8.log" 2>&1; grep "^tokens" "$OUT/moe_fp8.log" || tail -30 "$OUT/moe_fp8.log" ;;
    latency-70b-fp8w) python3 benchmarks/latency.py --model llama3-70b --quantization fp8 --json "$OUT/latency_70b_fp8w.json" > "$OUT/latency_70b_fp8w.log" 2>&1; tail -30 "$OUT/latency_70b_fp8w.log" ;;
    w1-70b-fp8w) python3 benchmarks/throughput.py --model llama3-70b --quantization fp8 --json "$OUT/w1_70b_fp8w.json" > "$OUT/w1_70b_fp8w.log" 2>&1; tail -30 "$OUT/w1_70b_fp8w.log" ;;
    # The float8 test files and test_fp8_activations: what "tests" leaves for a second call.
    tests-fp8-all) python3 -m pytest -q -p no:cacheprovider tests/test_fp8_gpu.py tests/test_fp8_kernels_gpu.py tests/test_triton_gemv_fp8.py tests/test_triton_moe_fp8.py tests/test_fp8_activations.py 2>&1 | tee "$OUT/fp8_all_tests.log" | tail -25 ;;
    gemv-gated) python3 benchmarks/gemv_gated.py --json "$OUT/gemv_gated.json" > "$OUT/gemv_gated.log" 2>&1; grep "M=" "$OUT/gemv_gated.log" || tail -30 "$OUT/gemv_gated.log" ;;
    gemv-gated-fp8) python3 benchmarks/gemv_gated.py --fp8-only --rows 1 16 --shapes llama2-7b llama3-8b llama3-70b --json "$OUT/gemv_gated_fp8.json" > "$OUT/gemv_gated_fp8.log" 2>&1; grep "M=" "$OUT/gemv_gated_fp8.log" || tail -30 "$OUT/gemv_gated_fp8.log" ;;
    latency-llama3-fp8w) python3 benchmarks/latency.py --model llama3-8b --quantization fp8 --json "$OUT/latency_llama3_fp8w.json" > "$OUT/latency_llama3_fp8w.log" 2>&1; tail -14 "$OUT/latency_llama3_fp8w.log" ;;
    gemv-fp8-sweep-llama3) python3 benchmarks/gemv_sweep.py --fp8 --fp8-sweep --rows 1 --model llama3-8b --json "$OUT/gemv_fp8_sweep_llama3.json" > "$OUT/gemv_fp8_sweep_llama3.log" 2>&1; grep "M=" "$OUT/gemv_fp8_sweep_llama3.log" || tail -30 "$OUT/gemv_fp8_sweep_llama3.log" ;;
    tests-fp8) python3 -m pytest -q -p no:cacheprovider tests/test_fp8_gpu.py tests/test_fp8_kernels_gpu.py tests/test_triton_gemv_fp8.py tests/test_triton_moe_fp8.py 2>&1 | tee "$OUT/fp8_tests.log" | tail -25 ;;
    # Mixtral-8x7B shape (issue 20): batch 1 and the 128-request W1 workload, bf16 and fp8 weights.
    latency-mixtral) python3 benchmarks/latency.py --model mixtral-8x7b --json "$OUT/latency_mixtral.json" > "$OUT/latency_mixtral.log" 2>&1; tail -30 "$OUT/latency_mixtral.log" ;;
    w1-mixtral) python3 benchmarks/throughput.py --model mixtral-8x7b --num-requests 128 --json "$OUT/w1_mixtral.json" > "$OUT/w1_mixtral.log" 2>&1; tail -30 "$OUT/w1_mixtral.log" ;;
    latency-mixtral-fp8w) python3 benchmarks/latency.py --model mixtral-8x7b --quantization fp8 --json "$OUT/latency_mixtral_fp8w.json" > "$OUT/latency_mixtral_fp8w.log" 2>&1; tail -30 "$OUT/latency_mixtral_fp8w.log" ;;
    w1-mixtral-fp8w) python3 benchmarks/throughput.py --model mixtral-8x7b --quantization fp8 --num-requests 128 --json "$OUT/w1_mixtral_fp8w.json" > "$OUT/w1_mixtral_fp8w.log" 2>&1; tail -30 "$OUT/w1_mixtral_fp8w.log" ;;
    w1) python3 benchmarks/throughput.py --hf --json "$OUT/w1.json" > "$OUT/w1.log" 2>&1; tail -40 "$OUT/w1.log" ;;
  esac
  shift
done
