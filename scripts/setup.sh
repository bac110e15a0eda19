#!/usr/bin/env bash
# Sets up everything mkctl's demo and tests need on a fresh Debian 12 machine,
# idempotently (a second run takes a second or two):
#   - checks for a Rust toolchain (cargo >= 1.85),
#   - apt packages (only when one is missing),
#   - the guest kernels (stock 6.1 and 6.12) and static guest-init for the QEMU
#     backend (qemu/setup.sh),
#   - the multikernel host kernel (qemu/multikernel/build.sh: Linux 7.2 and our
#     patch, cached by a hash of its inputs; ~5 min on 2 cores the first time),
#   - kerf, the multikernel project's CLI, in a venv (a peer the tests compare with),
#   - builds the workspace, libmk.a and the C DSM example (libmk/examples).
# Everything lands in $MKCTL_CACHE (default: <repo>/.cache) or target/.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${MKCTL_CACHE:-$repo/.cache}
mkdir -p "$cache"
say() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# Rust: the one toolchain this project builds with; it cannot be fetched here.
command -v cargo >/dev/null || die "cargo not found: install Rust 1.85 or newer (https://rustup.rs) and run again"

# apt packages for the tests (QEMU's own list lives in qemu/setup.sh).
need=()
# gcc and libc6-dev: C programs built against libmk.a, statically.
# make, flex, bison, bc, xz-utils, libelf-dev: the multikernel host kernel.
for p in python3-venv util-linux gcc libc6-dev make flex bison bc xz-utils libelf-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  [ "$(id -u)" = 0 ] || die "installing ${need[*]} needs root (sudo $0)"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi

# The QEMU backend: qemu-system-x86, the stock guest kernel, static guest-init.
"$repo/qemu/setup.sh"

# The multikernel host kernel the tests boot under QEMU (tests/tests/
# qemu_multikernel.rs): built once per change of its inputs, at low priority.
if ! "$repo/qemu/multikernel/build.sh" --print >/dev/null 2>&1; then
  say "building the multikernel host kernel (Linux 7.2 + qemu/multikernel/multikernel.patch; ~5 min the first time)"
fi
nice -n 10 "$repo/qemu/multikernel/build.sh" >/dev/null || die "the multikernel host kernel did not build (qemu/multikernel/build.sh)"
# mkctl linked statically: the multikernel e2e test runs it inside that
# kernel's busybox initramfs (the test rebuilds it if stale; this keeps the
# test itself short).
RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static -C strip=debuginfo" \
  cargo build --quiet --release -p mkctl --target x86_64-unknown-linux-gnu \
  --target-dir "${CARGO_TARGET_DIR:-$repo/target}/static" --manifest-path "$repo/Cargo.toml" \
  || die "static build of mkctl failed"

# kerf 0.4.0 (PyPI kerf-multikernel), the reference tool for the multikernel
# interface; the DTB tests feed it our output.
venv=$cache/kerf-venv
if ! "$venv/bin/kerf" --version 2>/dev/null | grep -q '0\.4\.0'; then
  say "installing kerf-multikernel 0.4.0 into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv" || die "python3 -m venv failed (apt package python3-venv)"
  "$venv/bin/pip" install -q --disable-pip-version-check 'kerf-multikernel==0.4.0' \
    || die "pip could not install kerf-multikernel 0.4.0"
fi

say "building mkctl"
(cd "$repo" && cargo build --quiet --workspace --all-targets)

# libmk.a (mk.h's library) and the README's DSM example built against it,
# static, exactly as the README tells users to: the demo copies it into the
# guests.
say "building libmk.a and the DSM example"
target=${CARGO_TARGET_DIR:-$repo/target}
(cd "$repo" && cargo build --quiet --release -p libmk)
if [ ! -x "$cache/dsm-counter" ] || [ "$target/release/libmk.a" -nt "$cache/dsm-counter" ] \
   || [ "$repo/libmk/examples/counter.c" -nt "$cache/dsm-counter" ]; then
  cc -static -s "$repo/libmk/examples/counter.c" -I "$repo/libmk/include" \
     "$target/release/libmk.a" -lpthread -o "$cache/dsm-counter.tmp" 2>/dev/null \
    || die "cc could not build libmk/examples/counter.c against libmk.a"
  mv "$cache/dsm-counter.tmp" "$cache/dsm-counter"
fi
say "ready"
