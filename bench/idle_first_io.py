#!/usr/bin/env python3
"""The first I/O to an idle volume: how long from "a reader wants volume KEY"
(its zvol has volmode=none, no device node) to the first 4 KiB read back,
next to the same read on a volume whose device already exists.  Run in the
test VM (needs ZFS):

    python3 tests/vm/vm.py run -- python3 bench/idle_first_io.py --volumes 8

The path measured is the one every datapath takes (plugins/datapath/devices.py
acquire -> volume.activate_device: the SR root's properties and volmode=dev
through libzfs in-process (plugins/libzfs.py), the index mark, the volume
named in the pool's journal (one more property set on the SR root: the
volumes are made before the last copy of the index, as on a node whose
volumes are older than that), then the wait for udev's /dev/zvol link),
then open(O_DIRECT) + one 4 KiB pread, checked
against what was written.  Then the activation's parts by hand (one `zfs
get`; volmode=dev set by the zfs command and through libzfs in turn; from
the set until the zvol's minor is there and until udev's link is).  Times
are in-process: the plugin's Python start-up (Plugin.Query, printed beside
them) is not included.  A snapshot's first read (a read-only clone made on
demand) is measured the same way.  `env ZFSNG_LIBZFS=0` measures the same
with zfs commands only.  Prints medians and ranges (--json FILE too);
asserts nothing about time.

Measured in the TCG guest (2 vCPU, alone on the 2-core machine, 2026-12-04),
6 volumes, median (min..max):

    first I/O of an idle volume      622 ms (554..832)   commands only: 1055 ms
      of which activate_device       604 ms                             1030 ms
    deactivate                       188 ms                              808 ms
    first I/O of a snapshot          840 ms                             1262 ms
    parts: `zfs get` 223 ms; volmode=dev by `zfs set` 277 ms, by libzfs 86 ms;
    after the set, the zvol's minor 65 ms, udev's /dev/zvol link 321 ms

So half of what is left is udev making the link (it runs zvol_id on the new
/dev/zdN); the minor itself is there in a tenth of that time.

Since the pool's journal (twelfth session: a first activation names its
volume there, one more property set on the SR root), interleaved in one
guest with the code before it (9e3a442, the same bench), the machine quiet,
6 volumes, round 2 of 2 (round 1 had another guest beside it): first I/O of
an idle volume 208 ms before, 241 ms after; of a snapshot 296 -> 331 ms;
parts: libzfs set 30 ms, the minor 23 ms and udev's link 130 ms after it.

Thirteenth session: the servers (target, NBD server) open a zvol's minor by
name before udev's link (blockio/zvol.py; activate_device(link=False)), and
a snapshot's device clone is made through libzfs.  The guest alone, 8
volumes, 4 each way (median, min..max), after 0444fe6: first I/O of an idle
volume waiting for udev's link 249 ms (240..265), for the minor only 112 ms
(93..283); of a snapshot 245 ms (204..283) and 148 ms (129..255), where the
zfs command's clone gave 297 and 256 ms (the run before, 3357ea8).
"""

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._vm import file_sr, plugin_call as script  # noqa: E402
from blockio import zvol as zvol_dev  # noqa: E402

USER = "bench"


def read4k(path, expect):
    """open(O_DIRECT) + one aligned 4 KiB pread at 0; seconds."""
    buf = mmap.mmap(-1, 4096)
    t = time.time()
    fd = zvol_dev.open_path(path, os.O_RDONLY | os.O_DIRECT)    # the servers' open
    try:
        n = os.preadv(fd, [buf], 0)
    finally:
        os.close(fd)
    took = time.time() - t
    if n != 4096 or buf[:len(expect)] != expect:
        sys.exit("%s: read back %d bytes, not what was written" % (path, n))
    return took


def first_io(devices, pool, key, expect, link):
    """link: activate_device waits for udev's /dev/zvol link (what tapdisk
    needs); else only for the minor (the target's and NBD server's way: they
    open the minor by name until the link is there, blockio/zvol.py)."""
    t = time.time()
    loc = devices.acquire(pool, key, USER, link=link)
    t_act = time.time() - t
    t_read = read4k(loc["device"], expect)
    t_warm = read4k(loc["device"], expect)   # the device exists now
    t = time.time()
    devices.release(pool, key, USER)
    return {"activate": t_act, "read": t_read, "first_io": t_act + t_read,
            "warm_read": t_warm, "deactivate": time.time() - t}


