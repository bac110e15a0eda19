#!/usr/bin/env bash
# CRIU as a benchmark peer: a Debian 13 (trixie) chroot with criu 4.x in it.
#
# Why a chroot: Debian 12's criu 3.17 refuses to start on this host's 6.18
# kernel (it does not know the kernel's new vDSO layout); trixie's criu does.
# Installing trixie packages into the system itself would drag the whole
# machine along to Debian 13, so criu lives in a private trixie tree instead,
# and nothing under /etc/apt is touched.
#
# Usage: scripts/criu-peer.sh setup|mount|umount|status
#   setup   build the chroot if missing (~1 min, ~250 MB), install criu in it,
#           mount what it needs, run `criu check`, print the chroot's path.
#           Idempotent; takes well under 2 s when everything is in place.
#   mount   mount the chroot's bind mounts (those already there are skipped).
#   umount  unmount them again, innermost first.
#   status  print the chroot's path and exit 0 if criu is ready to run;
#           otherwise say why and exit 1.
#
# Everything lives in $MKCTL_CACHE/criu (default <repo>/.cache/criu):
#   root/         the trixie chroot; the benchmark runs `chroot root criu ...`
#   debootstrap/  debootstrap unpacked from Debian 12's own package
#   *.done        markers of finished steps, so a failed step is redone
# Environment: CRIU_PEER_MIRROR overrides the Debian archive URI, which is
# otherwise taken from the system's apt sources. Needs root.
set -euo pipefail

repo=$(cd -P "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
base=${MKCTL_CACHE:-$repo/.cache}/criu
root=$base/root
suite=trixie

say() { printf 'criu-peer: %s\n' "$*" >&2; }
die() { printf 'criu-peer: error: %s\n' "$*" >&2; exit 1; }

# The mounts criu needs inside the chroot, in mounting order. The chroot is
# first bound onto itself because criu wants its root to be a mount point.
mount_points=("" /proc /sys /dev /dev/pts /run)

# Mounts the one mount point $1 (one of mount_points) under $root.
mount_one() {
  local target=$root$1
  case $1 in
    "")  mount --bind "$root" "$root"
         # Keep mounts made below it from propagating back to the host.
         mount --make-private "$root" ;;
    /run) mount -t tmpfs -o mode=755 tmpfs "$target" ;;
    *)   mount --bind "$1" "$target" ;;
  esac
}

do_mount() {
  [ -d "$root/proc" ] || die "no chroot at $root; run: $0 setup"
  local p
  for p in "${mount_points[@]}"; do
    if ! mountpoint -q "$root$p"; then
      mount_one "$p" || die "mounting ${p:-the chroot onto itself} at $root$p failed"
    fi
  done
}

