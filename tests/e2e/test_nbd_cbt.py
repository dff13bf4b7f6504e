"""Incremental backup of a raw zvol over nbd_server, the way a pull-mode
client (or Xen Orchestra with CBT) does it: the changed blocks of a snapshot
interval come from plugins.volume.cbt (ZFS send streams), are served as
qemu:dirty-bitmap:NAME on the read-only export of the newer snapshot, and
reading only the dirty extents turns a copy of the older snapshot into the
newer one."""

import hashlib
import json
import os

import nbd
import pytest

from conftest import run, wait_for_path
from nbd_server import run as nbd_run
from plugins.volume import cbt

MiB = 1 << 20
G = 65536


def write_sync(dev, offset, data):
    fd = os.open(dev, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def nbdinfo_map(uri, context):
    out = run("nbdinfo", "--map=" + context, "--json", uri).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


@pytest.fixture
def server(tmp_path):
    pids = []
    yield lambda *a, **kw: pids.append(nbd_run.start(*a, **kw))
    for pid in pids:
        nbd_run.stop(pid)


def test_incremental_backup_through_dirty_bitmap(zpool, tmp_path, server):
    vol = "%s/cbtvol" % zpool
    run("zfs", "create", "-V", "32M", "-o", "volblocksize=16k", "-o", "snapdev=visible", vol)
    dev = wait_for_path("/dev/zvol/" + vol)
    write_sync(dev, 0, os.urandom(MiB))
    run("zfs", "snapshot", vol + "@s0")
    write_sync(dev, 5 * MiB, os.urandom(4096))              # block 80
    write_sync(dev, 9 * MiB, os.urandom(200 * 1024))        # blocks 144..147
    run("zfs", "snapshot", vol + "@s1")
    s0 = wait_for_path("/dev/zvol/%s@s0" % vol)
    s1 = wait_for_path("/dev/zvol/%s@s1" % vol)

    changed = cbt.list_changed_blocks(vol + "@s0", vol + "@s1")
    assert changed["granularity"] == G
    bitmap = tmp_path / "s0-s1.b64"
    bitmap.write_text(changed["bitmap"])
    alloc = tmp_path / "s1.alloc.json"
    alloc.write_text(json.dumps({"allocated": [list(e) for e in cbt.allocation_map(vol + "@s1")]}))

    sock = "/run/zfsng-nbd-cbt.sock"
    server([{"name": "s0", "path": s0, "readonly": True},
            {"name": "s1", "path": s1, "readonly": True, "bitmaps": {"s0": str(bitmap)},
             "allocation": str(alloc)}], unix_path=sock, log_path=str(tmp_path / "nbd.log"))
    uri = "nbd+unix:///%s?socket=" + sock

    size = 32 * MiB
    assert nbdinfo_map(uri % "s1", "qemu:dirty-bitmap:s0") == [
        (0, 80 * G, 0), (80 * G, G, 1), (81 * G, 63 * G, 0), (144 * G, 4 * G, 1),
        (148 * G, size - 148 * G, 0)]
    data = [(o, n) for o, n, t in nbdinfo_map(uri % "s1", "base:allocation") if t == 0]
    covered = lambda off, n: any(o <= off and off + n <= o + ln for o, ln in data)
    assert covered(0, MiB) and covered(5 * MiB, 4096) and covered(9 * MiB, 200 * 1024)
    assert not covered(20 * MiB, 4096)                        # never written: a hole

    # The backup: full copy of s0, then only the dirty extents of s1.
    backup = str(tmp_path / "backup.img")
    run("nbdcopy", uri % "s0", backup)
    h = nbd.NBD()
    h.add_meta_context("qemu:dirty-bitmap:s0")
    h.connect_uri(uri % "s1")
    dirty = []

    def collect(context, offset, entries, err):
        pos = offset
        for i in range(0, len(entries), 2):
            if entries[i + 1] & 1:
                dirty.append((pos, entries[i]))
            pos += entries[i]
        collect.end = pos
        return 0

    pos = 0
    while pos < size:
        h.block_status(size - pos, pos, collect)
        pos = collect.end
    copied = 0
    with open(backup, "r+b") as f:
        for off, n in dirty:
            f.seek(off)
            f.write(h.pread(n, off))
            copied += n
    h.shutdown()
    assert copied == 5 * G
    assert sha(backup) == sha(s1) != sha(s0)
    with open(str(tmp_path / "nbd.log")) as f:
        assert "Traceback" not in f.read()
