#!/usr/bin/env bash
# Sets everything up and runs the whole test suite: unit, property and
# integration tests, the QEMU end-to-end runs (real kernels under TCG), and
# the loom model of the ring protocol. Exits non-zero on the first failure.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
"$repo/scripts/setup.sh"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --quiet --workspace --all-targets -- -D warnings
echo "== cargo test --workspace"
cargo test --workspace