do_umount() {
  local i p
  for ((i = ${#mount_points[@]} - 1; i >= 0; i--)); do
    p=$root${mount_points[i]}
    mountpoint -q "$p" 2>/dev/null || continue
    if ! umount "$p" 2>/dev/null; then
      # Busy (a process still runs in the chroot): detach it now, the
      # kernel frees it when the last user goes.
      say "$p is busy; detaching it lazily"
      umount -l "$p" || die "cannot unmount $p"
    fi
  done
}

# True if anything is mounted at or below $root (then it must not be deleted).
mounted_below_root() {
  awk -v r="$root" '$5 == r || index($5, r "/") == 1 { found = 1 } END { exit !found }' \
    /proc/self/mountinfo
}

# The Debian archive URI the system's apt uses (deb.debian.org or a mirror).
debian_mirror() {
  if [ -n "${CRIU_PEER_MIRROR:-}" ]; then
    echo "$CRIU_PEER_MIRROR"
    return
  fi
  local f uri
  # deb822 files: "URIs: http://deb.debian.org/debian"
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk '$1 == "URIs:" { for (i = 2; i <= NF; i++) print $i }' "$f" |
      grep -E '/debian/?$' | head -n1) || true
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
  # one-line files: "deb [options] http://deb.debian.org/debian bookworm main"
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(sed -E -n 's/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p' "$f" |
      grep -E '/debian/?$' | head -n1) || true
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
  die "no Debian archive URI (ending in /debian) in /etc/apt/sources.list{,.d/}; set CRIU_PEER_MIRROR=<uri>"
}

# debootstrap from Debian 12's own package, unpacked (not installed).
fetch_debootstrap() {
  local dir=$base/debootstrap
  [ -x "$dir/usr/sbin/debootstrap" ] && return
  say "fetching debootstrap (Debian 12 package, unpacked into $dir)"
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null ||
    die "apt-get and dpkg-deb are needed (this script expects Debian)"
  rm -rf "$dir" "$base/deb"
  mkdir -p "$base/deb"
  # -o APT::Sandbox::User=root: the _apt user cannot write into .cache/.
  (cd "$base/deb" && apt-get -q -o APT::Sandbox::User=root download debootstrap >/dev/null) ||
    die "apt-get download debootstrap failed (is the Debian archive reachable? try apt-get update)"
  dpkg-deb -x "$base"/deb/debootstrap_*.deb "$dir" || die "cannot unpack the debootstrap package"
  rm -rf "$base/deb"
}

build_root() {
  if [ ! -e "$base/debootstrap.done" ]; then
    fetch_debootstrap
    if [ -e "$root" ]; then
      # A half-built tree from an interrupted run: start over.
      do_umount
      mounted_below_root && die "something is still mounted below $root; unmount it and rerun"
      say "removing the unfinished chroot at $root"
      rm -rf --one-file-system "$root"
    fi
    local mirror
    mirror=$(debian_mirror)
    say "building a Debian $suite chroot at $root from $mirror (takes ~1 min)"
    mkdir -p "$root"
    DEBOOTSTRAP_DIR=$base/debootstrap/usr/share/debootstrap \
      "$base/debootstrap/usr/sbin/debootstrap" --variant=minbase "$suite" "$root" "$mirror" \
      >"$base/debootstrap.log" 2>&1 ||
      die "debootstrap failed; see $base/debootstrap.log (and $root/debootstrap/debootstrap.log if present)"
    touch "$base/debootstrap.done"
  fi

  do_mount

  if [ ! -e "$base/criu.done" ]; then
    say "installing criu inside the chroot"
    # Name resolution for apt inside the chroot.
    cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
    {
      chroot "$root" apt-get -q update &&
        chroot "$root" env DEBIAN_FRONTEND=noninteractive \
          apt-get -q install -y --no-install-recommends criu
    } >"$base/apt.log" 2>&1 || die "apt-get install criu in the chroot failed; see $base/apt.log"
    chroot "$root" apt-get -q clean
    touch "$base/criu.done"
  fi
}

# Prints why criu cannot run yet, or nothing if it can.
not_ready_reason() {
  if [ ! -e "$base/criu.done" ]; then
    echo "the chroot is not built (or criu not installed in it); run: $0 setup"
    return
  fi
  local p
  for p in "${mount_points[@]}"; do
    mountpoint -q "$root$p" || { echo "$root$p is not mounted; run: $0 mount"; return; }
  done
  local out
  if ! out=$(chroot "$root" criu check 2>&1) || ! grep -q 'Looks good' <<<"$out"; then
    echo "criu check fails in the chroot: $(tail -n 3 <<<"$out" | tr '\n' ' ')"
  fi
}

need_root() {
  [ "$(id -u)" = 0 ] || die "must run as root (chroot and mount need it); try: sudo $0 $1"
}

cmd=${1:-}
case $cmd in
  setup)
    need_root setup
    mkdir -p "$base"
    # One setup at a time (two benches starting together must not race).
    exec 9>"$base/lock"
    flock 9
    build_root
    do_mount
    reason=$(not_ready_reason)
    [ -z "$reason" ] || die "$reason"
    say "ready: criu $(chroot "$root" criu --version | sed -n 's/^Version: //p') in $root"
    echo "$root"
    ;;
  mount)
    need_root mount
    do_mount
    ;;
  umount)
    need_root umount
    do_umount
    ;;
  status)
    need_root status
    reason=$(not_ready_reason)
    if [ -n "$reason" ]; then
      say "not ready: $reason"
      exit 1
    fi
    echo "$root"
    ;;
  *)
    printf 'usage: %s setup|mount|umount|status\n' "$0" >&2
    exit 2
    ;;
esac
