#!/usr/bin/env bash
# How fast an idle link wakes up between kernels under QEMU, and what an
# idle link costs: boots configs/demo.toml (host + alpha + beta) in a run
# directory of its own, then
#   - ROUNDS times: waits 5 s with no traffic and pings once, host -> alpha
#     and alpha -> beta (one round trip each: two first messages after 5 s
#     of silence, one in each direction), and prints each round trip;
#   - the CPU the daemon and each QEMU process use while nothing is sent
#     (10 s, from /proc/<pid>/stat), and the daemon's wake-ups per second.
# Usage: qemu/wake-latency.sh [rounds]     (after scripts/setup.sh)
# Environment: MKCTL (the mkctl binary, default target/debug/mkctl),
# MKCTL_CACHE, MKCTL_GUEST_INIT (as for mkctl itself).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
rounds=${1:-5}
export MKCTL_CACHE=${MKCTL_CACHE:-$repo/.cache}
mkctl=${MKCTL:-${CARGO_TARGET_DIR:-$repo/target}/debug/mkctl}
export MKCTL_RUN_DIR=${MKCTL_RUN_DIR:-$(mktemp -d /tmp/mk-wake.XXXXXX)}
cleanup() { "$mkctl" daemon stop >/dev/null 2>&1 || true; }
trap cleanup EXIT

"$mkctl" boot configs/demo.toml >/dev/null
status=$("$mkctl" status --json)
pids=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1])["daemon"]; print(d["pid"], " ".join(str(i["pid"]) for i in d["instances"]))' "$status")
names=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1])["daemon"]; print("daemon", " ".join("qemu-"+i["name"] for i in d["instances"]))' "$status")

rtt() { "$mkctl" ping "$1" "$2" --count 1 --json | python3 -c 'import json,sys; print("%.1f" % (json.load(sys.stdin)["rtt_median_ns"] / 1e3))'; }
for r in $(seq "$rounds"); do
  sleep 5
  a=$(rtt host alpha)
  sleep 5
  b=$(rtt alpha beta)
  printf 'round %d: first round trip after 5 s idle: host->alpha %s µs, alpha->beta %s µs\n' "$r" "$a" "$b"
done

# CPU while idle: utime + stime ticks over 10 s, and the daemon's
# voluntary context switches (one per sleep of any of its threads).
ticks() { for p in $pids; do awk '{print $14 + $15}' "/proc/$p/stat"; done; }
switches() { local s=0; for t in /proc/"${pids%% *}"/task/*/status; do s=$((s + $(awk '/^voluntary_ctxt_switches/ {print $2}' "$t"))); done; echo "$s"; }
sleep 2
t0=($(ticks)); s0=$(switches)
sleep 10
t1=($(ticks)); s1=$(switches)
hz=$(getconf CLK_TCK)
i=0
for n in $names; do
  printf 'idle 10 s: %-12s %5.2f%% of a core\n' "$n" "$(echo "(${t1[$i]} - ${t0[$i]}) * 100 / $hz / 10" | bc -l)"
  i=$((i + 1))
done
printf 'idle 10 s: daemon wake-ups %d/s\n' $(( (s1 - s0) / 10 ))
