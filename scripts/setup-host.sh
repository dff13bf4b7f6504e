#!/bin/bash
# Installs what the demo and the tests need on a Debian host: QEMU and
# debootstrap for the test VM, libnbd/nbdkit/qemu tools as real NBD peers for
# host tests, and a project venv (.venv) with zfs-ng and its test tools.
# Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="qemu-system-x86 qemu-utils debootstrap e2fsprogs libnbd-bin nbdkit python3-libnbd nbdkit-plugin-python
  python3-venv python3-pip ca-certificates systemd rpm rpm2cpio cpio"
missing=$(for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
done)
if [ -n "$missing" ]; then
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    echo "setup-host: installing $(echo $missing)" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >&2
fi

stamp=.venv/.installed-$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
    echo "setup-host: creating .venv" >&2
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip >&2
    .venv/bin/pip install -q -e '.[test]' >&2
    touch "$stamp"
fi
