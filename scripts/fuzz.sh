#!/usr/bin/env bash
# The fuzz lane: coverage-guided fuzzing of every decoder target (fuzz/src) under AFL++,
# on the stable toolchain.
#
#   scripts/fuzz.sh [--execs N] [--seconds T] [--jobs J] [--brief] [--no-report] [TARGET...]
#
# Each target runs until N executions (default 10^7, the issue's bar) or T seconds (default
# 600), whichever comes first, at `nice -n 19` (benchmarks share the machine), J targets at
# a time (default 1), on its committed corpus (fuzz/corpus/<target>). AFL++'s output goes
# to target/fuzz-out/<target>/default; crashes land in its crashes/ directory and are listed
# at the end. Then bench/results/fuzz.json and fuzz.png are written (fuzz-report).
# --brief: 5 seconds per target, no report (a smoke run; CI replays the corpora instead,
# `cargo nextest run -p fuzz`, which needs no AFL).
#
# How it works without nightly or cargo-afl: Debian's afl++ package provides afl-fuzz and
# its runtime (afl-compiler-rt.o: fork server, persistent mode, coverage map). The targets
# are compiled by stable rustc with LLVM's SanitizerCoverage pass (-C passes=sancov-module,
# trace-pc-guard callbacks, which that runtime implements) and linked with the runtime;
# fuzz/afl/src/main.rs is the persistent-mode harness. The build is its own workspace
# (fuzz/afl), so the main workspace's build never needs AFL.
set -euo pipefail
cd "$(dirname "$0")/.."
command="scripts/fuzz.sh $*"

execs=10000000
seconds=600
jobs=1
report=1
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --execs) execs="$2"; shift 2 ;;
        --seconds) seconds="$2"; shift 2 ;;
        --jobs) jobs="$2"; shift 2 ;;
        --brief) seconds=5; report=0; shift ;;
        --no-report) report=0; shift ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done

runtime=/usr/lib/afl/afl-compiler-rt.o
if ! command -v afl-fuzz >/dev/null || [ ! -f "$runtime" ]; then
    echo "fuzz.sh: installing afl++ (Debian package)" >&2
    if [ "$(id -u)" = 0 ]; then
        apt-get install -y --no-install-recommends afl++ >/dev/null \
            || { apt-get update >/dev/null && apt-get install -y --no-install-recommends afl++ >/dev/null; }
    else
        sudo apt-get install -y --no-install-recommends afl++ >/dev/null
    fi
fi
[ -f "$runtime" ] || { echo "fuzz.sh: $runtime missing after installing afl++" >&2; exit 1; }

host=$(rustc -vV | sed -n 's/^host: //p')
tdir="$PWD/target/fuzz-afl"
echo "fuzz.sh: building the instrumented targets ($tdir)" >&2
# --target: RUSTFLAGS then apply to the targets only, not to build scripts and proc macros.
(
    cd fuzz/afl
    RUSTFLAGS="-C passes=sancov-module \
        -C llvm-args=-sanitizer-coverage-level=3 \
        -C llvm-args=-sanitizer-coverage-trace-pc-guard \
        -C llvm-args=-sanitizer-coverage-prune-blocks=0 \
        --cfg fuzzing \
        -C link-arg=$runtime" \
    CARGO_INCREMENTAL=0 cargo build --release --target "$host" --target-dir "$tdir"
)
bin="$tdir/$host/release/krun-fuzz"

[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <("$bin" --list)
[ ${#targets[@]} -gt 0 ] || { echo "fuzz.sh: '$bin --list' named no target" >&2; exit 1; }
out="$PWD/target/fuzz-out"
mkdir -p "$out"

run_one() {
    local t="$1"
    rm -rf "${out:?}/$t"
    # AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES: core dumps may be piped to a handler here;
    # AFL_SKIP_CPUFREQ / AFL_NO_AFFINITY: a shared machine, no governor or core of our own.
    # (Not AFL_SKIP_BIN_CHECK, whatever its value: it would skip the binary check that
    # finds the persistent-mode signature, and every input would cost a fork.)
    AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 \
        KRUN_FUZZ_DIR="$out/.l4" \
        nice -n 19 afl-fuzz -i "fuzz/corpus/$t" -o "$out/$t" -t 1000 -V "$seconds" -E "$execs" \
        -- "$bin" "$t" >"$out/$t.log" 2>&1 || echo "fuzz.sh: afl-fuzz for $t exited $? (see $out/$t.log)" >&2
    local s="$out/$t/default/fuzzer_stats"
    if [ -f "$s" ]; then
        echo "$t: $(sed -n 's/^execs_done *: //p' "$s") execs, $(sed -n 's/^saved_crashes *: //p' "$s") crashes, $(sed -n 's/^saved_hangs *: //p' "$s") hangs"
    fi
}

running=0
for t in "${targets[@]}"; do
    run_one "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n || true
        running=$((running - 1))
    fi
done
wait || true

crashes=$(find "$out" -path '*/crashes/id:*' 2>/dev/null | sort || true)
if [ -n "$crashes" ]; then
    echo "fuzz.sh: crashes (reproduce with: $bin TARGET < FILE):"
    echo "$crashes"
fi
if [ "$report" = 1 ]; then
    CARGO_INCREMENTAL=0 cargo run -q -p fuzz --bin fuzz-report -- "$out" \
        "until $execs executions or $seconds s per target, nice 19, $jobs at a time" "$command"
fi
[ -z "$crashes" ]
