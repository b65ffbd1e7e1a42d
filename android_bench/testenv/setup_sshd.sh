#!/usr/bin/env bash
# setup_sshd.sh CACHE_DIR: an OpenSSH server for the loopback ssh-transport test, never installed
# (an installed openssh-server would start a host-wide sshd). Prints the sshd path.
#
#   the system's /usr/sbin/sshd when there is one; else CACHE_DIR/root/: the openssh-server and
#   libwrap0 packages of this system's apt sources (Debian's on Debian), fetched with
#   `apt-get download` and unpacked, nothing configured or started. sshd's libwrap.so.0 is then
#   found through LD_LIBRARY_PATH (CACHE_DIR/root/lib-path holds it).
#
# Exit status: 0 ready; 3 the packages could not be fetched (no network, no apt lists); 1 otherwise.
set -euo pipefail
CACHE=$(realpath -m "${1:?usage: setup_sshd.sh CACHE_DIR}")
if [ -x /usr/sbin/sshd ]; then echo /usr/sbin/sshd; exit 0; fi
ROOT="$CACHE/root"
if [ ! -f "$ROOT/.complete" ]; then
  mkdir -p "$CACHE/debs"
  if ! (cd "$CACHE/debs" && timeout 300 apt-get -q -o APT::Sandbox::User=root download openssh-server libwrap0 \
        >"$CACHE/apt-download.log" 2>&1); then
    echo "setup_sshd: apt-get download openssh-server libwrap0 failed (see $CACHE/apt-download.log;" \
         "apt-get update first)" >&2
    exit 3
  fi
  rm -rf "$ROOT.tmp"
  mkdir -p "$ROOT.tmp"
  for deb in "$CACHE"/debs/*.deb; do dpkg-deb -x "$deb" "$ROOT.tmp"; done
  test -x "$ROOT.tmp/usr/sbin/sshd"
  lib=$(find "$ROOT.tmp" -name 'libwrap.so.0*' | head -n 1)
  test -n "$lib"
  dirname "$lib" > "$ROOT.tmp/lib-path"
  sed -i "s|$ROOT.tmp|$ROOT|" "$ROOT.tmp/lib-path"
  rm -rf "$ROOT"
  mv "$ROOT.tmp" "$ROOT"
  touch "$ROOT/.complete"
fi
echo "$ROOT/usr/sbin/sshd"
