#!/usr/bin/env bash
# Prepares everything the qemu backend and the end-to-end tests need:
#   1. host packages (QEMU, dtc, cpio), installed with apt only when missing;
#   2. Debian's cloud kernel, downloaded once into the cache and unpacked to a
#      stable path ($MKCTL_CACHE/kernel/vmlinuz + .../version);
#   3. the guest kernel's virtio console driver and what it needs, copied
#      out of the same package to $MKCTL_CACHE/kernel/modules/ (the guests'
#      doorbell port; the cloud kernel builds virtio as modules);
#   2b/3b. the same for Debian 12's 6.12 cloud kernel (linux-image-6.12-
#      cloud-amd64, a 34 MB .deb), in $MKCTL_CACHE/kernel-6.12/: guests with
#      kernel = "auto-6.12" run another kernel build than the stock ones;
#   4. the statically linked guest-init, copied to $MKCTL_CACHE/guest-init.
# Idempotent: when everything is in place it only re-checks and re-runs a
# no-op cargo build (well under 2 s).
#
# Environment:
#   MKCTL_CACHE       cache directory (default: <repo>/.cache)
#   CARGO_TARGET_DIR  cargo's target dir; the static build goes to its static/
#   MKCTL_KERNEL_PKG  a versioned linux-image-*-cloud-amd64 package to use
#                     instead of the one the meta-package points at
#   MKCTL_KERNEL_612_PKG  the same for the 6.12 kernel (a versioned
#                     linux-image-6.12.*-cloud-amd64 package)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${MKCTL_CACHE:-$REPO/.cache}"
KDIR="$CACHE/kernel"
KDIR_612="$CACHE/kernel-6.12"
TRIPLE=x86_64-unknown-linux-gnu
STATIC_TARGET="${CARGO_TARGET_DIR:-$REPO/target}/static"
PACKAGES=(qemu-system-x86 device-tree-compiler cpio busybox-static xz-utils)

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

# --- 2. and 3. kernels and their modules ------------------------------------
# The modules guest-init loads from the initramfs in this order (each needs
# the ones before it; `depends=` in their .modinfo) to get a virtio-serial
# port, the guests' doorbell (guest-init/src/doorbell.rs); and unix_diag at
# boot, which tells a migration a socket's peer (socket pairs move with it).
# They are copied out of each kernel's own package: a module loads only in
# the release it was built for.
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_console unix_diag)

# The versioned image package a meta-package depends on, e.g.
# linux-image-6.1.0-56-cloud-amd64 (never the -dbg or -unsigned variants).
resolve_kernel_pkg() {
    apt-cache depends "$1" 2>/dev/null \
        | sed -n 's/^ *Depends: *\(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' \
        | sort -V | tail -n1
}

