#!/usr/bin/env bash
# setup_adbd.sh CACHE_DIR: fetch Debian trixie's adbd (amd64) with its loader and libraries and
# lay out a "device" root file system for the loopback adb tests. Idempotent; needs root only for
# nothing here (apt-get download runs as any user), but the test that starts the daemon does.
#
#   CACHE_DIR/debs/*.deb        the downloaded packages (kept: later runs fetch nothing)
#   CACHE_DIR/apt/              a private apt state (sources list, lists, cache): the system's
#                               apt sources are never touched
#   CACHE_DIR/root/             the device root: trixie's adbd, its ld.so and libraries, a static
#                               busybox (sh, taskset, ...), getprop reading /system/build.prop,
#                               qemu-aarch64-static for the aarch64 binaries, a fake
#                               /sys/devices/system/cpu cpufreq tree and an arm64 /proc/cpuinfo,
#                               and the loopback shim (vsock off, wildcard binds -> loopback).
#
# Exit status: 0 ready; 3 the .debs could not be fetched (no network or no trixie); 1 otherwise.
set -euo pipefail
CACHE=$(realpath -m "${1:?usage: setup_adbd.sh CACHE_DIR}")
HERE=$(cd "$(dirname "$0")" && pwd)
SUITE=${TFQAT_ADBD_SUITE:-trixie}
MIRROR=${TFQAT_ADBD_MIRROR:-http://deb.debian.org/debian}
PKGS="adbd android-libbase android-libboringssl android-libcutils android-liblog gcc-14-base
      libbrotli1 libbsd0 libc6 libcap2 libgcc-s1 liblz4-1 libmd0 libprotobuf32t64 libstdc++6
      libsystemd0 libxxhash0 libzstd1 zlib1g busybox-static"
mkdir -p "$CACHE/debs"

if [ ! -f "$CACHE/debs/.complete" ]; then
  APT="$CACHE/apt"
  mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/etc/preferences.d"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE main" > "$APT/etc/sources.list"
  OPTS=(-o "Dir::Etc::sourcelist=$APT/etc/sources.list" -o "Dir::Etc::sourceparts=$APT/etc/none.d"
        -o "Dir::Etc::preferencesparts=$APT/etc/preferences.d" -o "Dir::State::Lists=$APT/lists"
        -o "Dir::Cache=$APT/cache" -o "APT::Architecture=amd64" -o "Acquire::Retries=2"
        -o "Acquire::http::Timeout=30" -o "APT::Sandbox::User=root" -q)
  if ! timeout 300 apt-get "${OPTS[@]}" update >"$CACHE/apt-update.log" 2>&1; then
    echo "setup_adbd: apt-get update for $SUITE failed (see $CACHE/apt-update.log)" >&2
    exit 3
  fi
  # shellcheck disable=SC2086
  if ! (cd "$CACHE/debs" && timeout 300 apt-get "${OPTS[@]}" download $PKGS >"$CACHE/apt-download.log" 2>&1); then
    echo "setup_adbd: apt-get download failed (see $CACHE/apt-download.log)" >&2
    exit 3
  fi
  touch "$CACHE/debs/.complete"
fi

ROOT="$CACHE/root"
if [ ! -f "$ROOT/.complete" ]; then
  rm -rf "$ROOT.tmp"
  mkdir -p "$ROOT.tmp"
  for deb in "$CACHE"/debs/*.deb; do dpkg-deb -x "$deb" "$ROOT.tmp"; done
  cd "$ROOT.tmp"
  # usr-merge links (base-files provides them on a real system)
  for d in bin sbin lib lib64; do
    [ -e "$d" ] || [ -L "$d" ] || { mkdir -p "usr/$d"; ln -s "usr/$d" "$d"; }
  done
  test -x usr/lib/android-sdk/platform-tools/adbd
  test -e usr/lib64/ld-linux-x86-64.so.2
  # busybox: the device's shell and tools (Android's toybox stands in the same place)
  mkdir -p system/bin usr/local/bin
  BB=usr/bin/busybox
  test -x "$BB"
  for applet in $("./$BB" --list); do
    [ -e "usr/bin/$applet" ] || ln -s busybox "usr/bin/$applet"
  done
  cat > system/bin/getprop <<'SH'
#!/bin/sh
# getprop [NAME]: Android's property reader, served from /system/build.prop
if [ $# -eq 0 ]; then sed -n 's/^\([^#=][^=]*\)=\(.*\)$/[\1]: [\2]/p' /system/build.prop; exit 0; fi
sed -n "s/^$1=//p" /system/build.prop | head -n 1
SH
  chmod 755 system/bin/getprop
  cat > system/build.prop <<'PROP'
ro.product.cpu.abi=arm64-v8a
ro.product.cpu.abilist=arm64-v8a
ro.product.manufacturer=tfqat
ro.product.model=loopback-adbd
ro.soc.model=qemu-aarch64 (max)
ro.build.version.release=14
ro.build.version.sdk=34
ro.adb.secure=0
PROP
  # an arm64 /proc/cpuinfo (bind-mounted over the real one inside the device's mount namespace)
  NCPU=$(nproc)
  mkdir -p etc
  : > etc/tfqat-cpuinfo
  for i in $(seq 0 $((NCPU - 1))); do
    printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp i8mm\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n' "$i" >> etc/tfqat-cpuinfo
  done
  # cpufreq: the upper half of the cores are "big" (higher cpuinfo_max_freq), as on a phone
  for i in $(seq 0 $((NCPU - 1))); do
    mkdir -p "sys/devices/system/cpu/cpu$i/cpufreq"
    if [ "$NCPU" -gt 1 ] && [ "$i" -lt $((NCPU / 2)) ]; then f=1800000; else f=2800000; fi
    echo "$f" > "sys/devices/system/cpu/cpu$i/cpufreq/cpuinfo_max_freq"
  done
  QEMU=$(command -v qemu-aarch64-static || true)
  if [ -n "$QEMU" ]; then cp "$QEMU" usr/bin/qemu-aarch64-static; fi
  # the loopback shim: no vsock listener, wildcard binds become loopback binds
  gcc -O2 -shared -fPIC -Wall -Wextra -o usr/lib/tfqat-loopback-shim.so "$HERE/loopback_shim.c" -ldl
  mkdir -p data/local/tmp data/misc/adb proc dev tmp root
  chmod 1777 tmp data/local/tmp
  cd - >/dev/null
  mv "$ROOT.tmp" "$ROOT"
  touch "$ROOT/.complete"
fi
echo "$ROOT"
