#!/usr/bin/env bash
# Writes the man pages of krun (one per subcommand) and krund into DIR (default target/man),
# generated from the same clap definitions the binaries parse with (launcher/src/cli.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-target/man}"
cargo build --quiet --release -p launcher --bin krun
target/release/krun man "$dir"
ls "$dir"
