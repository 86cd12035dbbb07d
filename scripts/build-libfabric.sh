#!/usr/bin/env bash
# Builds libfabric 2.1.0 into /opt/libfabric-2.1 with only the providers krun opens (tcp,
# ofi_rxm, shm, verbs). Why: Debian bookworm's 1.17 costs every process ~0.15 s of provider
# constructors and ~0.3 s of fi_getinfo, and its shm provider is slower; this reduced 2.1 build
# opens a tcp;ofi_rxm endpoint a few ms after process start. Source: the upstream tarball of
# Debian's libfabric 2.1.0 source package (trixie/sid), fetched with apt through a private
# configuration (the system's apt sources are untouched), checked against its sha256.
# About a minute on 2 cores; does nothing when the library is already there.
#
# libfabric-sys links against $PREFIX/lib with an rpath (the soname equals 1.17's).
set -euo pipefail
VERSION=2.1.0
SHA256=1a66369772d5bb151737214af1c478993e969cf298e8f9ed369e7a2ab8d8c6df
PREFIX=${KRUN_LIBFABRIC_PREFIX:-/opt/libfabric-2.1}
if [ -f "$PREFIX/lib/libfabric.so.1" ] && [ -x "$PREFIX/bin/fi_info" ] &&
  "$PREFIX/bin/fi_info" --version 2>/dev/null | grep -q "libfabric: $VERSION"; then
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "build-libfabric: run as root to build $PREFIX" >&2; exit 1; }
echo "build-libfabric: building libfabric $VERSION into $PREFIX (about a minute)"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends build-essential autoconf automake libtool pkg-config \
  libibverbs-dev librdmacm-dev libnl-3-dev libnl-route-3-dev gnupg debian-archive-keyring >/dev/null
work=$(mktemp -d /var/tmp/krun-libfabric-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
mirror=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/ && $i !~ /security/) {print $i; exit}}' \
  /etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || { echo "build-libfabric: no Debian mirror found in the apt configuration" >&2; exit 1; }
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/src"
for suite in trixie sid; do
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" >>"$work/sources.list"
done
apt_private=(-o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache")
apt-get "${apt_private[@]}" update -qq
chmod 777 "$work/src"
# Only the upstream tarball is needed; the Debian packaging files are not used.
(cd "$work/src" && apt-get "${apt_private[@]}" source --download-only "libfabric=$VERSION-1.1" >/dev/null 2>&1) || true
tarball=$(ls "$work"/src/libfabric_"$VERSION".orig.tar.* 2>/dev/null | head -1)
[ -n "$tarball" ] || { echo "build-libfabric: could not download libfabric_$VERSION.orig.tar.* from $mirror" >&2; exit 1; }
echo "$SHA256  $tarball" | sha256sum -c --quiet - || { echo "build-libfabric: checksum mismatch for $tarball" >&2; exit 1; }
tar -C "$work" -xf "$tarball"
src=$(ls -d "$work"/libfabric-"$VERSION" 2>/dev/null || ls -d "$work"/libfabric-* | head -1)
cd "$src"
{ [ -x configure ] || ./autogen.sh; } >"$work/build.log" 2>&1 || { tail -30 "$work/build.log" >&2; exit 1; }
{ ./configure --prefix="$PREFIX" --enable-only --enable-tcp --enable-rxm --enable-shm --enable-verbs \
    --disable-static && make -j"$(nproc)" && make install; } >>"$work/build.log" 2>&1 \
  || { tail -30 "$work/build.log" >&2; exit 1; }
"$PREFIX/bin/fi_info" --version
