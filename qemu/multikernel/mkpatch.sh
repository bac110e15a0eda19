#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Regenerates multikernel.patch from an overlay directory: a tree holding
# only the kernel files our patch adds or changes, at their paths in the
# kernel source (e.g. <dir>/kernel/multikernel/core.c). Each file is diffed
# against the pristine source that build.sh unpacked; the header
# (patch-header.txt) goes first.
#
#   qemu/multikernel/mkpatch.sh <overlay-dir>      writes multikernel.patch
#   qemu/multikernel/mkpatch.sh --extract <dir>    the reverse: fills <dir> from
#                                                  the patch (to edit it)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${MKCTL_MK_CACHE:-${MKCTL_CACHE:-$REPO/.cache}/multikernel}"
VERSION=$(sed -n 's/^SRC_VERSION=//p' "$HERE/build.sh")
PRISTINE="$CACHE/src/linux-$VERSION"
[ -f "$PRISTINE/.complete" ] || {
    echo "mkpatch: no pristine source at $PRISTINE: run qemu/multikernel/build.sh once" >&2
    exit 1
}

if [ "${1:-}" = "--extract" ]; then
    dir="$2"
    mkdir -p "$dir"
    sed -n 's|^+++ b/\([^[:space:]]*\).*|\1|p' "$HERE/multikernel.patch" | while read -r f; do
        mkdir -p "$dir/$(dirname "$f")"
        if [ -f "$PRISTINE/$f" ]; then cp "$PRISTINE/$f" "$dir/$f"; else : >"$dir/$f"; fi
    done
    # Apply only where the files are: the overlay holds nothing else.
    patch -d "$dir" -p1 --quiet --no-backup-if-mismatch <"$HERE/multikernel.patch"
    echo "mkpatch: extracted into $dir"
    exit 0
fi

dir="$(cd "${1:?usage: mkpatch.sh <overlay-dir>}" && pwd)"
out="$HERE/multikernel.patch"
{
    cat "$HERE/patch-header.txt"
    (cd "$dir" && find . -type f | sed 's|^\./||' | LC_ALL=C sort) | while read -r f; do
        if [ -f "$PRISTINE/$f" ]; then
            diff -u --label "a/$f" --label "b/$f" "$PRISTINE/$f" "$dir/$f" || true
        else
            diff -u --label /dev/null --label "b/$f" /dev/null "$dir/$f" || true
        fi
    done
} >"$out.tmp"
mv "$out.tmp" "$out"
echo "mkpatch: wrote $out ($(grep -c '^+++ ' "$out") files)"
