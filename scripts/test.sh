#!/usr/bin/env bash
# Sets everything up and runs the whole test suite: formatting and lints,
# unit, property and integration tests, the end-to-end runs that boot real
# kernels under QEMU (TCG), and the loom model of the ring protocol.
# Exits non-zero on the first failure.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export MKCTL_CACHE=${MKCTL_CACHE:-$repo/.cache}
"$repo/scripts/setup.sh"
target=${CARGO_TARGET_DIR:-$repo/target}

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --quiet --workspace --all-targets -- -D warnings
echo "== cargo test --workspace"
cargo test --workspace
echo "== loom model of the ring's index protocol"
# A target dir of its own: --cfg loom changes every crate's build.
CARGO_TARGET_DIR="$target/loom" RUSTFLAGS="--cfg loom" \
  cargo test --quiet -p shmem-ring --release --lib loom_model
