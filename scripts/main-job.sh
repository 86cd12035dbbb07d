#!/usr/bin/env bash
# The main job: a local cluster of 3 krund nodes runs the C 2-D heat stencil (6 ranks, halo
# exchange through the rank library) under the coordinated checkpoint policy, which
# checkpoints every rank into the nodes' checkpoint stores (L1 + L2 buddy) every second;
# the result must equal the serial reference's checksum. Extra arguments go to krun (e.g.
# --provider shm). Grid and steps: NX, NY, STEPS.
#
# Not yet: a node killed mid-run and recovered (the HA issue's recovery part).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release -p launcher -p rank
E=target/release/examples-c
mkdir -p "$E"
make -s -C rank/examples/c LIBDIR="$PWD/target/release" OUT="$PWD/$E" "$PWD/$E/heat" "$PWD/$E/heat_serial"
NX=${NX:-256} NY=${NY:-256} STEPS=${STEPS:-1500}
want=$("$E/heat_serial" "$NX" "$NY" "$STEPS" | awk '/checksum/ {print $NF}')
echo "main job: serial reference checksum $want"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
HEAT_STEP_DELAY_US=${HEAT_STEP_DELAY_US:-2000} ./target/release/krun --local 3 -n 6 \
  --checkpoint-interval 1 "$@" "$E/heat" "$NX" "$NY" "$STEPS" 0 | tee "$log"
got=$(awk '/checksum/ {print $NF}' "$log" | tail -1)
if [ "$got" = "$want" ]; then
  echo "main job: the cluster's result equals the serial reference ($got)"
else
  echo "main job: checksum $got differs from the serial reference $want" >&2
  exit 1
fi
