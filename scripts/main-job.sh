#!/usr/bin/env bash
# The main job: a local cluster of 3 krund nodes and 1 spare runs the C 2-D heat stencil
# (6 ranks, halo exchange through the rank library) under the coordinated checkpoint
# policy, which checkpoints every rank into the nodes' checkpoint stores (L1 + L2 buddy)
# every second. After the 3rd committed checkpoint krun SIGKILLs node 1 (its krund and its
# ranks): ranks 2-3 restart on the spare from the last commit (their images fetched from
# the store), the others roll back to it, and the job goes on; the result must equal the
# serial reference's checksum and krun's summary must count the recovery. Extra arguments
# go to krun (e.g. --provider shm). Grid and steps: NX, NY, STEPS; INJECT (default
# node=1@3ckpt, "none" to run without a failure).
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
INJECT=${INJECT:-node=1@3ckpt}
inject=()
[ "$INJECT" = none ] || inject=(--inject-failure "$INJECT")
HEAT_STEP_DELAY_US=${HEAT_STEP_DELAY_US:-2000} ./target/release/krun --local 3 --spares 1 -n 6 \
  --checkpoint-interval 1 "${inject[@]}" "$@" "$E/heat" "$NX" "$NY" "$STEPS" 0 2>&1 | tee "$log"
got=$(awk '/ checksum / {print $NF}' "$log" | tail -1)
if [ "$INJECT" != none ] && ! grep -q "1 node failure, 1 recovery" "$log"; then
  echo "main job: krun's summary does not show the recovery" >&2
  exit 1
fi
if [ "$got" = "$want" ]; then
  echo "main job: the cluster's result equals the serial reference ($got)"
else
  echo "main job: checksum $got differs from the serial reference $want" >&2
  exit 1
fi
