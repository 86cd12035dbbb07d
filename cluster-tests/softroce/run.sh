#!/usr/bin/env bash
# The soft-RoCE lane: real InfiniBand verbs traffic for krun's verbs backend on machines
# whose kernel has no RDMA support.
#
#   1. installs what is missing (apt-get) and builds fabric's verbs selftest on the host;
#   2. fetches Debian's stock kernel package once (apt-get download + dpkg-deb, cached in
#      $KRUN_SOFTROCE_WORK, default /var/tmp/krun-softroce) - it ships rdma_rxe;
#   3. packs a small initramfs: busybox, iproute2's ip/rdma, the selftest and the shared
#      libraries they need (found with ldd), the rxe provider, the kernel modules;
#   4. boots it under QEMU TCG with no NIC; the guest puts rxe0/rxe1 on a veth pair (both
#      in the initial namespace: the 6.1 rxe driver only receives there) and runs the
#      selftest in two processes, one endpoint per device.
#
# Exits 0 only if every check passed; the last line is `softroce lane: N passed, M failed`.
# Knobs: KRUN_SOFTROCE_WORK (cache dir), KRUN_SOFTROCE_TIMEOUT (guest limit, s, default 300),
# KRUN_SOFTROCE_NO_APT=1 (never call apt-get), KRUN_SOFTROCE_NO_BUILD=1 (use the built binary).
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${KRUN_SOFTROCE_WORK:-/var/tmp/krun-softroce}
LIMIT=${KRUN_SOFTROCE_TIMEOUT:-300}
T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
say() { echo "[softroce $(elapsed)s] $*"; }
fail() { echo "softroce lane: ERROR: $*" >&2; echo "softroce lane: 0 passed, 1 failed"; exit 1; }

[ "$(id -u)" = 0 ] || fail "needs root (apt-get, qemu, device nodes in the initramfs)"
[ "$(uname -m)" = x86_64 ] || fail "needs an x86_64 host"
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
# One lane run per work dir at a time: the rootfs and the initramfs are rebuilt in place.
exec 9>"$WORK/.lock"
flock -w 600 9 || fail "another softroce lane run holds $WORK/.lock"

QPID=""
cleanup() { if [ -n "$QPID" ]; then kill "$QPID" 2>/dev/null || true; fi; }
trap cleanup EXIT

# ------------------------------------------------------------------------------ packages
# Guest side: qemu, busybox, kmod (depmod/modprobe on the host), cpio, decompressors,
# iproute2 (ip, rdma). Host build: the rdma-core headers rdma-sys binds with bindgen.
PKGS="qemu-system-x86 busybox-static kmod cpio gzip xz-utils zstd iproute2 util-linux
      libibverbs-dev librdmacm-dev ibverbs-providers libclang-dev pkg-config"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  [ "${KRUN_SOFTROCE_NO_APT:-0}" = 1 ] && fail "missing packages:$missing (KRUN_SOFTROCE_NO_APT=1)"
  say "apt-get install$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >"$WORK/apt.log" 2>&1 || fail "apt-get update failed (see $WORK/apt.log)"
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >>"$WORK/apt.log" 2>&1 \
    || fail "apt-get install$missing failed (see $WORK/apt.log)"
fi

# ------------------------------------------------------------------------------- kernel
# The kernel linux-image-amd64 points at, unpacked (never installed) once into the cache.
kernel_pkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
KPKG=$(kernel_pkg)
if [ -z "$KPKG" ] && [ "${KRUN_SOFTROCE_NO_APT:-0}" != 1 ]; then apt-get update -qq >/dev/null 2>&1 || true; KPKG=$(kernel_pkg); fi
if [ -z "$KPKG" ]; then   # no apt metadata: use a cached kernel if there is one
  KPKG=$(find "$WORK" -maxdepth 2 -name .complete -path '*/linux-image-*' 2>/dev/null | head -1 | xargs -r dirname | xargs -r basename)
