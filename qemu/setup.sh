#!/usr/bin/env bash
# Prepares everything the qemu backend and the end-to-end tests need:
#   1. host packages (QEMU, dtc, cpio), installed with apt only when missing;
#   2. Debian's cloud kernel, downloaded once into the cache and unpacked to a
#      stable path ($MKCTL_CACHE/kernel/vmlinuz + .../version);
#   3. the guest kernel's virtio console driver and what it needs, copied
#      out of the same package to $MKCTL_CACHE/kernel/modules/ (the guests'
#      doorbell port; the cloud kernel builds virtio as modules);
#   4. the statically linked guest-init, copied to $MKCTL_CACHE/guest-init.
# Idempotent: when everything is in place it only re-checks and re-runs a
# no-op cargo build (well under 2 s).
#
# Environment:
#   MKCTL_CACHE       cache directory (default: <repo>/.cache)
#   CARGO_TARGET_DIR  cargo's target dir; the static build goes to its static/
#   MKCTL_KERNEL_PKG  a versioned linux-image-*-cloud-amd64 package to use
#                     instead of the one the meta-package points at
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${MKCTL_CACHE:-$REPO/.cache}"
KDIR="$CACHE/kernel"
TRIPLE=x86_64-unknown-linux-gnu
STATIC_TARGET="${CARGO_TARGET_DIR:-$REPO/target}/static"
PACKAGES=(qemu-system-x86 device-tree-compiler cpio busybox-static)

say() { printf 'setup: %s\n' "$*"; }
die() {
    printf 'setup: error: %s\n' "$*" >&2
    exit 1
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root to run: $* (run this script as root or install sudo)"
    fi
}

APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        as_root apt-get update -qq || die "apt-get update failed"
        APT_UPDATED=1
    fi
}

installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# --- 1. host packages -------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt_update_once
    say "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        || die "apt-get install ${missing[*]} failed"
fi
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not on PATH after installing qemu-system-x86"

# --- 2. kernel --------------------------------------------------------------
# The versioned image package the meta-package depends on, e.g.
# linux-image-6.1.0-56-cloud-amd64 (never the -dbg or -unsigned variants).
resolve_kernel_pkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: *\(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' \
        | sort -V | tail -n1
}

mkdir -p "$KDIR"
pkg="${MKCTL_KERNEL_PKG:-}"
if [ -z "$pkg" ]; then
    pkg="$(resolve_kernel_pkg)"
    if [ -z "$pkg" ]; then
        if [ -s "$KDIR/package" ] && [ -s "$KDIR/vmlinuz" ]; then
            # No apt lists (fresh or cleaned machine) but a kernel is cached:
            # keep it rather than go to the network.
            pkg="$(cat "$KDIR/package")"
        else
            apt_update_once
            pkg="$(resolve_kernel_pkg)"
        fi
    fi
fi
[ -n "$pkg" ] || die "cannot resolve linux-image-cloud-amd64 to a versioned kernel package (is this Debian with main enabled?)"

if [ "$(cat "$KDIR/package" 2>/dev/null)" != "$pkg" ] || [ ! -s "$KDIR/vmlinuz" ] || [ ! -s "$KDIR/version" ]; then
    deb="$(ls "$KDIR/${pkg}"_*.deb 2>/dev/null | sort -V | tail -n1 || true)"
    if [ -z "$deb" ]; then
        say "downloading $pkg"
        if ! (cd "$KDIR" && apt-get download -qq "$pkg" 2>/dev/null); then
            # A stale package list points at a file the mirror no longer has.
            apt_update_once
            (cd "$KDIR" && apt-get download -qq "$pkg") || die "apt-get download $pkg failed"
        fi
        deb="$(ls "$KDIR/${pkg}"_*.deb 2>/dev/null | sort -V | tail -n1 || true)"
        [ -n "$deb" ] || die "apt-get download $pkg produced no .deb in $KDIR"
    fi
    x="$(mktemp -d "$KDIR/extract.XXXXXX")"
    trap 'rm -rf "$x"' EXIT
    dpkg-deb -x "$deb" "$x" || die "dpkg-deb -x $deb failed"
    img="$(ls "$x"/boot/vmlinuz-* 2>/dev/null | head -n1 || true)"
    [ -n "$img" ] || die "$deb holds no boot/vmlinuz-*"
    release="${img##*/vmlinuz-}"
    cp "$img" "$KDIR/vmlinuz.tmp" && mv "$KDIR/vmlinuz.tmp" "$KDIR/vmlinuz"
    printf '%s\n' "$release" >"$KDIR/version"
    printf '%s\n' "$pkg" >"$KDIR/package"
    rm -rf "$x"
    trap - EXIT
    # Older downloads of other versions are no longer needed.
    for old in "$KDIR"/linux-image-*.deb; do
        [ "$old" = "$deb" ] || rm -f "$old"
    done
    say "kernel $release unpacked"
