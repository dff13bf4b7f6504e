#!/bin/sh
# Runs in the test VM after guest-init: brings up udev, ZFS and the NVMe/NBD
# modules, runs the argv the host left in /mnt/run/argv.json from the
# checkout (copied into the guest's /tmp), and leaves output, exit code and kernel log in /mnt/run.
# Bytecode is cached in the guest's throw-away root (PYTHONPYCACHEPREFIX), never
# in the shared checkout: without a cache every plugin call compiled its ~120
# modules again (Plugin.Query 2.4-3.3 s in TCG, 1.5 s with the cache).
# COLUMNS: pytest cuts its one-line verdicts (-ra) to the terminal width, 80
# on the serial console; vm.py repeats them at the end of a failed run.
# ZFSNG_DURATIONS: tests/e2e/conftest.py logs each test's time there.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH HOME=/root LANG=C.UTF-8 ZFSNG_IN_VM=1 \
    PYTHONPYCACHEPREFIX=/var/cache/zfsng-pyc PYTHONUNBUFFERED=1 COLUMNS=300 \
    ZFSNG_DURATIONS=/mnt/run/durations.tsv
mount -t configfs none /sys/kernel/config
hostname zfsng-vm
ip link set lo up
/usr/lib/systemd/systemd-udevd --daemon || echo "guest-run: udevd failed to start"
udevadm trigger --action=add
udevadm settle --timeout=60
for m in zfs nvmet nvmet-tcp nvme-tcp nvme-fabrics; do modprobe "$m" || echo "guest-run: modprobe $m failed"; done
modprobe nbd nbds_max=32
mkdir -p /etc/nvme
[ -s /etc/nvme/hostnqn ] || nvme gen-hostnqn > /etc/nvme/hostnqn
[ -s /etc/nvme/hostid ] || cat /proc/sys/kernel/random/uuid > /etc/nvme/hostid
echo "zfsng-guest: ready ($(uname -r), $(cat /sys/module/zfs/version 2>/dev/null))"
# The tests run from a copy of the checkout in the guest's RAM: every plugin
# call is a new Python process whose imports read ~100 files, and over 9p in
# TCG that cost 0.3 s a call (Plugin.Query 1.30 s from 9p, 1.01 s from tmpfs).
mkdir -p /tmp/checkout
tar -C /mnt/share -cf - --exclude=./.git --exclude=./.venv --exclude=./build . | tar -C /tmp/checkout -xf -
export PYTHONPATH=/tmp/checkout
cd /tmp/checkout
python3 -c 'import json, os; a = json.load(open("/mnt/run/argv.json")); os.execvp(a[0], a)' \
    > /mnt/run/output 2>&1 < /dev/null
rc=$?
dmesg > /mnt/run/dmesg.log 2>&1
echo "$rc" > /mnt/run/rc.tmp && mv /mnt/run/rc.tmp /mnt/run/rc
echo "zfsng-guest: done rc=$rc"
sync
echo o > /proc/sysrq-trigger
sleep 60
