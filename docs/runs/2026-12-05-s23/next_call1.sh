# Prepared in the twenty-third session for an H200: is the narrow unsplit launch (16 keys / 2
# warps), 6-12 % faster in the H200's sweep at 233 x 760 and 64 x 2,600 keys, faster end to end
# there? 1. decode_sweep --one-query-counts (where narrow starts to win on the H200);
# 2. W1 with the fp8 cache, narrow from that threshold vs wide (the default), alternated.
# (On an H100 calls 3-5 found it a wash: keep the default there.)
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.draw,power.limit --format=csv > $OUT/raw/gpu.txt
cat $OUT/raw/gpu.txt
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
timeout 120 python3 benchmarks/decode_sweep.py --one-query-counts --json $OUT/raw/counts.json > $OUT/raw/counts.log 2>&1
grep "programs/SM" $OUT/raw/counts.log; pack
# the lowest programs per SM from which narrow is no slower at every larger count
PER_SM=$(python3 -c "
import json, torch
rows = json.load(open('$OUT/raw/counts.json'))['one_query_counts']
sms = torch.cuda.get_device_properties(0).multi_processor_count
ok = [r['narrow_us'] <= r['wide_us'] for r in rows]
first = next((i for i in range(len(rows)) if all(ok[i:])), len(rows) - 1)
print(int(rows[first]['seqs'] * 32 // sms))")
echo "threshold per SM: $PER_SM"
w1() {  # tag, programs per SM from which narrow, throughput.py options
  local tag=$1 per_sm=$2; shift 2
  MII_ONE_QUERY_UNSPLIT_LAUNCH=narrow timeout 90 python3 -c "
import runpy, sys
import mii.ops.triton_attention as attention
attention.ONE_QUERY_NARROW_MIN_PER_SM = float(sys.argv[1])
sys.argv = ['benchmarks/throughput.py'] + sys.argv[2:]
runpy.run_path('benchmarks/throughput.py', run_name='__main__')" $per_sm "$@" --json $OUT/raw/$tag.json > $OUT/raw/$tag.log 2>&1
  echo "$tag $(grep -o '"seconds": [0-9.]*\|"x_compute_floor": [0-9.]*' $OUT/raw/$tag.log | tr '\n' ' ')"; pack
}
w1 fp8kv_narrow_${PER_SM}_1 $PER_SM --kv-cache-dtype fp8
w1 fp8kv_wide_1 1e9 --kv-cache-dtype fp8
w1 fp8kv_narrow_${PER_SM}_2 $PER_SM --kv-cache-dtype fp8
w1 fp8kv_wide_2 1e9 --kv-cache-dtype fp8
