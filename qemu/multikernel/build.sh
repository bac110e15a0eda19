#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Builds the multikernel test kernel: Debian's linux-source-7.2 (unstable),
# our patch (multikernel.patch), the config fragment (config.fragment) on top
# of `make tinyconfig`. One bzImage serves as the multikernel host and as the
# kernel it spawns.
#
# The result is cached by a hash of every input (source version and its
# sha256, patch, fragment, this script), so a second run with the same
# inputs only prints the path. Builds are incremental across input changes
# (one build tree; files the old or new patch touches are refreshed).
#
#   qemu/multikernel/build.sh           build if needed; last stdout line: the bzImage
#   qemu/multikernel/build.sh --print   print the cached bzImage for these inputs,
#                                       or exit 2 (nothing is built)
#   qemu/multikernel/build.sh --key     print the input hash only
#
# Environment:
#   MKCTL_MK_CACHE  cache directory (default: $MKCTL_CACHE/multikernel, or
#                   <repo>/.cache/multikernel)
#   MKCTL_MK_JOBS   make -j (default 2)
#
# On a compile error it prints the first error with its context and the
# path of the whole log, and exits 1.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${MKCTL_MK_CACHE:-${MKCTL_CACHE:-$REPO/.cache}/multikernel}"
JOBS="${MKCTL_MK_JOBS:-2}"

# The source: Debian's linux-source-7.2 from unstable, pinned.
SRC_PKG=linux-source-7.2
SRC_VERSION=7.2.13-1
SRC_SHA256=30a8c5fc63f9028a62e6d7b3f7f43bee67425dbce2a05fceba83f9b87c92083d
SRC_DEB="${SRC_PKG}_${SRC_VERSION}_all.deb"
ARCHIVE="${MKCTL_MK_ARCHIVE:-http://deb.debian.org/debian}"

PATCH="$HERE/multikernel.patch"
FRAGMENT="$HERE/config.fragment"

say() { printf 'multikernel: %s\n' "$*" >&2; }
die() {
    printf 'multikernel: error: %s\n' "$*" >&2
    exit 1
}

key() {
    {
        printf '%s\n' "$SRC_PKG" "$SRC_VERSION" "$SRC_SHA256"
        sha256sum <"$PATCH"
        sha256sum <"$FRAGMENT"
        sha256sum <"${BASH_SOURCE[0]}"
    } | sha256sum | cut -c1-16
}

KEY="$(key)"
OUT="$CACHE/out/$KEY"

case "${1:-}" in
--key)
    echo "$KEY"
    exit 0
    ;;
--print)
    [ -f "$OUT/bzImage" ] || {
        say "no cached kernel for inputs $KEY: run qemu/multikernel/build.sh"
        exit 2
    }
    echo "$OUT/bzImage"
    exit 0
    ;;
"") ;;
*) die "unknown argument $1 (use --print or --key)" ;;
esac

if [ -f "$OUT/bzImage" ]; then
    echo "$OUT/bzImage"
    exit 0
fi

mkdir -p "$CACHE"
# One kernel build at a time on this machine.
exec 9>"$CACHE/lock"
flock 9

for tool in gcc make flex bison bc xz perl cpio; do
    command -v "$tool" >/dev/null || die "$tool not found: apt-get install build-essential flex bison bc xz-utils perl cpio libelf-dev libssl-dev"
done
[ -e /usr/include/libelf.h ] || die "libelf.h not found: apt-get install libelf-dev"

# --- 1. the source (downloaded and unpacked once) --------------------------
PRISTINE="$CACHE/src/linux-$SRC_VERSION"
if [ ! -f "$PRISTINE/.complete" ]; then
    deb="$CACHE/$SRC_DEB"
    if ! echo "$SRC_SHA256  $deb" | sha256sum -c --quiet 2>/dev/null; then
        # A private apt configuration: unstable is never added to the
        # system's sources.
        apt="$CACHE/apt"
        mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $ARCHIVE sid main" >"$apt/sources.list"
        opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=-
            -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache")
        say "fetching $SRC_PKG=$SRC_VERSION from Debian unstable (private apt configuration)"
        apt-get "${opts[@]}" update -qq || die "apt-get update of the private unstable sources failed"
        (cd "$CACHE" && apt-get "${opts[@]}" download "$SRC_PKG=$SRC_VERSION" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) \
            || die "could not download $SRC_PKG=$SRC_VERSION (gone from unstable? pin a newer version and its sha256 in $0)"
        echo "$SRC_SHA256  $deb" | sha256sum -c --quiet || die "$deb: sha256 differs from the pinned $SRC_SHA256"
    fi
    say "unpacking $SRC_DEB"
    rm -rf "$PRISTINE" "$CACHE/src/deb"
    mkdir -p "$CACHE/src/deb" "$PRISTINE"
    dpkg-deb -x "$deb" "$CACHE/src/deb"
    tar -xJf "$CACHE/src/deb/usr/src/$SRC_PKG.tar.xz" -C "$PRISTINE" --strip-components=1
    rm -rf "$CACHE/src/deb"
    touch "$PRISTINE/.complete"
