#!/usr/bin/env bash
# adbd_device.sh ROOT PORT: run trixie's adbd as a loopback-only "device" (root only).
#
# Runs in the foreground (the caller keeps its pid and kills it to stop everything):
#   unshare --net --mount --pid --fork --kill-child: a private network namespace (only lo, brought
#   up here), a private mount namespace (nothing mounted here is seen outside) and a private pid
#   namespace whose init is adbd (killing this script's unshare kills adbd and all it started).
# Inside: /proc, a minimal /dev, the arm64 /proc/cpuinfo, then chroot ROOT and exec adbd with
# its own loader and libraries (trixie's, in ROOT) and the loopback shim preloaded.
set -euo pipefail
ROOT=$(realpath "${1:?usage: adbd_device.sh ROOT PORT}")
PORT=${2:?usage: adbd_device.sh ROOT PORT}
exec unshare --net --mount --pid --fork --kill-child --propagation private \
  env TFQAT_ROOT="$ROOT" TFQAT_PORT="$PORT" bash -euc '
  ip link set lo up
  R=$TFQAT_ROOT
  mount -t proc proc "$R/proc"
  mount --bind "$R/etc/tfqat-cpuinfo" "$R/proc/cpuinfo"
  mount -t tmpfs -o mode=755,size=1m tfqat-dev "$R/dev"
  for n in "null 1 3" "zero 1 5" "random 1 8" "urandom 1 9" "tty 5 0"; do
    set -- $n; mknod -m 666 "$R/dev/$1" c "$2" "$3"
  done
  mkdir -p "$R/dev/pts"
  mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$R/dev/pts"
  ln -s pts/ptmx "$R/dev/ptmx"
  exec chroot "$R" /usr/bin/env -i PATH=/system/bin:/usr/bin:/bin HOME=/data/local/tmp \
    TMPDIR=/data/local/tmp ADBD_PORT="$TFQAT_PORT" LD_PRELOAD=/usr/lib/tfqat-loopback-shim.so \
    /usr/lib/android-sdk/platform-tools/adbd
'
