#!/bin/bash
# The GPU run that made the committed snapshots (tools/proxy/README.md). From a checkout root with tools/proxy (or a
# copy in $PROXY) and, where diffusers is missing, the wheels of diffusers 0.42.1 + importlib_metadata + zipp in
# $PROXY/whl. $OUT receives the snapshots (a .tar.gz split in 15 MB parts), the logs and the console output.
#   PROXY=tools/proxy OUT=/tmp/out bash tools/proxy/gpu_run.sh [VAE seconds] [DiT seconds]
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
python3 $PROXY/train.py --work $WORK --out $RES --vae-time ${1:-65} --dit-time ${2:-120} 2>&1 \
  | grep -v -i warn | tee "$OUT/train.log" | grep -E "vae|edit|plus|export|snapshot|check|done|Error|error|Trace" | tail -n 60
tar -czf "$OUT/logs.tar.gz" -C $RES logs
tar -czf /tmp/snapshots.tar.gz -C $RES qwen-image-edit-proxy qwen-image-edit-plus-proxy 2>/dev/null
split -b 15M /tmp/snapshots.tar.gz "$OUT/snapshots.tar.gz.part-"
ls -la "$OUT"; echo "total $(( $(date +%s) - START ))s"
