#!/usr/bin/env bash
# install-qemu.sh - install what the QEMU guest tests need on a Debian bookworm
# machine, then build the guest kernel + initramfs.
#
#   sudo .ci/install-qemu.sh        # idempotent; a second run takes ~1 s
#
# Installs from bookworm-backports (added if missing, on the machine's own
# Debian mirror): qemu-system-x86 10.0 (+ qemu-storage-daemon via qemu-utils)
# and busybox-static; then runs qemu-configs/build-guest.sh, which puts
# vmlinuz + initrd into ${VCDEV_GUEST_DIR:-$HOME/.cache/vcdev-guest}.
# Env: VCDEV_QEMU_SKIP_APT=1 skips the apt part (packages already present).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "install-qemu: $*"; }
die() { echo "install-qemu: ERROR: $*" >&2; exit 1; }

have_qemu10() {
  command -v qemu-system-x86_64 >/dev/null && command -v qemu-storage-daemon >/dev/null &&
    qemu-system-x86_64 --version | head -1 | grep -qE 'version (1[0-9]|[2-9][0-9])\.' &&
    dpkg -s busybox-static xz-utils >/dev/null 2>&1
}

if [ "${VCDEV_QEMU_SKIP_APT:-0}" != 1 ] && ! have_qemu10; then
  [ "$(id -u)" = 0 ] || die "must run as root (apt-get install)"
  grep -q '^VERSION_CODENAME=bookworm' /etc/os-release || die "expects Debian bookworm"
  if ! grep -rqsw bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    # Reuse the mirror that the machine's main Debian source already names.
    uri=$(awk '/^URIs:/ && !/security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$uri" ] || uri=$(awk '$1=="deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$uri" ] || die "cannot find the Debian mirror in /etc/apt/sources.list{,.d}"
    log "adding bookworm-backports ($uri)"
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$uri" > /etc/apt/sources.list.d/bookworm-backports.sources
  fi
  aptlog=$(mktemp); trap 'rm -f "$aptlog"' EXIT
  log "apt-get update"
  apt-get update -qq >"$aptlog" 2>&1 || { cat "$aptlog" >&2; die "apt-get update failed"; }
  log "apt-get install qemu-system-x86 qemu-utils (bookworm-backports), busybox-static"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -t bookworm-backports qemu-system-x86 qemu-utils busybox-static xz-utils >"$aptlog" 2>&1 \
    || { cat "$aptlog" >&2; die "apt-get install failed"; }
  have_qemu10 || die "QEMU >= 10 not installed: $(qemu-system-x86_64 --version 2>&1 | head -1)"
fi
log "$(qemu-system-x86_64 --version | head -1)"

guest=$("$here/qemu-configs/build-guest.sh") || die "building the guest failed"
log "guest kernel + initrd in $guest"
