"""Backups of an SR volume named SR:KEY (through the volume plugin's library):
the anchor and the reading clone stay invisible to SR.ls and survive the SR's
garbage collection on attach; restore into another SR volume."""

import json
import os
import subprocess
import sys

from conftest import run
from plugins.volume import sr as sr_lib, volume as vol_lib
from sr_tools.backup import engine

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def zfsng(*args):
    p = subprocess.run([sys.executable, "-m", "sr_tools"] + list(args), cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def test_sr_volume_backup_and_restore(zpool, tmp_path):
    conf = sr_lib.create("2b7f1c1e-1111-4222-8333-444455556666", {"zpool": zpool}, "bk", "")
    pool = sr_lib.attach(conf)
    v = vol_lib.create(pool, "disk", "", 16 * MiB, False)
    dev = vol_lib.activate_device(pool, v["key"])["device"]
    data = os.urandom(3 * MiB)
    fd = os.open(dev, os.O_RDWR)
    os.pwrite(fd, data, 2 * MiB)
    os.fsync(fd)
    os.close(fd)
    vol_lib.deactivate_device(pool, v["key"])
    repo = str(tmp_path / "repo")
    m = engine.backup("full", "%s:%s" % (pool, v["key"]), repo)
    assert m["source"]["key"] == v["key"] and m["source"]["volume"].endswith("/" + v["key"])
    assert m["stats"]["bytes_read"] == 3 * MiB
    # xapi sees one volume; the anchor bookmark survives a re-attach (garbage collection)
    assert [x["key"] for x in vol_lib.ls(pool).value()] == [v["key"]]
    sr_lib.attach(conf)
    assert m["anchor"]["bookmark"] in run("zfs", "list", "-H", "-o", "name", "-t", "bookmark",
                                          "-r", zpool).stdout
    # a crash between the anchor snapshot and the first manifest leaves an
    # orphan (here with its reading clone): the next backup of this repo removes it
    from sr_tools.backup import zvol
    orphan = zvol.take_anchor(m["source"]["volume"], "20000101T000000Z-full", repo)
    with zvol.SnapshotDevice(orphan["snapshot"], "20000101T000000Z-full", repo):
        pass
    zvol.zfs("clone", "-o", "%s=%s" % (zvol.REPO_PROP, repo), orphan["snapshot"],
             m["source"]["volume"] + zvol.CLONE_SUFFIX + "20000101T000000Z-full")
    other = zvol.take_anchor(m["source"]["volume"], "x", str(tmp_path / "other-repo"))
    m2 = engine.backup("incr", "%s:%s" % (pool, v["key"]), repo)
    names = run("zfs", "list", "-H", "-o", "name", "-t", "all", "-r", zpool).stdout
    assert orphan["snapshot"] not in names and "20000101T000000Z" not in names
    assert other["snapshot"] in names           # another repository's: kept
    assert m2["stats"]["bytes_read"] == 0 and m2["extents"] == []
    # restore into a new SR volume through the CLI
    w = vol_lib.create(pool, "restored", "", 16 * MiB, False)
    p = zfsng("backup", "restore", os.path.join(repo, m["id"]), "%s:%s" % (pool, w["key"]),
              "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["bytes_written"] == 3 * MiB
    loc = vol_lib.activate_device(pool, w["key"])
    with open(loc["device"], "rb") as f:
        got = f.read()
    vol_lib.deactivate_device(pool, w["key"])
    assert got == bytes(2 * MiB) + data + bytes(11 * MiB)
    # an active volume is refused
    vol_lib.activate_device(pool, w["key"])
    p = zfsng("backup", "restore", os.path.join(repo, m["id"]), "%s:%s" % (pool, w["key"]))
    assert p.returncode == 1 and "active" in p.stderr
    vol_lib.deactivate_device(pool, w["key"])
