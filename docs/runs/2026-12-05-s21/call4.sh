# Twenty-first session: the fp8-KV one-head decode default's GPU tests on the H200, and
# this session's HTTP / engine tests under the device's Python 3.12 + transformers 5.17.
export OUT
bash scripts/gpu_run.sh > /dev/null  # installs the wheels
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/raw
pack() { (cd $OUT/raw && tar czf ../call.tgz .); }
timeout 260 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_kv_cache.py > $OUT/raw/tests_fp8kv.log 2>&1; tail -n 2 $OUT/raw/tests_fp8kv.log; pack
timeout 200 python3 -m pytest -q -p no:cacheprovider -x tests/test_gateway.py tests/test_admission.py tests/test_fastapi_example.py tests/test_magic.py > $OUT/raw/tests_http.log 2>&1; tail -n 2 $OUT/raw/tests_http.log; pack
