#!/usr/bin/env bash
# The trained proxies' quality benchmark on the GPU host (bf16 activations, the CUDA fast path): `qwen-edit eval` in
# bf16, with --quantize fp8 (fast accumulation, the default) and with promoted FP8 sums (QWEN_FP8_FAST_ACCUM=0), the
# same edits and seeds in each; reports only (eval_<run>.json and logs under $OUT), no images. Compare them here with
# tools/proxy/compare_eval.py (docs/fp8.md, "The proxy benchmark on the GPU").
#
# The release qwen-edit of tools/bench/build_gpu.sh embeds no snapshots (a device call carries at most 64 MiB), so
# they travel compressed next to it; before the call, with the snapshots unparked:
#   tar -C crates/qwen-image-proxy/snapshots -cf - qwen-image-edit-proxy qwen-image-edit-plus-proxy | xz -T2 -6 \
#     > .dev/proxy_snapshots.tar.xz                                       # 27 MB
# then park, and carry .dev/bin/qwen-edit.xz, .dev/proxy_snapshots.tar.xz:
#   OUT=$OUT LIMIT=120 RUNS="bf16 fp8 fp8exact fp8attn" tools/proxy/gpu_eval.sh    # ≈ 30 s per run on an H100
set -u
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT" /tmp/snap
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
xz -dc .dev/proxy_snapshots.tar.xz | tar -C /tmp/snap -xf - || exit 1
xz -dc .dev/bin/qwen-edit.xz > /tmp/qwen-edit && chmod +x /tmp/qwen-edit || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/gpu.txt"
models="--edit-model /tmp/snap/qwen-image-edit-proxy --plus-model /tmp/snap/qwen-image-edit-plus-proxy"
for run in ${RUNS:-bf16 fp8 fp8exact}; do
  flags=() && export -n QWEN_FP8_FAST_ACCUM
  case $run in
    bf16) ;;
    fp8) flags=(--quantize fp8) ;;
    fp8exact) flags=(--quantize fp8) && export QWEN_FP8_FAST_ACCUM=0 ;;
    fp8attn) flags=(--quantize fp8 --fp8-attention) ;;  # the proxy's head dim 64 computes the host emulation
    *) echo "unknown run $run" >&2 && exit 2 ;;
  esac
  start=$(date +%s)
  timeout "${RUN_TIMEOUT:-170}" /tmp/qwen-edit eval $models --limit "${LIMIT:-120}" --schedules "${SCHEDULES:-none,cat}" \
    --device cuda --quiet "${flags[@]}" -o "/tmp/eval_$run" > "$OUT/eval_$run.log" 2>&1
  echo "$run exit $? after $(( $(date +%s) - start )) s"
  tail -6 "$OUT/eval_$run.log"
  cp "/tmp/eval_$run/eval_report.json" "$OUT/eval_$run.json" 2>/dev/null
done
