#!/usr/bin/env bash
# The project's test command (README): formatting, lints (also of the CUDA fast path, which compiles without a GPU),
# and every test on the CPU (flex backend).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
# The CUDA fast path (the library's, the CLI's, the GPU tests and benchmarks) is linted but never run here.
# Separate target dir: the `cuda` feature changes burn's features, and sharing the dir would rebuild burn twice.
CARGO_TARGET_DIR=target/cuda cargo clippy --locked --workspace --features cuda --all-targets -- -D warnings
cargo test --locked --workspace --all-targets
cargo test --locked --workspace --doc
cargo package --locked --workspace --exclude qwen-image-edit --no-verify --allow-dirty  # each library crate packages on its own
