#!/usr/bin/env bash
# Temporary (not committed): online serving A/B, old tree 8e1a3ba vs HEAD, one call.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ARGS="--prompt-mean 2600 --gen-mean 60 --rates 16 20 --num-requests 160 --no-offline --http"
ROOT=$PWD
run() { # tag tree [VAR=VALUE]
  local tag=$1 tree=$2; shift 2
  local t0=$(date +%s)
  (cd "$tree" && env PYTHONPATH=/tmp/site:$tree/src:$tree "$@" python3 benchmarks/serving.py $ARGS > "$OUT/$tag.log" 2>&1)
  echo "== $tag $(( $(date +%s) - t0 )) s"; grep -E "^ *(16|20)(\.0)? " "$OUT/$tag.log" | head; sed -n '/^serving /,$p' "$OUT/$tag.log" | head -20
}
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
for spec in "$@"; do
  case "$spec" in
    old*) run "$spec" "$ROOT/old_8e1a3ba" ;;
    new*) run "$spec" "$ROOT" ;;
    early_off*) run "$spec" "$ROOT" MII_ATTENTION_EARLY_LOADS=off ;;
    pdl_off*) run "$spec" "$ROOT" MII_PDL=off ;;
    oldpdl_off*) run "$spec" "$ROOT/old_8e1a3ba" MII_PDL=off ;;
  esac
done
