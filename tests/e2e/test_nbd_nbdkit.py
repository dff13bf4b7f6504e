"""nbd_server/nbdkit_plugin.py under the guest's nbdkit (1.42, python3 plugin)
on a real zvol, with base:allocation from plugins.volume.cbt's map (block
devices cannot answer SEEK_HOLE)."""

import hashlib
import json
import os

from conftest import run, wait_for_path
from plugins.volume import cbt

MiB = 1 << 20
PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "nbd_server",
                      "nbdkit_plugin.py")


def test_nbdkit_plugin_on_a_zvol_snapshot(zpool, tmp_path):
    vol = "%s/kvol" % zpool
    run("zfs", "create", "-V", "16M", "-o", "volblocksize=16k", "-o", "snapdev=visible", vol)
    dev = wait_for_path("/dev/zvol/" + vol)
    data = os.urandom(MiB)
    fd = os.open(dev, os.O_RDWR)
    os.pwrite(fd, data, 4 * MiB)
    os.fsync(fd)
    os.close(fd)
    run("zfs", "snapshot", vol + "@k")
    snap = wait_for_path("/dev/zvol/%s@k" % vol)
    amap = tmp_path / "alloc.json"
    amap.write_text(json.dumps({"allocated": [list(e) for e in cbt.allocation_map(vol + "@k")]}))
    out = str(tmp_path / "copy.img")
    r = run("nbdkit", "-U", "-", "python", PLUGIN, "path=" + snap, "readonly=true",
            "allocation=" + str(amap),
            "--run", 'nbdinfo --map --json "$uri" && nbdcopy "$uri" %s' % out)
    extents = [(e["offset"], e["length"], e["type"]) for e in json.loads(r.stdout)]
    assert extents == [(0, 4 * MiB, 3), (4 * MiB, MiB, 0), (5 * MiB, 11 * MiB, 3)]
    with open(out, "rb") as f, open(snap, "rb") as g:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(g.read()).digest()
