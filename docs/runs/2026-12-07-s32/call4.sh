# Thirty-second session, call 4: the twenty-eighth session's call 2 (the few-band one-row launch A/B,
# never run on an H200) on an H200 only; any other card stops at once (its GPU tests ran in calls 1, 3).
export OUT
nvidia-smi --query-gpu=name --format=csv,noheader | tee /tmp/gpu.txt
grep -q H200 /tmp/gpu.txt || { echo "not an H200: stop"; exit 0; }
bash docs/runs/2026-12-06-s28/call2.sh
