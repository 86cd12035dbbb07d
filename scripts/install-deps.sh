#!/usr/bin/env bash
# Installs what krun needs on a Debian bookworm machine (as root), skipping what is present.
set -euo pipefail
PKGS="build-essential pkg-config clang libclang-dev libfabric-dev libfabric-bin libibverbs-dev librdmacm-dev ibverbs-providers rdma-core libhwloc-dev libudev-dev libzstd-dev protobuf-compiler gfortran iperf3 iproute2 procps util-linux slurmctld slurmd slurm-client munge openssh-server openssh-client fonts-dejavu-core mpich libmpich-dev libpmix-dev libpmi2-0-dev openmpi-bin libopenmpi-dev"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing packages:$missing (run as root to install them)" >&2
    exit 1
  fi
  echo "install-deps: apt-get install$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: cargo not found; install Rust with rustup (https://rustup.rs)" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
  done
fi
# libfabric 2.1 with only krun's providers (built once into /opt/libfabric-2.1; libfabric-sys
# builds against it and loads it on first use).
"$(dirname "$0")/build-libfabric.sh"
# CRIU 4.x for the ghost crate's transparent checkpointer (built once into /opt/criu).
"$(dirname "$0")/build-criu.sh"
