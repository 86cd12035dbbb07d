#!/usr/bin/env bash
# The main job: a local multi-node krun cluster on this machine running the built-in RMA
# exchange workload. Extra arguments go to krun (e.g. --local 4 --provider shm).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release -p launcher --bins
[ $# -gt 0 ] || set -- --local 3
exec ./target/release/krun "$@"
