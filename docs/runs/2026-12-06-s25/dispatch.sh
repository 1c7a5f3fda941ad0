# On an H200: call 1 (the batch-1 A/B there); on an H100 (the A/B ran on one last session): call 2.
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  bash docs/runs/2026-12-06-s25/call1.sh
else
  bash docs/runs/2026-12-06-s25/call2.sh
fi
