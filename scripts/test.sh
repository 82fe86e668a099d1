#!/usr/bin/env bash
# The project's test command (README): formatting, lints, and every test on the CPU (flex backend).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo test --locked --workspace --all-targets
cargo test --locked --workspace --doc
cargo package --locked --workspace --exclude qwen-image-edit --no-verify --allow-dirty  # each library crate packages on its own
