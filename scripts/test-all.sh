#!/usr/bin/env bash
# Every check a submission must pass: formatting, lints, the whole test suite (unit,
# multi-process, end-to-end), doc tests, and the soft-RoCE verbs lane in a QEMU guest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
step() { echo; echo "=== $* ($(date +%T))"; }

step "cargo fmt --check"
cargo fmt --all --check
step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
step "build (binaries and libghost.so, which the tests start and link against)"
cargo build --workspace
step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  echo "cargo-nextest not installed: using cargo test"
  cargo test --workspace --no-fail-fast
fi
step "doc tests"
cargo test --workspace --doc
step "soft-RoCE verbs lane (QEMU guest, rxe0 <-> rxe1)"
cluster-tests/softroce/run.sh
step "all checks passed"