# fetch_kernel META DIR [PKG]: the newest versioned package META points at
# (or PKG), downloaded once into DIR and unpacked to DIR/vmlinuz, DIR/version
# (its release), DIR/package, and its MODULES to DIR/modules/ (with
# DIR/modules/release). Does nothing when all of it is already there.
fetch_kernel() {
    local meta="$1" kdir="$2" pkg="${3:-}" deb x img release old m ko
    local mdir="$kdir/modules"
    mkdir -p "$kdir"
    if [ -z "$pkg" ]; then
        pkg="$(resolve_kernel_pkg "$meta")"
        if [ -z "$pkg" ]; then
            if [ -s "$kdir/package" ] && [ -s "$kdir/vmlinuz" ]; then
                # No apt lists (fresh or cleaned machine) but a kernel is
                # cached: keep it rather than go to the network.
                pkg="$(cat "$kdir/package")"
            else
                apt_update_once
                pkg="$(resolve_kernel_pkg "$meta")"
            fi
        fi
    fi
    [ -n "$pkg" ] || die "cannot resolve $meta to a versioned kernel package (is this Debian with main enabled?)"

    # The package's .deb in the cache, downloaded when missing (sets deb;
    # this and have_modules see fetch_kernel's locals: bash scopes them
    # dynamically).
    local_deb() {
        deb="$(ls "$kdir/${pkg}"_*.deb 2>/dev/null | sort -V | tail -n1 || true)"
        [ -z "$deb" ] || return 0
        say "downloading $pkg"
        if ! (cd "$kdir" && apt-get download -qq "$pkg" 2>/dev/null); then
            # A stale package list points at a file the mirror no longer has.
            apt_update_once
            (cd "$kdir" && apt-get download -qq "$pkg") || die "apt-get download $pkg failed"
        fi
        deb="$(ls "$kdir/${pkg}"_*.deb 2>/dev/null | sort -V | tail -n1 || true)"
        [ -n "$deb" ] || die "apt-get download $pkg produced no .deb in $kdir"
    }

    if [ "$(cat "$kdir/package" 2>/dev/null)" != "$pkg" ] || [ ! -s "$kdir/vmlinuz" ] || [ ! -s "$kdir/version" ]; then
        local_deb
        x="$(mktemp -d "$kdir/extract.XXXXXX")"
        trap 'rm -rf "$x"' EXIT
        dpkg-deb -x "$deb" "$x" || die "dpkg-deb -x $deb failed"
        img="$(ls "$x"/boot/vmlinuz-* 2>/dev/null | head -n1 || true)"
        [ -n "$img" ] || die "$deb holds no boot/vmlinuz-*"
        release="${img##*/vmlinuz-}"
        cp "$img" "$kdir/vmlinuz.tmp" && mv "$kdir/vmlinuz.tmp" "$kdir/vmlinuz"
        printf '%s\n' "$release" >"$kdir/version"
        printf '%s\n' "$pkg" >"$kdir/package"
        rm -rf "$x"
        trap - EXIT
        # Older downloads of other versions are no longer needed.
        for old in "$kdir"/linux-image-*.deb; do
            [ "$old" = "$deb" ] || rm -f "$old"
        done
        say "kernel $release unpacked"
    fi

    # A module the kernel builds in is named in modules/builtin instead.
    have_modules() {
        [ "$(cat "$mdir/release" 2>/dev/null)" = "$(cat "$kdir/version")" ] || return 1
        for m in "${MODULES[@]}"; do
            [ -s "$mdir/$m.ko" ] || grep -qx "$m" "$mdir/builtin" 2>/dev/null || return 1
        done
    }
    if ! have_modules; then
        pkg="$(cat "$kdir/package")"
        local_deb
        x="$(mktemp -d "$kdir/extract.XXXXXX")"
        trap 'rm -rf "$x"' EXIT
        dpkg-deb -x "$deb" "$x" || die "dpkg-deb -x $deb failed"
        rm -rf "$mdir" && mkdir -p "$mdir"
        : >"$mdir/builtin"
        for m in "${MODULES[@]}"; do
            # 6.1 ships plain .ko files; 6.12 builds virtio in and xz-compresses
            # its modules (guest-init loads plain ones: decompressed here).
            if grep -qE "/$m\.ko\$" "$x"/lib/modules/*/modules.builtin 2>/dev/null; then
                printf '%s\n' "$m" >>"$mdir/builtin"
                continue
            fi
            ko="$(find "$x/lib/modules" \( -name "$m.ko" -o -name "$m.ko.xz" \) | head -n1)"
            [ -n "$ko" ] || die "$deb holds no $m.ko or $m.ko.xz and does not build it in"
            case "$ko" in
                *.xz) xz -dc "$ko" >"$mdir/$m.ko" || die "cannot decompress $ko (xz-utils)" ;;
                *) cp "$ko" "$mdir/$m.ko" ;;
            esac
        done
        cp "$kdir/version" "$mdir/release"
        rm -rf "$x"
        trap - EXIT
        local kos builtin
        kos="$(cd "$mdir" && ls -- *.ko 2>/dev/null | sed 's/\.ko$//' | paste -sd' ')"
        builtin="$(paste -sd' ' "$mdir/builtin")"
        say "modules ${kos:-(none)} copied to $mdir${builtin:+ (built in: $builtin)}"
    fi
}

# The stock guest kernel (kernel = "auto"), and Debian 12's 6.12 cloud
# kernel (kernel = "auto-6.12": guests of another kernel build).
fetch_kernel linux-image-cloud-amd64 "$KDIR" "${MKCTL_KERNEL_PKG:-}"
fetch_kernel linux-image-6.12-cloud-amd64 "$KDIR_612" "${MKCTL_KERNEL_612_PKG:-}"

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
say "modules:    $KDIR/modules (${#MODULES[@]}, for the doorbell port and unix_diag)"
say "kernel 6.12: $KDIR_612/vmlinuz ($(cat "$KDIR_612/version"), from $(cat "$KDIR_612/package")), modules in $KDIR_612/modules"
say "guest-init: $CACHE/guest-init"
