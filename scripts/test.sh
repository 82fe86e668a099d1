#!/usr/bin/env bash
# The project's test command (README): formatting, lints (also of the CUDA fast path, which compiles without a GPU),
# the API docs' links, and every test on the CPU (flex backend).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
# The CUDA fast path (the library's, the CLI's, the GPU tests and benchmarks) is linted but never run here.
# Separate target dir: the `cuda` feature changes burn's features, and sharing the dir would rebuild burn twice.
CARGO_TARGET_DIR=target/cuda cargo clippy --locked --workspace --features cuda --all-targets -- -D warnings
# The API docs: every intra-doc link resolves (library crates and the CLI's help texts alike).
RUSTDOCFLAGS="-D warnings" cargo doc --locked --workspace --no-deps
cargo test --locked --workspace --all-targets
cargo test --locked --workspace --doc
# `qwen-edit serve` as clients see it (the binary the tests built): Python/curl clients, bad requests, a 200-request
# load test, SIGTERM under load, two servers behind HAProxy (skipped without haproxy unless SERVE_TEST_REQUIRE_LB=1).
MAX_OVERHEAD_MS=25 ./tests/serve/run.sh target/debug/qwen-edit  # a debug build: the 5 ms target is for release builds
cargo package --locked --workspace --exclude qwen-image-edit --no-verify --allow-dirty  # each library crate packages on its own