fi
[ -n "$KPKG" ] || fail "cannot find the kernel package behind linux-image-amd64"
KVER=${KPKG#linux-image-}
KROOT=$WORK/$KPKG
if [ ! -f "$KROOT/.complete" ]; then
  say "downloading $KPKG"
  rm -rf "$KROOT" "$WORK/deb"; mkdir -p "$KROOT" "$WORK/deb"
  (cd "$WORK/deb" && apt-get download -qq -o APT::Sandbox::User=root "$KPKG" >/dev/null) \
    || fail "apt-get download $KPKG failed"
  dpkg-deb -x "$WORK"/deb/*.deb "$KROOT"
  depmod -b "$KROOT" "$KVER"
  rm -rf "$WORK/deb"; touch "$KROOT/.complete"
fi
# Under TCG, booting the uncompressed vmlinux through its PVH entry skips the firmware and
# the in-guest decompression (seconds). Extract it once; fall back to the bzImage.
KIMG=$KROOT/boot/vmlinuz-$KVER
if grep -q '^CONFIG_PVH=y' "$KROOT/boot/config-$KVER" 2>/dev/null; then
  if [ ! -s "$KROOT/vmlinux-pvh" ]; then
    for kind in 'xz:\xfd7zXZ' 'zstd:\x28\xb5\x2f\xfd' 'gzip:\x1f\x8b\x08'; do
      tool=${kind%%:*}; magic=$(printf "${kind#*:}")
      off=$(grep -abo -m1 "$magic" "$KIMG" 2>/dev/null | head -1 | cut -d: -f1 || true)
      [ -n "$off" ] || continue
      tail -c +$((off + 1)) "$KIMG" | "$tool" -dc >"$KROOT/vmlinux.tmp" 2>/dev/null || true
      if [ "$(head -c4 "$KROOT/vmlinux.tmp" 2>/dev/null)" = $'\x7fELF' ]; then
        mv "$KROOT/vmlinux.tmp" "$KROOT/vmlinux-pvh"; break
      fi
    done
    rm -f "$KROOT/vmlinux.tmp"
  fi
  [ -s "$KROOT/vmlinux-pvh" ] && KIMG=$KROOT/vmlinux-pvh
fi
# crc32_generic: rxe computes its ICRC with crc32 ("rdma link add" fails without it).
MODULES="virtio_pci virtio_rng veth crc32_generic rdma_rxe"
closure=$(for m in $MODULES; do modprobe -d "$KROOT" -S "$KVER" --show-depends "$m"; done \
          | awk '$1=="insmod"{print $2}' | awk '!seen[$0]++')
[ -n "$closure" ] || fail "modules $MODULES not found in $KPKG"
say "kernel $KVER ready ($(basename "$KIMG"))"

# --------------------------------------------------------------------- program under test
PROG=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/verbs_selftest
if [ "${KRUN_SOFTROCE_NO_BUILD:-0}" != 1 ]; then
  say "cargo build --release -p fabric --example verbs_selftest"
  (cd "$ROOT" && cargo build --release -q -p fabric --example verbs_selftest) || fail "build failed"
fi
[ -x "$PROG" ] || fail "$PROG not built"

# ------------------------------------------------------------------------------ initramfs
R=$WORK/rootfs; rm -rf "$R"
mkdir -p "$R"/usr/bin "$R"/usr/lib/x86_64-linux-gnu/libibverbs "$R"/usr/lib64 "$R"/etc/libibverbs.d \
         "$R"/proc "$R"/sys "$R"/dev "$R"/tmp "$R"/modules
ln -s usr/bin "$R/bin"; ln -s usr/bin "$R/sbin"; ln -s usr/lib "$R/lib"; ln -s usr/lib64 "$R/lib64"
cp /bin/busybox "$R/usr/bin/busybox"
for a in sh mount cat echo sleep grep sed cut basename insmod poweroff timeout sync; do
  ln -s busybox "$R/usr/bin/$a"
done
cp "$(command -v ip)" "$(command -v rdma)" "$R/usr/bin/"     # iproute2, not busybox's applets
cp "$PROG" "$R/usr/bin/verbs_selftest"
cp /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so "$R/usr/lib/x86_64-linux-gnu/libibverbs/"
cp /etc/libibverbs.d/rxe.driver "$R/etc/libibverbs.d/"
for f in "$R"/usr/bin/ip "$R"/usr/bin/rdma "$R"/usr/bin/verbs_selftest "$R"/usr/lib/x86_64-linux-gnu/libibverbs/*.so; do
  ldd "$f" | awk '$2=="=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'
done | sort -u | while read -r lib; do
  case "$lib" in */ld-linux-x86-64.so.2) cp -L "$lib" "$R/usr/lib64/";; *) cp -L "$lib" "$R/usr/lib/x86_64-linux-gnu/";; esac
