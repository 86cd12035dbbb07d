#!/usr/bin/env bash
# The soft-RoCE lane: real InfiniBand verbs traffic for krun's verbs backend on machines
# whose kernel has no RDMA. Builds fabric's verbs selftest on the host, boots Debian's stock
# kernel (which ships rdma_rxe) under QEMU in a throw-away initramfs, creates two soft-RoCE
# devices rxe0/rxe1 on a veth pair inside the guest, and runs the selftest between them.
# The guest has no NIC. Exit 0 only if every check passed; the last line is
# `softroce lane: N passed, M failed`.
#
#   cluster-tests/softroce/run.sh        (root; KRUN_SOFTROCE_WORK=dir caches the kernel)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${KRUN_SOFTROCE_WORK:-/var/tmp/krun-softroce}
LIMIT=${KRUN_SOFTROCE_TIMEOUT:-600}
T0=$(date +%s)
say() { echo "[softroce $(( $(date +%s) - T0 ))s] $*"; }
fail() { echo "softroce lane: ERROR: $*" >&2; echo "softroce lane: 0 passed, 1 failed"; exit 1; }
[ "$(id -u)" = 0 ] || fail "needs root (apt-get, qemu)"
mkdir -p "$WORK"

# --- packages ------------------------------------------------------------------------------
need="qemu-system-x86 busybox-static kmod cpio xz-utils zstd iproute2 libibverbs-dev ibverbs-providers"
missing=""
for p in $need; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  say "apt-get install$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# --- kernel: Debian's stock image, downloaded once, modules resolved with modprobe ---------
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$KPKG" ] || { apt-get update -qq; KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}'); }
[ -n "$KPKG" ] || fail "cannot find the kernel package behind linux-image-amd64"
KVER=${KPKG#linux-image-}
KROOT=$WORK/$KPKG
if [ ! -f "$KROOT/.complete" ]; then
  say "fetching $KPKG"
  rm -rf "$KROOT" "$WORK/deb"; mkdir -p "$KROOT" "$WORK/deb"
  (cd "$WORK/deb" && apt-get download -qq -o APT::Sandbox::User=root "$KPKG") || fail "apt-get download $KPKG"
  dpkg-deb -x "$WORK"/deb/*.deb "$KROOT"
  depmod -b "$KROOT" "$KVER"
  rm -rf "$WORK/deb"; touch "$KROOT/.complete"
fi
MODULES="virtio_pci virtio_rng veth crc32_generic rdma_rxe"
closure=$(for m in $MODULES; do modprobe -d "$KROOT" -S "$KVER" --show-depends "$m"; done | awk '$1=="insmod"{print $2}' | awk '!seen[$0]++')
[ -n "$closure" ] || fail "modules $MODULES not found in $KPKG"

# --- the program under test ---------------------------------------------------------------
say "building the verbs selftest"
(cd "$ROOT" && cargo build --release -q -p fabric --example verbs_selftest)
PROG=$ROOT/target/release/examples/verbs_selftest

# --- initramfs -------------------------------------------------------------------------------
R=$WORK/rootfs; rm -rf "$R"
mkdir -p "$R"/{bin,sbin,etc/libibverbs.d,proc,sys,dev,tmp,lib/modules,usr/lib/x86_64-linux-gnu/libibverbs,lib64}
cp /bin/busybox "$R/bin/busybox"
for a in sh mount mkdir cat echo sleep grep poweroff modprobe insmod sed uptime basename timeout; do ln -sf busybox "$R/bin/$a"; done
cp "$(command -v ip)" "$(command -v rdma)" "$R/bin/"
cp "$PROG" "$R/bin/verbs_selftest"
cp /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so "$R/usr/lib/x86_64-linux-gnu/libibverbs/"
cp /etc/libibverbs.d/rxe.driver "$R/etc/libibverbs.d/"
for f in "$R"/bin/ip "$R"/bin/rdma "$R"/bin/verbs_selftest "$R"/usr/lib/x86_64-linux-gnu/libibverbs/*.so; do
  ldd "$f" | awk '/=> \//{print $3} /^\t\//{print $1}'
done | sort -u | while read -r lib; do
  case "$lib" in */ld-linux-x86-64.so.2) cp -L "$lib" "$R/lib64/";; *) cp -L "$lib" "$R/usr/lib/x86_64-linux-gnu/";; esac
