#!/usr/bin/env bash
# sshd_board.sh SSHD CONFIG [LIB_PATH]: run an OpenSSH sshd as a loopback-only "board" (root only).
#
# Runs in the foreground (the caller keeps its pid and kills it to stop everything):
#   unshare --net --mount --pid --fork --kill-child: a private network namespace (only lo, brought
#   up here: CONFIG listens on 127.0.0.1 and nothing else exists to reach), a private mount
#   namespace (the mounts below are seen only inside) and a private pid namespace whose init is
#   sshd (killing this script's unshare kills sshd and every session it started).
# Inside: a private /run with sshd's privilege-separation directory, and, when this system has no
# "sshd" user, a private /etc/passwd that adds one; the host's files are never changed.
set -euo pipefail
SSHD=$(realpath "${1:?usage: sshd_board.sh SSHD CONFIG [LIB_PATH]}")
CONFIG=$(realpath "${2:?usage: sshd_board.sh SSHD CONFIG [LIB_PATH]}")
LIBS=${3:-}
exec unshare --net --mount --pid --fork --kill-child --propagation private \
  env TFQAT_SSHD="$SSHD" TFQAT_CONFIG="$CONFIG" TFQAT_LIBS="$LIBS" bash -euc '
  ip link set lo up
  mount -t tmpfs -o mode=755,size=1m tfqat-run /run
  mkdir -p /run/sshd
  if ! getent passwd sshd >/dev/null; then
    cp /etc/passwd /run/tfqat-passwd
    echo "sshd:x:65533:65534:privilege separation:/run/sshd:/usr/sbin/nologin" >> /run/tfqat-passwd
    mount --bind /run/tfqat-passwd /etc/passwd
  fi
  if [ -n "$TFQAT_LIBS" ]; then export LD_LIBRARY_PATH=$TFQAT_LIBS; fi
  exec "$TFQAT_SSHD" -D -e -f "$TFQAT_CONFIG"
'