done
# Rust's std loads libgcc_s at run time (unwinding), which ldd does not list.
cp -L /lib/x86_64-linux-gnu/libgcc_s.so.1 "$R/usr/lib/x86_64-linux-gnu/"
n=0
for ko in $closure; do   # numbered so the guest loads them in dependency order
  n=$((n + 1)); dst=$R/modules/$(printf '%02d' $n)-$(basename "${ko%%.ko*}").ko
  case "$ko" in *.xz) xz -dc "$ko" >"$dst";; *.zst) zstd -qdc "$ko" >"$dst";; *) cp "$ko" "$dst";; esac
done
cat >"$R/init" <<'INIT'
#!/bin/sh
# Guest side of cluster-tests/softroce/run.sh.
export PATH=/usr/bin LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /tmp
echo "GUEST init at $(cut -d' ' -f1 /proc/uptime)s, kernel $(cat /proc/sys/kernel/osrelease)"
bye() { echo "GUEST $*"; sync; poweroff -f; sleep 5; echo o >/proc/sysrq-trigger; }
for ko in /modules/*.ko; do insmod "$ko" || { bye "insmod $ko failed"; exit 1; }; done
IP=/usr/bin/ip
$IP link set lo up
$IP link add veth0 type veth peer name veth1
# Jumbo frames: rxe then runs a 4096-byte path MTU, 4x fewer packets than at 1500.
$IP link set veth0 mtu 9000; $IP link set veth1 mtu 9000
$IP addr add 10.77.0.1/24 dev veth0; $IP addr add 10.77.0.2/24 dev veth1
# Both ends are local addresses of one namespace: accept packets from a local source on
# the other veth end. A deeper backlog keeps bursts of 1 MiB writes from being dropped
# (each drop costs rxe a 67 ms retransmission timeout under emulation).
for c in all default; do
  echo 1 >/proc/sys/net/ipv4/conf/$c/accept_local; echo 0 >/proc/sys/net/ipv4/conf/$c/rp_filter
done
echo 20000 >/proc/sys/net/core/netdev_max_backlog
$IP link set veth0 up; $IP link set veth1 up
rdma link add rxe0 type rxe netdev veth0 && rdma link add rxe1 type rxe netdev veth1 \
  || { echo "VERBS_TEST rxe_link_add FAIL"; bye "selftest exit 1"; exit 1; }
mapped_gid() {   # index of the RoCE v2 IPv4-mapped GID of $1
  for g in /sys/class/infiniband/$1/ports/1/gids/*; do
    i=${g##*/}
    case "$(cat "$g" 2>/dev/null)" in 0000:0000:0000:0000:0000:ffff:*)
      grep -q v2 /sys/class/infiniband/$1/ports/1/gid_attrs/types/$i 2>/dev/null && { echo "$i"; return 0; };;
    esac
  done; return 1
}
i=0
while [ $i -lt 100 ]; do
  G0=$(mapped_gid rxe0) && G1=$(mapped_gid rxe1) \
    && grep -q ACTIVE /sys/class/infiniband/rxe0/ports/1/state \
    && grep -q ACTIVE /sys/class/infiniband/rxe1/ports/1/state && break
  sleep 0.1; i=$((i + 1))
