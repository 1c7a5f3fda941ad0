# call 3 (twentieth session; the nineteenth's call2.sh less Inductor, Llama-3-8B only, for the time left): the dense
# GEMMs at decode-pass rows, cuBLAS as the engine calls it vs TunableOp's cuBLAS /
# cuBLASLt candidates vs Inductor's max-autotune Triton templates (each in its own process)
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
timeout 120 python3 benchmarks/gemm_sweep.py --mode cublas --models llama3-8b --json $OUT/raw/gemm_cublas.json > $OUT/raw/gemm_cublas.log 2>&1; grep "M=  240\|M= 4096" $OUT/raw/gemm_cublas.log; pack
timeout 200 python3 benchmarks/gemm_sweep.py --mode tunableop --models llama3-8b --tunableop-file $OUT/raw/tunableop.csv --json $OUT/raw/gemm_tunableop.json > $OUT/raw/gemm_tunableop.log 2>&1; grep "M=  240\|M= 4096" $OUT/raw/gemm_tunableop.log; tail -3 $OUT/raw/gemm_tunableop.log; pack
