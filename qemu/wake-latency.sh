#!/usr/bin/env bash
# How fast an idle link wakes up between kernels under QEMU, and what idle
# links cost, with the doorbell relay and without it (MKCTL_DOORBELL=off:
# every receiver polls, as before the relay), in one run. For each mode it
# boots configs/demo.toml (host + alpha + beta) in a run directory of its
# own, then
#   - the CPU the daemon and each QEMU use while nothing is sent (10 s, from
#     utime + stime in /proc/<pid>/stat), after 5 s of settling;
#   - ROUNDS times: waits 5 s with no traffic and pings once, host -> alpha,
#     then again alpha -> beta: each is one round trip whose two messages
#     are both the first on their ring after >= 5 s of silence, and prints
#     the round trips and their medians.
# Usage: qemu/wake-latency.sh [rounds]     (after scripts/setup.sh; ~2.5 min)
# Environment: MKCTL (the mkctl binary, default target/debug/mkctl),
# MKCTL_CACHE, MKCTL_GUEST_INIT (as for mkctl itself); MODES (default
# "off on").
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
rounds=${1:-5}
export MKCTL_CACHE=${MKCTL_CACHE:-$repo/.cache}
mkctl=${MKCTL:-${CARGO_TARGET_DIR:-$repo/target}/debug/mkctl}
[ -x "$mkctl" ] || { echo "wake-latency: $mkctl is not built (cargo build)" >&2; exit 1; }
cleanup() { [ -n "${MKCTL_RUN_DIR:-}" ] && "$mkctl" daemon stop >/dev/null 2>&1 || true; }
trap cleanup EXIT

rtt_us() { "$mkctl" ping "$1" "$2" --count 1 --json | python3 -c 'import json,sys; print("%.0f" % (json.load(sys.stdin)["rtt_median_ns"] / 1e3))'; }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

for mode in ${MODES:-off on}; do
  export MKCTL_DOORBELL=$mode
  export MKCTL_RUN_DIR=$(mktemp -d /tmp/mk-wake.XXXXXX)
  "$mkctl" boot configs/demo.toml >/dev/null
  status=$("$mkctl" status --json)
  read -r -a pids <<<"$(python3 -c 'import json,sys; d=json.loads(sys.argv[1])["daemon"]; print(d["pid"], " ".join(str(i["pid"]) for i in d["instances"]))' "$status")"
  read -r -a names <<<"$(python3 -c 'import json,sys; d=json.loads(sys.argv[1])["daemon"]; print("daemon", " ".join("qemu-"+i["name"] for i in d["instances"]))' "$status")"

  # Idle CPU: utime + stime ticks over 10 s.
  ticks() { for p in "${pids[@]}"; do awk '{print $14 + $15}' "/proc/$p/stat"; done; }
  sleep 5
  mapfile -t t0 < <(ticks)
  sleep 10
  mapfile -t t1 < <(ticks)
  hz=$(getconf CLK_TCK)
  total=0
  line="doorbell $mode: idle CPU over 10 s (% of one core):"
  for i in "${!pids[@]}"; do
    pct=$(echo "scale=1; (${t1[$i]} - ${t0[$i]}) * 100 / $hz / 10" | bc -l)
    total=$(echo "$total + $pct" | bc -l)
    line+=" ${names[$i]} $pct,"
  done
  echo "$line total $total"

  ha=(); ab=()
  for r in $(seq "$rounds"); do
    sleep 5; ha+=("$(rtt_us host alpha)")
    sleep 5; ab+=("$(rtt_us alpha beta)")
  done
  echo "doorbell $mode: first round trip after 5 s idle (µs): host->alpha ${ha[*]} (median $(median "${ha[@]}")); alpha->beta ${ab[*]} (median $(median "${ab[@]}"))"
  "$mkctl" daemon stop >/dev/null
  # Nothing of this mode may run into the next one's figures.
  for p in "${pids[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.2; done; done
  rm -rf "$MKCTL_RUN_DIR"
done
