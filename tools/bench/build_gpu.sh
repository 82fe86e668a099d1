#!/usr/bin/env bash
# Builds the CUDA binaries the GPU host runs (it has no Rust toolchain) and packs them, stripped and xz-compressed,
# into .dev/bin/ (git-ignored; carry `.dev/bin` to the GPU host, where tools/bench/gpu_run.sh unpacks them).
#
#   tools/bench/build_gpu.sh            # gpu_fast_ops, gpu_fp8, gpu_models, gpu_region, dit_bench, pipeline_bench, qwen-edit
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=target/cuda
# Without the proxy snapshots (24 MB of bf16 weights in every binary that links qwen-image-proxy): the GPU runs use
# random full-size weights, and a device call carries at most 64 MiB, of which the checkout itself takes ~43 MB.
export QWEN_IMAGE_PROXY_SNAPSHOTS=/nonexistent-no-proxy-snapshots
cargo build --release --features cuda --test gpu_fast_ops --test gpu_fp8 --test gpu_models --test gpu_region --bench dit_bench --bench pipeline_bench
cargo build --release --features cuda -p qwen-edit-cli --bin qwen-edit
mkdir -p .dev/bin
newest() { ls -t "$CARGO_TARGET_DIR"/release/deps/"$1"-* | grep -v '\.d$' | head -1; }
for name in gpu_fast_ops gpu_fp8 gpu_models gpu_region dit_bench pipeline_bench; do cp "$(newest $name)" ".dev/$name"; done
cp "$CARGO_TARGET_DIR/release/qwen-edit" .dev/qwen-edit
for name in gpu_fast_ops gpu_fp8 gpu_models gpu_region dit_bench pipeline_bench qwen-edit; do
  strip ".dev/$name" 2>/dev/null || true
  xz -T0 -3 -c ".dev/$name" > ".dev/bin/$name.xz"
done
# The GPU tests find their fixtures through the checkout path they were built in (CARGO_MANIFEST_DIR); gpu_run.sh
# links that path to the carried tree when it differs.
pwd > .dev/bin/BUILD_ROOT
ls -la .dev/bin
