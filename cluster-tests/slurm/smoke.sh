#!/usr/bin/env bash
# smoke.sh - end-to-end check of the Slurm lane: up (3 nodes), one 'sbatch -N 3 --wait' job
# that runs 'srun -N 3 hostname' and records the batch and step SLURM_* environment, checks,
# down (always, via trap). Exit 0 only if every check passed. Needs root.
#
#   cluster-tests/slurm/smoke.sh          (KRUN_SLURM_* knobs of cluster.sh apply, except NODES)
set -euo pipefail

HERE=$(dirname "$(readlink -f "$0")")
CLUSTER=$HERE/cluster.sh
export KRUN_SLURM_NODES=3
STATE=${KRUN_SLURM_STATE:-/var/tmp/krun-slurm}

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
FAILS=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; FAILS=$((FAILS + 1)); }

T_UP=- T_JOB=- T_DOWN=-
finish() {
    local rc=$? t0
    trap - EXIT
    t0=$(now)
    "$CLUSTER" down || { echo "FAIL: cluster.sh down"; rc=1; }
    T_DOWN=$(since "$t0")
    echo "timings: up ${T_UP}s, job ${T_JOB}s, down ${T_DOWN}s"
    if [ "$rc" -eq 0 ] && [ "$FAILS" -eq 0 ]; then echo "smoke: OK"; exit 0; fi
    echo "smoke: FAILED (rc $rc, $FAILS failed checks; logs in $STATE/log)"
    exit 1
}
trap finish EXIT
trap 'exit 130' INT TERM

t0=$(now)
"$CLUSTER" up
T_UP=$(since "$t0")

JOBS=$STATE/jobs
mkdir -p "$JOBS"
SCRIPT=$(mktemp "$JOBS/smoke.XXXXXX.sbatch")
OUT=${SCRIPT%.sbatch}.out
cat >"$SCRIPT" <<'EOF'
#!/bin/bash
echo "== hosts"
srun -N 3 --ntasks-per-node=1 hostname
echo "== batch env"
env | grep ^SLURM_ | sort
echo "== step env"
srun -N 3 --ntasks-per-node=1 bash -c 'env | grep ^SLURM_ | sed "s/^/task$SLURM_PROCID /"'
echo "== end"
EOF
chmod 755 "$SCRIPT"

t0=$(now)
jid=$(timeout 120 "$CLUSTER" exec sbatch --parsable -N 3 --ntasks-per-node=1 --wait -o "$OUT" "$SCRIPT") ||
    fail "sbatch -N 3 --wait exited non-zero (job ${jid:-?})"
T_JOB=$(since "$t0")
jid=${jid%%;*}
echo "job ${jid:-?} done in ${T_JOB}s (sbatch --wait polls, so this includes up to ~10 s of its"
echo "back-off); output $OUT, relevant lines:"
grep -E '^(== |node|SLURM_(JOB_NODELIST|TASKS_PER_NODE)=|task. SLURM_(STEP_NODELIST|JOB_NODELIST|TASKS_PER_NODE)=)' "$OUT" 2>/dev/null |
    sed 's/^/    /' || true

section() { sed -n "/^== $1\$/,/^== /p" "$OUT" | grep -v '^== '; }
hosts=$(section hosts | sort -u)
if [ "$(grep -c '^node[0-9]' <<<"$hosts")" -eq 3 ]; then
    pass "srun -N 3 hostname: 3 distinct hostnames ($(paste -sd' ' <<<"$hosts"))"
else
    fail "srun -N 3 hostname gave: $(paste -sd' ' <<<"$hosts")"
fi
benv=$(section 'batch env')
senv=$(section 'step env')
for v in SLURM_JOB_NODELIST SLURM_TASKS_PER_NODE; do
    val=$(grep -m1 "^$v=" <<<"$benv" | cut -d= -f2-) || true
    [ -n "$val" ] && pass "batch: $v=$val" || fail "batch: $v not set"
done
for v in SLURM_STEP_NODELIST SLURM_JOB_NODELIST SLURM_TASKS_PER_NODE; do
    n=$(grep -cE "^task[0-2] $v=." <<<"$senv" || true)
    [ "$n" -eq 3 ] && pass "step: $v set in all 3 tasks ($(grep -m1 "^task0 $v=" <<<"$senv" | cut -d= -f2-))" ||
        fail "step: $v set in $n of 3 tasks"
done
[ "$(grep -m1 '^task0 SLURM_STEP_NODELIST=' <<<"$senv" | cut -d= -f2-)" = "node[1-3]" ] &&
    pass "SLURM_STEP_NODELIST is node[1-3]" || fail "SLURM_STEP_NODELIST is not node[1-3]"
rm -f "$SCRIPT"