def parts(pool, key, use_lib):
    """The same activation by hand, its parts timed: one `zfs get` (what any
    zfs command costs), volmode=dev set by the zfs command or, as
    activate_device does, in-process (use_lib), then from the set's return
    until the zvol's minor is there (/dev/zdN, asked by name) and until
    udev has made the /dev/zvol link (both polled every ms, no udevadm)."""
    from plugins import zfs
    from plugins.volume import names
    ds = names.volume_dataset(pool, key)
    dev = zfs.device_path(ds)
    t = time.time()
    subprocess.run(["zfs", "get", "-H", "-o", "value", "volmode", ds], check=True,
                   stdout=subprocess.DEVNULL)
    t_get = time.time() - t
    t = t0 = time.time()
    if use_lib:
        zfs.set_prop(ds, "volmode", "dev")
    else:
        subprocess.run(["zfs", "set", "volmode=dev", ds], check=True)
    t_set = time.time() - t
    t = time.time()
    t_minor = t_link = None
    while t_minor is None or t_link is None:
        if time.time() - t > 60:
            sys.exit("%s did not appear" % dev)
        if t_minor is None and zvol_dev.find(ds, since=t0 - 0.05):
            t_minor = time.time() - t
        if t_link is None and os.path.exists(dev):
            t_link = time.time() - t
        time.sleep(0.001)
    subprocess.run(["zfs", "inherit", "volmode", ds], check=True)
    subprocess.run(["udevadm", "settle"], check=True)
    out = {"zfs_get": t_get, "minor": t_minor, "udev_link": t_link}
    out["libzfs_set" if use_lib else "zfs_set"] = t_set
    return out


def summary(rows, field):
    xs = [r[field] for r in rows]
    return statistics.median(xs), min(xs), max(xs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--volumes", type=int, default=8, help="idle volumes to read (default 8)")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    state = tempfile.mkdtemp(prefix="zfsng-bench-")
    env = dict(os.environ, ZFSNG_STATE_DIR=os.path.join(state, "host"))
    os.environ["ZFSNG_STATE_DIR"] = env["ZFSNG_STATE_DIR"]
    from plugins.datapath import devices
    conf, pool = file_sr(state, env, 2 << 30)
    try:
        vols, snaps = [], []
        for i in range(args.volumes):
            v, _ = script("Volume.create", env, sr=pool, name="idle %d" % i, description="",
                          size=16 << 20, sharable=False)
            mark = ("zfs-ng idle volume %d\n" % i).encode()
            loc = devices.acquire(pool, v["key"], USER)
            fd = os.open(loc["device"], os.O_WRONLY)
            try:
                os.pwrite(fd, mark, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            devices.release(pool, v["key"], USER)
            s, _ = script("Volume.snapshot", env, sr=pool, key=v["key"])
            vols.append((v["key"], mark))
            snaps.append((s["key"], mark))
        # made before the last copy of the index the pool carries (SR.detach
        # writes one): each first activation below names its volume in the
        # pool's journal (volume.activate_device), as on a node whose volumes
        # are older than its last copy
        script("SR.detach", env, sr=pool)
        script("SR.attach", env, configuration=conf)
        _, query = script("Plugin.Query", env)
        # alternately waiting for udev's link and for the minor only
        rows_v = [dict(first_io(devices, pool, k, m, i % 2 == 0), link=i % 2 == 0)
                  for i, (k, m) in enumerate(vols)]
        rows_s = [dict(first_io(devices, pool, k, m, i % 2 == 0), link=i % 2 == 0)
                  for i, (k, m) in enumerate(snaps)]
        rows_p = [parts(pool, k, i % 2 == 1) for i, (k, _) in enumerate(vols)]
        fig = {"volumes": rows_v, "snapshots": rows_s, "parts": rows_p, "plugin_query": query}
        print("first 4 KiB read of an idle device, %d each, median (min..max), ms:"
              % args.volumes)
        for what, rows in (("volume", rows_v), ("snapshot", rows_s)):
            for link in (True, False):
                sub = [r for r in rows if r["link"] == link]
                if not sub:
                    continue
                for field in ("activate", "read", "first_io", "warm_read", "deactivate"):
                    med, lo, hi = summary(sub, field)
                    print("  %-8s %-5s %-10s %8.1f (%.1f..%.1f)"
                          % (what, "link" if link else "minor", field, med * 1e3, lo * 1e3,
                             hi * 1e3))
        for field in ("zfs_get", "zfs_set", "libzfs_set", "minor", "udev_link"):
            med, lo, hi = summary([r for r in rows_p if field in r], field)
            print("  parts    %-10s %8.1f (%.1f..%.1f)" % (field, med * 1e3, lo * 1e3, hi * 1e3))
        print("  (Plugin.Query, the fixed cost of a plugin call: %.0f ms)" % (query * 1e3))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(fig, f, indent=1)
    finally:
        subprocess.run(["zpool", "destroy", "-f", pool])
        subprocess.run(["rm", "-rf", state])


if __name__ == "__main__":
    main()