fi

# --- 2. the patched tree: hard links to the pristine one, plus the patch ----
# `patch` replaces the files it changes, so the pristine tree stays intact.
# Files the previous patch or this one touches are touched again, so the
# incremental build recompiles them whichever way they changed.
TREE="$CACHE/tree"
patched_files() { sed -n 's|^+++ b/\([^[:space:]]*\).*|\1|p' "$1"; }
if ! cmp -s "$PATCH" "$TREE/.applied.patch" 2>/dev/null; then
    old=()
    [ -f "$TREE/.applied.patch" ] && mapfile -t old < <(patched_files "$TREE/.applied.patch")
    say "applying multikernel.patch"
    rm -rf "$TREE"
    cp -al "$PRISTINE" "$TREE"
    for f in "${old[@]}"; do
        [ -e "$TREE/$f" ] || continue
        # A hard link to the pristine file: replace it by a fresh copy (a
        # new mtime), never touch the original.
        cp --remove-destination "$PRISTINE/$f" "$TREE/$f"
    done
    patch -d "$TREE" -p1 --quiet --no-backup-if-mismatch <"$PATCH" || die "multikernel.patch does not apply to $SRC_PKG $SRC_VERSION"
    cp "$PATCH" "$TREE/.applied.patch"
fi

# --- 3. configuration: tinyconfig + fragment, every line checked -----------
BUILD="$CACHE/build"
mkdir -p "$BUILD"
make -s -C "$TREE" O="$BUILD" tinyconfig >/dev/null
"$TREE/scripts/kconfig/merge_config.sh" -m -O "$BUILD" "$BUILD/.config" "$FRAGMENT" >"$BUILD/merge.log" 2>&1 \
    || die "merge_config.sh failed: see $BUILD/merge.log"
make -s -C "$TREE" O="$BUILD" olddefconfig >/dev/null
bad=()
while IFS= read -r line; do
    case "$line" in
    CONFIG_*=*)
        k="${line%%=*}"
        grep -qxF "$line" "$BUILD/.config" || bad+=("$k: want ${line#*=}, got $(grep "^$k=" "$BUILD/.config" | cut -d= -f2- || true)")
        ;;
    "# CONFIG_"*" is not set")
        k="${line#\# }"
        k="${k%% *}"
        grep -q "^$k=" "$BUILD/.config" && bad+=("$k: want unset, got $(grep "^$k=" "$BUILD/.config" | cut -d= -f2-)")
        ;;
    esac
done <"$FRAGMENT"
[ "${#bad[@]}" -eq 0 ] || die "the configuration does not hold what config.fragment asks (a missing dependency?):$(printf '\n  %s' "${bad[@]}")"

# --- 4. build ----------------------------------------------------------------
say "building bzImage (make -j$JOBS; log: $BUILD/build.log)"
start=$(date +%s)
if ! make -C "$TREE" O="$BUILD" -j"$JOBS" bzImage >"$BUILD/build.log" 2>&1; then
    line=$(grep -n -m1 -E 'error:|Error [0-9]+|undefined reference|\*\*\*' "$BUILD/build.log" | cut -d: -f1 || true)
    if [ -n "$line" ]; then
        say "the first error (line $line of $BUILD/build.log):"
        sed -n "$((line > 5 ? line - 5 : 1)),$((line + 5))p" "$BUILD/build.log" >&2
    else
        tail -n 20 "$BUILD/build.log" >&2
    fi
    die "kernel build failed"
fi
say "built in $(($(date +%s) - start)) s"

mkdir -p "$CACHE/out"
rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp"
cp "$BUILD/arch/x86/boot/bzImage" "$BUILD/.config" "$BUILD/System.map" "$OUT.tmp/"
printf 'source %s=%s\npatch %s\nfragment %s\n' "$SRC_PKG" "$SRC_VERSION" \
    "$(sha256sum <"$PATCH" | cut -c1-64)" "$(sha256sum <"$FRAGMENT" | cut -c1-64)" >"$OUT.tmp/inputs"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
echo "$OUT/bzImage"
