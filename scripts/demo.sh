#!/usr/bin/env bash
# Sets everything up and runs the main job on the default topology
# (configs/demo.toml, or the file given): validate and plan it, boot its
# kernels under QEMU, run a command on each, send traffic and ping between
# them over the shared window, count together on one page of distributed
# shared memory from a C program on every kernel, move a running process
# from one kernel to another and back, and stop them.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# The cache setup fills (kernel, guest-init): mkctl finds it by itself when
# it is built under this checkout, not with a CARGO_TARGET_DIR elsewhere.
export MKCTL_CACHE=${MKCTL_CACHE:-$repo/.cache}
"$repo/scripts/setup.sh"
mkctl="${CARGO_TARGET_DIR:-$repo/target}/debug/mkctl"
config=${1:-configs/demo.toml}
# A run directory of the demo's own, so it never disturbs another daemon.
export MKCTL_RUN_DIR=${MKCTL_RUN_DIR:-$repo/.cache/demo-run}
if [ -t 1 ]; then
  step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
else
  step() { printf '\n== %s\n' "$*"; }
fi
cleanup() { "$mkctl" daemon stop >/dev/null 2>&1 || true; }
trap cleanup EXIT

step "mkctl plan $config"
"$mkctl" plan "$config"

step "mkctl boot $config"
"$mkctl" boot "$config"

step "mkctl status"
"$mkctl" status

names=$("$mkctl" status --json | python3 -c 'import json,sys; print(" ".join(i["name"] for i in json.load(sys.stdin)["daemon"]["instances"]))')
for n in $names; do
  step "mkctl exec $n -- uname -a; NUMA nodes; memory"
  "$mkctl" exec "$n" -- sh -c 'uname -a; echo "cpus online: $(cat /sys/devices/system/cpu/online)"; ls /sys/devices/system/node | grep node; grep MemTotal /proc/meminfo'
done

set -- $names
if [ $# -ge 2 ]; then
  step "traffic and ping between kernels over the window"
  "$mkctl" traffic host "$1" --count 5000
  "$mkctl" traffic "$1" "$2" --count 5000
  "$mkctl" ping host "$1" --count 200
  "$mkctl" ping "$1" "$2" --count 200
fi

if [ $# -ge 2 ] && [ -x .cache/dsm-counter ]; then
  step "distributed shared memory: a C program (libmk) counts on the host, $1 and $2 at once"
  for n in "$1" "$2"; do
    "$mkctl" exec "$n" -- sh -c 'cat > /tmp/counter && chmod +x /tmp/counter' < .cache/dsm-counter
  done
  # Each adds 20000 to one counter in region "demo", atomically; the page
  # moves between the kernels as they write it.
  "$mkctl" exec "$1" -- /tmp/counter demo 20000 &
  a=$!
  "$mkctl" exec "$2" -- /tmp/counter demo 20000 &
  b=$!
  .cache/dsm-counter demo 20000
  wait "$a" "$b"
  echo "every kernel sees the same total (60000):"
  "$mkctl" exec "$1" -- /tmp/counter demo 0
  "$mkctl" exec "$2" -- /tmp/counter demo 0
  "$mkctl" dsm show demo
fi

if [ $# -ge 2 ] && [ -x .cache/mkcounter ]; then
  step "a running process moves between kernels: mkcounter on $1, to $2 (lazy), back to $1 (stop-copy)"
  # The static test program goes into the guest through exec's stdin.
  "$mkctl" exec "$1" -- sh -c 'cat > /tmp/mkcounter && chmod +x /tmp/mkcounter' < .cache/mkcounter
  # Its output streams here, through every move, with no gap in seq=.
  "$mkctl" exec "$1" -- /tmp/mkcounter --mem 16M --threads 2 --interval-ms 300 </dev/null &
  counter=$!
  sleep 2
  pid=$("$mkctl" exec "$1" -- pidof mkcounter)
  "$mkctl" migrate "$pid" --from "$1" --to "$2"
  sleep 2
  pid=$("$mkctl" exec "$2" -- pidof mkcounter)
  "$mkctl" migrate "$pid" --from "$2" --to "$1" --mode stop-copy
  sleep 2
  pid=$("$mkctl" exec "$1" -- pidof mkcounter)
  # Its end comes back to the first exec (128 + 15 for SIGTERM).
  "$mkctl" exec "$1" -- kill "$pid"
  wait "$counter" || echo "mkcounter ended with status $? (143 = SIGTERM)"
fi

step "mkctl stop --all"
"$mkctl" stop --all
