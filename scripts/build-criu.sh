#!/usr/bin/env bash
# Builds CRIU 4.2.1 into /opt/criu (the ghost crate's CRIU backend needs CRIU >= 4: Debian
# bookworm's 3.17 fails on Linux 6.18 kernels). Source: the upstream tarball of Debian sid's
# criu source package, fetched with apt through a private configuration (the system's apt
# sources are not changed). Does nothing when the binary is already there and runs.
set -euo pipefail
VERSION=4.2.1
DEBIAN_VERSION=$VERSION-1
PREFIX=${PREFIX:-/opt/criu}
BIN=$PREFIX/criu-$VERSION/criu/criu
if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "build-criu: run as root to build $BIN" >&2; exit 1; }
echo "build-criu: building CRIU $VERSION into $PREFIX (about a minute)"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends build-essential pkg-config \
  libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler python3-protobuf \
  libnl-3-dev libnet1-dev libcap-dev libbsd-dev libnftables-dev libgnutls28-dev uuid-dev \
  libdrm-dev gnupg debian-archive-keyring >/dev/null
work=$(mktemp -d /var/tmp/krun-criu-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
# The mirror this machine already uses, for the sid source list.
mirror=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/ && $i !~ /security/) {print $i; exit}}' \
  /etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || { echo "build-criu: no Debian mirror found in the apt configuration" >&2; exit 1; }
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/src"
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" >"$work/sources.list"
apt_private=(-o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache")
apt-get "${apt_private[@]}" update -qq
chmod 777 "$work/src"
# Only the verified upstream tarball is needed; the Debian packaging may be absent.
(cd "$work/src" && apt-get "${apt_private[@]}" source --download-only "criu=$DEBIAN_VERSION" >/dev/null 2>&1) || true
tarball=$(ls "$work"/src/criu_"$VERSION".orig.tar.* 2>/dev/null | head -1)
[ -n "$tarball" ] || { echo "build-criu: could not download criu_$VERSION.orig.tar.* from $mirror (sid)" >&2; exit 1; }
mkdir -p "$PREFIX"
tar -C "$PREFIX" -xf "$tarball"
if ! make -C "$PREFIX/criu-$VERSION" -j"$(nproc)" criu >"$work/make.log" 2>&1; then
  tail -30 "$work/make.log" >&2
  exit 1
fi
"$BIN" --version