fi

# --- 3. modules for the doorbell port and for migration ---------------------
# guest-init loads these from the initramfs in this order (each needs the
# ones before it; `depends=` in their .modinfo) to get a virtio-serial port,
# the guests' doorbell (guest-init/src/doorbell.rs); and unix_diag at boot,
# which tells a migration a socket's peer (socket pairs move with it).
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_console unix_diag)
MDIR="$KDIR/modules"
have_modules() {
    [ "$(cat "$MDIR/release" 2>/dev/null)" = "$(cat "$KDIR/version")" ] || return 1
    for m in "${MODULES[@]}"; do [ -s "$MDIR/$m.ko" ] || return 1; done
}
if ! have_modules; then
    deb="$(ls "$KDIR/$(cat "$KDIR/package")"_*.deb 2>/dev/null | sort -V | tail -n1 || true)"
    if [ -z "$deb" ]; then
        (cd "$KDIR" && apt-get download -qq "$(cat "$KDIR/package")") || die "apt-get download $(cat "$KDIR/package") failed"
        deb="$(ls "$KDIR/$(cat "$KDIR/package")"_*.deb | sort -V | tail -n1)"
    fi
    x="$(mktemp -d "$KDIR/extract.XXXXXX")"
    trap 'rm -rf "$x"' EXIT
    dpkg-deb -x "$deb" "$x" || die "dpkg-deb -x $deb failed"
    rm -rf "$MDIR" && mkdir -p "$MDIR"
    for m in "${MODULES[@]}"; do
        ko="$(find "$x/lib/modules" -name "$m.ko" | head -n1)"
        [ -n "$ko" ] || die "$deb holds no $m.ko (is it built in? then drop it from MODULES)"
        cp "$ko" "$MDIR/$m.ko"
    done
    cp "$KDIR/version" "$MDIR/release"
    rm -rf "$x"
    trap - EXIT
    say "modules ${MODULES[*]} copied to $MDIR"
fi

# --- 4. static guest-init ---------------------------------------------------
command -v cargo >/dev/null || die "cargo not found on PATH"
# crt-static only for the target crates: an explicit --target keeps RUSTFLAGS
# away from build scripts and proc-macros, and a target dir of its own keeps
# the normal build's cache intact. Debug info is stripped (symbols stay): it
# would triple the size of every initramfs.
RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static -C strip=debuginfo" \
    cargo build --quiet --release -p guest-init -p testprogs --target "$TRIPLE" \
    --target-dir "$STATIC_TARGET" --manifest-path "$REPO/Cargo.toml" \
    || die "static build of guest-init failed"
bin="$STATIC_TARGET/$TRIPLE/release/guest-init"
if ! ldd "$bin" 2>&1 | grep -qE 'not a dynamic executable|statically linked'; then
    die "$bin is not statically linked"
fi
if ! cmp -s "$bin" "$CACHE/guest-init" 2>/dev/null; then
    cp "$bin" "$CACHE/guest-init.tmp" && mv "$CACHE/guest-init.tmp" "$CACHE/guest-init"
else
    # Same bytes: still mark it as built from the current sources (the e2e
    # tests refuse a guest-init older than guest-init/src).
    touch "$CACHE/guest-init"
fi

# The test programs the migration and DSM tests run inside guests.
for name in mkcounter dsmtest; do
    prog="$STATIC_TARGET/$TRIPLE/release/$name"
    if ! cmp -s "$prog" "$CACHE/$name" 2>/dev/null; then
        cp "$prog" "$CACHE/$name.tmp" && mv "$CACHE/$name.tmp" "$CACHE/$name"
    fi
done

say "qemu:       $(command -v qemu-system-x86_64)"
say "kernel:     $KDIR/vmlinuz ($(cat "$KDIR/version"), from $(cat "$KDIR/package"))"
say "modules:    $MDIR (${#MODULES[@]}, for the doorbell port and unix_diag)"
say "guest-init: $CACHE/guest-init"
