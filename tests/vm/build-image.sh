#!/bin/bash
# Build the zfs-ng test VM image: a Debian trixie guest with real OpenZFS
# (zfs-dkms compiled for the guest kernel), nvme-cli, nbd-client, fio, libnbd,
# nbdkit and python3.  The result is cached under $ZFSNG_CACHE keyed by a hash
# of this recipe, so only a recipe change rebuilds it.
#
# Usage: build-image.sh            print the image directory (building it if needed)
#        build-image.sh --key      print the cache key only
#
# Needs root (debootstrap, chroot) and the host packages debootstrap, e2fsprogs.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${ZFSNG_CACHE:-$HOME/.cache/zfs-ng}
KEY=$(cat "$HERE/build-image.sh" "$HERE/guest-init" | sha256sum | cut -c1-16)
OUT=$CACHE/vm-$KEY

[ "${1:-}" = --key ] && { echo "$KEY"; exit 0; }
if [ -f "$OUT/ready" ]; then echo "$OUT"; exit 0; fi

SUITE=trixie
# User-space side of the tests.  Installed with apt inside the chroot, not
# with debootstrap --include, whose resolver fails on a list this long.
PACKAGES="python3 python3-pytest python3-click python3-cffi python3-crc32c nvme-cli
  nbd-client fio libnbd-bin python3-libnbd nbdkit nbdkit-plugin-python qemu-utils
  xfsprogs e2fsprogs kmod udev iproute2 procps util-linux ca-certificates psmisc"
# Installed in a second step: the kernel first, so dkms builds zfs.ko for it.
KERNEL_PACKAGES="linux-image-amd64 linux-headers-amd64"
ZFS_PACKAGES="zfs-dkms zfsutils-linux python3-pyzfs"

# The Debian mirror comes from the host's own apt configuration (deb822 or
# one-line format), so the recipe names no host.
mirror() {
    local m
    m=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$m" ] || m=$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$m" ] || { echo "build-image: no Debian mirror found in the host's apt sources" >&2; exit 1; }
    echo "$m"
}

[ "$(id -u)" = 0 ] || { echo "build-image: must run as root (debootstrap)" >&2; exit 1; }
mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/build.XXXXXX")
ROOT=$WORK/root
cleanup() {
    for m in dev/pts dev sys proc; do umount -l "$ROOT/$m" 2>/dev/null || true; done
    cp "$ROOT/debootstrap/debootstrap.log" "$CACHE/last-debootstrap.log" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

MIRROR=$(mirror)
echo "build-image: debootstrap $SUITE into $ROOT" >&2
debootstrap --variant=minbase --components=main,contrib \
    "$SUITE" "$ROOT" "$MIRROR" >&2

echo "deb $MIRROR $SUITE main contrib" > "$ROOT/etc/apt/sources.list"
# No service may start inside the chroot.
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
chmod +x "$ROOT/usr/sbin/policy-rc.d"
mount -t proc proc "$ROOT/proc"
mount --rbind /sys "$ROOT/sys"
mount --bind /dev "$ROOT/dev"
mount --bind /dev/pts "$ROOT/dev/pts"

in_root() { chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }
in_root apt-get update >&2
in_root apt-get install -y --no-install-recommends $PACKAGES >&2
in_root apt-get install -y --no-install-recommends $KERNEL_PACKAGES >&2
in_root apt-get install -y --no-install-recommends $ZFS_PACKAGES >&2
ls "$ROOT"/lib/modules/*/updates/dkms/zfs.ko* >/dev/null 2>&1 || {
    echo "build-image: dkms did not build zfs.ko" >&2; exit 1; }

install -m 0755 "$HERE/guest-init" "$ROOT/sbin/zfsng-init"
echo zfsng-vm > "$ROOT/etc/hostname"
# Trim what the guest never needs: compilers stay (dkms), caches go.
in_root apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/*
rm -f "$ROOT/usr/sbin/policy-rc.d"
for m in dev/pts dev sys proc; do umount -l "$ROOT/$m"; done

mkdir -p "$WORK/out"
cp "$ROOT"/boot/vmlinuz-* "$WORK/out/vmlinuz"
cp "$ROOT"/boot/initrd.img-* "$WORK/out/initrd.img"
ls "$ROOT"/lib/modules > "$WORK/out/kernel-version"
# An ext4 root disk made without loop devices.
mke2fs -q -t ext4 -L zfsng-root -d "$ROOT" "$WORK/out/root.img" 6G >&2
touch "$WORK/out/ready"
rm -rf "$OUT"
mv "$WORK/out" "$OUT"
echo "$OUT"
