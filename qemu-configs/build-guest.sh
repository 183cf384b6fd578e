#!/usr/bin/env bash
# build-guest.sh - build the vcdev test guest: a Debian bookworm-backports
# 6.12 kernel (unpacked with dpkg-deb, never installed) and a busybox
# initramfs whose /init is qemu-configs/guest/init.
#
#   qemu-configs/build-guest.sh     # prints the output directory on stdout
#
# Output: $VCDEV_GUEST_DIR (default $HOME/.cache/vcdev-guest) with
#   vmlinuz   the kernel
#   initrd    gzip'd newc cpio: busybox, /init, the modules below
#   stamp     inputs of this build; a rebuild happens only when they change
# Needs: apt (bookworm-backports in the sources, lists up to date; when run
# as root it runs apt-get update once if the download fails), dpkg-deb, xz,
# gzip, busybox-static (or it downloads the .deb and unpacks it).
# Diagnostics go to stderr; stdout carries only the directory.
set -euo pipefail
src=$(cd "$(dirname "$0")" && pwd)
out=${VCDEV_GUEST_DIR:-${HOME:-/root}/.cache/vcdev-guest}
log() { echo "build-guest: $*" >&2; }
die() { echo "build-guest: ERROR: $*" >&2; exit 1; }

# Modules the guest loads, by name; dependencies are resolved from each
# module's .modinfo "depends=" and loaded first. Built into this kernel
# (CONFIG_*=y, no module needed): virtio, virtio_pci, intel-iommu + IRQ
# remapping, 8250 serial, devtmpfs, tmpfs. See modules.builtin.
MODULES="virtio_iommu virtio_blk virtio_net vfio vfio_iommu_type1 vfio_pci"

mkdir -p "$out/work/debs"
cd "$out/work"

apt_download() {  # apt_download <pkg...>: into debs/, with one update+retry as root
  if (cd debs && apt-get download -qq -t bookworm-backports "$@" >/dev/null 2>../apt.log); then return 0; fi
  [ "$(id -u)" = 0 ] || { cat apt.log >&2; die "apt-get download $* failed (run .ci/install-qemu.sh as root)"; }
  log "apt-get download failed; apt-get update and retry"
  apt-get update -qq >/dev/null 2>>apt.log || { cat apt.log >&2; die "apt-get update failed"; }
  (cd debs && apt-get download -qq -t bookworm-backports "$@" >/dev/null 2>../apt.log) ||
    { cat apt.log >&2; die "apt-get download $* failed"; }
}

kpkg=$(apt-cache -t bookworm-backports depends linux-image-amd64 2>/dev/null |
       awk '/Depends: linux-image-6/{print $2; exit}')
[ -n "$kpkg" ] || die "no bookworm-backports linux-image-amd64 in the apt lists (run .ci/install-qemu.sh)"
case "$kpkg" in linux-image-6.1[2-9]*|linux-image-6.[2-9]*) ;; *) die "unexpected kernel package $kpkg (want 6.12 from bookworm-backports)";; esac

stamp="$kpkg $(cat "$src/build-guest.sh" "$src/guest/init" | md5sum | cut -d' ' -f1)"
if [ -f "$out/vmlinuz" ] && [ -f "$out/initrd" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
  log "up to date ($kpkg)"; echo "$out"; exit 0
fi

# ------------------------------------------------------------------ kernel
if ! ls debs/"${kpkg}"_*.deb >/dev/null 2>&1; then
  log "downloading $kpkg"
  rm -f debs/linux-image-*.deb
  apt_download "$kpkg"
fi
rm -rf kroot; dpkg-deb -x debs/"${kpkg}"_*.deb kroot
kver=$(ls kroot/lib/modules | head -1)
mdir=kroot/lib/modules/$kver

# ----------------------------------------------------------------- busybox
bb=
if dpkg -s busybox-static >/dev/null 2>&1 && [ -x /bin/busybox ]; then bb=/bin/busybox
else
  ls debs/busybox-static_*.deb >/dev/null 2>&1 || { log "downloading busybox-static"; apt_download busybox-static; }
  rm -rf bbroot; dpkg-deb -x debs/busybox-static_*.deb bbroot; bb=$PWD/bbroot/bin/busybox
fi
"$bb" --list | grep -x insmod >/dev/null || die "$bb lacks insmod"

# ----------------------------------------------------------------- modules
declare -A seen=(); order=()
modpath() { # name -> path relative to $mdir (without .xz); '-' and '_' are equivalent
  local n=${1//-/_}
  awk -v n="$n" '{b=$0; sub(/.*\//,"",b); sub(/\.ko$/,"",b); gsub(/-/,"_",b); if (b==n) {print; exit}}' "$mdir/modules.order"
}
resolve() {
  local n=${1//-/_} p dep
  [ -n "${seen[$n]:-}" ] && return 0; seen[$n]=1
  if awk -v n="$n" '{b=$0; sub(/.*\//,"",b); sub(/\.ko$/,"",b); gsub(/-/,"_",b); if (b==n) f=1} END{exit !f}' "$mdir/modules.builtin"; then
    return 0
  fi
  p=$(modpath "$n"); [ -n "$p" ] && [ -f "$mdir/$p.xz" ] || die "module $n not found in $kver"
  for dep in $(xz -dc "$mdir/$p.xz" | tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' '); do resolve "$dep"; done
  order+=("$p")
}
for m in $MODULES; do resolve "$m"; done

# --------------------------------------------------------------- initramfs
root=$(mktemp -d "$out/work/root.XXXXXX")
trap 'rm -rf "$root"' EXIT
chmod 755 "$root"
mkdir -p "$root"/{bin,proc,sys,dev,tmp,mnt,lib/modules}
cp "$bb" "$root/bin/busybox"; ln -s busybox "$root/bin/sh"
install -m 755 "$src/guest/init" "$root/init"
: > "$root/lib/modules/load.list"
for p in "${order[@]}"; do
  f=${p##*/}; xz -dc "$mdir/$p.xz" > "$root/lib/modules/$f"; echo "$f" >> "$root/lib/modules/load.list"
done
echo "$kver" > "$root/lib/modules/kernel.release"
(cd "$root" && find . | sort | "$bb" cpio -o -H newc 2>/dev/null | gzip -1) > "$out/initrd.tmp"
cp kroot/boot/vmlinuz-"$kver" "$out/vmlinuz.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"; mv "$out/initrd.tmp" "$out/initrd"
rm -rf kroot bbroot
echo "$stamp" > "$out/stamp"
log "kernel $kver, initrd $(stat -c %s "$out/initrd") bytes, modules: $(tr '\n' ' ' < "$root/lib/modules/load.list")"
echo "$out"
