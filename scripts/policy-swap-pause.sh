#!/bin/sh
# Measures the pause a policy swap costs the ranks, against a plain coordinated checkpoint:
# the heat stencil (6 ranks, krun --local 3, checkpoints on request), N `krun checkpoint`,
# then N `krun policy load` alternating between the example module and the built-in
# policy. Prints each checkpoint's "ranks held" and each swap's answer, then the medians.
# Needs: cargo build -p launcher -p rank -p policy-module-example
set -eu
N=${N:-5}
T=$(cd "$(dirname "$0")/.." && pwd)/target/debug
D=$(mktemp -d /tmp/krun-swap-pause.XXXXXX)
mkdir -m 700 "$D/xdg"
export XDG_RUNTIME_DIR="$D/xdg" KRUN_GHOST_DIR="$D/ghost" KRUN_STORE_ARENA_MIB=16
unset KRUN_GHOST_OWNER KRUN_GHOST_RESTORE KRUN_STORE_LEVEL KRUN_STORE_DISK 2>/dev/null || true
make -s -C "$(dirname "$0")/../rank/examples/c" LIBDIR="$T" OUT="$D" >/dev/null
printf 'module = "%s"\n' "$T/libpolicy_module_example.so" > "$D/module.toml"
printf 'policy = "coordinated"\n' > "$D/builtin.toml"
HEAT_STEP_DELAY_US=20000 "$T/krun" --local 3 -n 6 "$D/heat" 48 40 100000 0 >"$D/out" 2>"$D/err" &
KRUN=$!
trap 'kill $KRUN 2>/dev/null; wait $KRUN 2>/dev/null; rm -rf "$D"' EXIT
i=0
until "$T/krun" status --json 2>/dev/null | grep -q '"running"'; do
  i=$((i+1)); [ $i -lt 600 ] || { echo "the job never ran"; exit 1; }; sleep 0.1
done
sleep 3
for i in $(seq "$N"); do
  "$T/krun" checkpoint >/dev/null
  sleep 2
done
for i in $(seq "$N"); do
  if [ $((i % 2)) = 1 ]; then f=module; else f=builtin; fi
  "$T/krun" policy load "$D/$f.toml" | tee -a "$D/swaps"
  sleep 1
done
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
plain=$(grep 'committed (asked by krun checkpoint)' "$D/err" | head -n "$N" | sed 's/.*ranks held \([0-9.]*\) s.*/\1/')
swap_held=$(sed 's/.*ranks held \([0-9.]*\) s.*/\1/' "$D/swaps")
swap_ms=$(sed 's/.*replaced in \([0-9.]*\) ms.*/\1/' "$D/swaps")
echo "plain checkpoints, ranks held (s): $(echo $plain)"
echo "swaps, ranks held for the swap's checkpoint (s): $(echo $swap_held)"
echo "swaps, policy replaced (ms, ranks running): $(echo $swap_ms)"
echo "median: plain checkpoint $(echo "$plain" | median) s; swap pause $(echo "$swap_held" | median) s (+ $(echo "$swap_ms" | median) ms replacing, ranks not held)"