done
cp -L /lib/x86_64-linux-gnu/libgcc_s.so.1 "$R/usr/lib/x86_64-linux-gnu/" 2>/dev/null || true
ln -s ../usr/lib/x86_64-linux-gnu "$R/lib/x86_64-linux-gnu"
n=0
for ko in $closure; do
  n=$((n + 1)); dst=$R/lib/modules/$(printf '%02d' $n)-$(basename "${ko%%.ko*}").ko
  case "$ko" in *.xz) xz -dc "$ko" >"$dst";; *.zst) zstd -qdc "$ko" >"$dst";; *) cp "$ko" "$dst";; esac
done
cat >"$R/init" <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /tmp
echo "GUEST up $(cut -d' ' -f1 /proc/uptime)s"
for ko in /lib/modules/*.ko; do insmod "$ko" || echo "GUEST insmod $ko failed"; done
# iproute2 by full path: busybox's sh prefers its own (too small) ip applet.
IP=/bin/ip
$IP link set lo up
$IP link add veth0 type veth peer name veth1
$IP addr add 10.77.0.1/24 dev veth0; $IP addr add 10.77.0.2/24 dev veth1
$IP link set veth0 up; $IP link set veth1 up
# Both devices share the initial namespace (rxe only receives there); make the kernel accept
# RoCE packets sourced from a local address arriving on the other veth end.
for c in all default veth0 veth1; do
  echo 1 >/proc/sys/net/ipv4/conf/$c/accept_local; echo 0 >/proc/sys/net/ipv4/conf/$c/rp_filter
done
/bin/rdma link add rxe0 type rxe netdev veth0 && /bin/rdma link add rxe1 type rxe netdev veth1 || echo "GUEST rdma link add failed"
i=0
while [ $i -lt 100 ]; do
  grep -q ACTIVE /sys/class/infiniband/rxe0/ports/1/state 2>/dev/null && grep -q ACTIVE /sys/class/infiniband/rxe1/ports/1/state 2>/dev/null && break
  sleep 0.1; i=$((i + 1))
done
SOFTROCE_DEV0=rxe0 SOFTROCE_DEV1=rxe1 KRUN_FABRIC_PROVIDER=verbs KRUN_FABRIC_BIND=127.0.0.1 \
  timeout 300 /bin/verbs_selftest
echo "GUEST selftest exit $?"
poweroff -f
INIT
chmod +x "$R/init"
(cd "$R" && find . | cpio -o -H newc --quiet) | gzip -1 >"$WORK/initrd.gz"

# --- boot --------------------------------------------------------------------------------
LOG=$WORK/console.log
say "booting $KPKG under QEMU (TCG, no NIC)"
set +e
timeout "$LIMIT" qemu-system-x86_64 -m 1024 -smp 2 -accel tcg,thread=multi -nodefaults -no-user-config \
  -display none -serial stdio -no-reboot -device virtio-rng-pci \
  -kernel "$KROOT/boot/vmlinuz-$KVER" -initrd "$WORK/initrd.gz" \
  -append "console=ttyS0 quiet panic=-1 oops=panic" </dev/null >"$LOG" 2>&1
qemu_rc=$?
set -e
tr -d '\r' <"$LOG" | grep -aE '^(GUEST|VERBS_TEST|verbs selftest|provider)' | sed 's/^/  /'
pass=$(tr -d '\r' <"$LOG" | grep -ac '^VERBS_TEST .* PASS' || true)
failed=$(tr -d '\r' <"$LOG" | grep -ac '^VERBS_TEST .* FAIL' || true)
say "guest finished (qemu exit $qemu_rc); console log $LOG"
if [ "$pass" -eq 0 ] || ! tr -d '\r' <"$LOG" | grep -aq '^GUEST selftest exit 0'; then
  failed=$((failed > 0 ? failed : 1))
  echo "softroce lane: $pass passed, $failed failed"
  exit 1
fi
echo "softroce lane: $pass passed, $failed failed"
