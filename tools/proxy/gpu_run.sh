#!/bin/bash
# The GPU run that made the committed snapshots (tools/proxy/README.md). From a checkout root with tools/proxy (or a
# copy in $PROXY) and, where diffusers is missing, the wheels of diffusers 0.42.1 + importlib_metadata + zipp in
# $PROXY/whl. $OUT receives the snapshots (a .tar.gz split in 15 MB parts), the logs and the console output.
#   PROXY=tools/proxy OUT=/tmp/out [SMOKE=0] bash tools/proxy/gpu_run.sh [VAE seconds] [DiT seconds] [train.py flags]
set -o pipefail
START=$(date +%s)
PROXY=${PROXY:-tools/proxy}
OUT=${OUT:-/tmp/proxy_out_files}
WORK=${WORK:-/tmp/proxy_work}
RES=${RES:-/tmp/proxy_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $PROXY/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "${SMOKE:-1}" = 1 ]; then  # every code path for a few steps first (~100 s): stops the call if anything is broken
  python3 $PROXY/train.py --work /tmp/smoke_work --out /tmp/smoke_out --smoke 2>&1 | grep -v -i warn > "$OUT/smoke.log"
  if ! grep -q "failed runs: none" "$OUT/smoke.log" || grep -q "checks failed" "$OUT/smoke.log" \
     || grep -q "validation failed" /tmp/smoke_out/logs/*.log; then
    echo "smoke failed"; tail -n 30 "$OUT/smoke.log"; for f in /tmp/smoke_out/logs/*.log; do tail -n 20 $f; done; exit 1
  fi
  echo "smoke ok after $(( $(date +%s) - START ))s"
fi
# Training stops by START + CALL_SECONDS - EXPORT_SECONDS whatever the step counts say, so that the export and the
# packing below finish inside a device call's hard limit (600 s) even when set-up took longer than planned (the v3
# call: the loop ended 22 s before --stop-by, export + checks + packing took 13 s).
STOP_BY=$(( START + ${CALL_SECONDS:-590} - ${EXPORT_SECONDS:-50} ))
python3 $PROXY/train.py --work $WORK --out $RES --vae-time ${1:-65} --dit-time ${2:-120} --stop-by $STOP_BY "${@:3}" 2>&1 \
  | grep -v -i warn | tee "$OUT/train.log" | grep -E "vae|edit|plus|export|snapshot|check|done|Error|error|Trace" | tail -n 60
tar -czf "$OUT/logs.tar.gz" -C $RES logs
tar -czf /tmp/snapshots.tar.gz -C $RES qwen-image-edit-proxy qwen-image-edit-plus-proxy 2>/dev/null
split -b 15M /tmp/snapshots.tar.gz "$OUT/snapshots.tar.gz.part-"
ls -la "$OUT"; echo "total $(( $(date +%s) - START ))s"
