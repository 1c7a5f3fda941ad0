# Thirty-second session, call 3: on an H200 the twenty-eighth session's call 2 (the few-band one-row
# launch A/B, never run on an H200); on any other card the second half of the GPU test list (call 1
# ran the first half on an H100).
export OUT
nvidia-smi --query-gpu=name --format=csv,noheader | tee /tmp/gpu.txt
if grep -q H200 /tmp/gpu.txt; then
  bash docs/runs/2026-12-06-s28/call2.sh
else
  bash docs/runs/2026-12-06-s30/call.sh b
fi