done
echo "GUEST rxe0 gid $G0, rxe1 gid $G1, ports $(cat /sys/class/infiniband/rxe0/ports/1/state | cut -d' ' -f2)"
tx0=$(cat /sys/class/net/veth0/statistics/tx_packets)
SOFTROCE_DEV0=rxe0 SOFTROCE_DEV1=rxe1 SOFTROCE_GID0=$G0 SOFTROCE_GID1=$G1 \
SOFTROCE_IP0=10.77.0.1 SOFTROCE_IP1=10.77.0.2 KRUN_FABRIC_PROVIDER=verbs \
  timeout 240 /usr/bin/verbs_selftest
rc=$?
c() { cat /sys/class/infiniband/$1/ports/1/hw_counters/$2 2>/dev/null || echo '?'; }
echo "GUEST traffic: veth0 tx +$(( $(cat /sys/class/net/veth0/statistics/tx_packets) - tx0 )) packets;" \
  "rxe0 sent $(c rxe0 sent_pkts) rcvd $(c rxe0 rcvd_pkts) retries $(c rxe0 completer_retry_err);" \
  "rxe1 sent $(c rxe1 sent_pkts) rcvd $(c rxe1 rcvd_pkts) retries $(c rxe1 completer_retry_err);" \
  "veth drops $(cat /sys/class/net/veth0/statistics/tx_dropped)/$(cat /sys/class/net/veth1/statistics/tx_dropped)"
bye "selftest exit $rc"
INIT
chmod +x "$R/init"
(cd "$R" && find . | cpio -o -H newc --quiet) | gzip -1 >"$WORK/initrd.gz"
say "initramfs $(du -h "$WORK/initrd.gz" | cut -f1)"

# ----------------------------------------------------------------------------------- boot
LOG=$WORK/console.log
boot() {   # $1 = kernel image; returns 2 if the guest never reached /init
  local waited=0
  : >"$LOG"
  say "booting $(basename "$1") under QEMU (TCG, 2 vCPUs, no NIC)"
  timeout "$LIMIT" qemu-system-x86_64 -m 1536 -smp 2 -accel tcg,thread=multi \
    -nodefaults -no-user-config -display none -serial stdio -no-reboot \
    -device virtio-rng-pci -kernel "$1" -initrd "$WORK/initrd.gz" \
    -append "console=ttyS0 quiet panic=-1 oops=panic mitigations=off" </dev/null >"$LOG" 2>&1 &
  QPID=$!
  # Boot watchdog: under TCG /init runs after ~5 s; give up on this image after 90 s.
  while ! grep -aq '^GUEST init' "$LOG"; do
    kill -0 "$QPID" 2>/dev/null || break
    if [ $waited -ge 900 ]; then kill "$QPID" 2>/dev/null || true; break; fi
    sleep 0.1; waited=$((waited + 1))
  done
  wait "$QPID" || true
  QPID=""
  grep -aq '^GUEST init' "$LOG" || return 2
}
rc=0; boot "$KIMG" || rc=$?
if [ $rc = 2 ] && [ "$KIMG" != "$KROOT/boot/vmlinuz-$KVER" ]; then
  say "no guest /init with the PVH vmlinux; retrying with the bzImage"
  boot "$KROOT/boot/vmlinuz-$KVER" || true
fi

# -------------------------------------------------------------------------------- verdict
CLEAN=$(tr -d '\r' <"$LOG")
grep -aE '^(GUEST|VERBS_TEST|verbs selftest|provider)' <<<"$CLEAN" | sed 's/^/  /' || true
passed=$(grep -ac '^VERBS_TEST .* PASS' <<<"$CLEAN" || true)
failed=$(grep -ac '^VERBS_TEST .* FAIL' <<<"$CLEAN" || true)
say "guest done; console log $LOG"
if ! grep -aq '^GUEST selftest exit 0$' <<<"$CLEAN" || [ "$passed" -eq 0 ]; then
  [ "$failed" -gt 0 ] || failed=1   # no result at all counts as a failure
  echo "softroce lane: $passed passed, $failed failed"
  exit 1
fi
echo "softroce lane: $passed passed, $failed failed"
