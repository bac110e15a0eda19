#!/usr/bin/env bash
# Sets everything up and runs the main job on the default topology
# (configs/demo.toml): validate it and show how it splits the machine.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
"$repo/scripts/setup.sh"
mkctl=(cargo run --quiet --bin mkctl --)
config=${1:-configs/demo.toml}

echo "== mkctl host"
"${mkctl[@]}" host
echo
echo "== mkctl validate $config"
"${mkctl[@]}" validate "$config"
echo
echo "== mkctl plan $config"
"${mkctl[@]}" plan "$config"
