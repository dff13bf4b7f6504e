"""`zfs-ng backup` on real ZFS: full, then incrementals from CBT (zfs send
headers) after writes, 64 KiB-crossing writes and discards; every point
restored (into a file and into a new zvol) and compared byte for byte with a
snapshot taken at that point; anchors turned into bookmarks; kill -9 during a
backup, then resume; bytes read for a 1% change of a 1 GiB volume."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import Dev, make_vol, run, wait_for_path
from sr_tools.backup import engine

K = 1024
G = 64 * K
MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def zfsng(*args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.update(kw.pop("env", {}))
    return subprocess.run([sys.executable, "-m", "sr_tools"] + list(args), cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, **kw)


def ok(*args):
    p = zfsng(*args)
    if p.returncode != 0:
        pytest.fail("zfs-ng %s: %d\n%s%s" % (" ".join(args), p.returncode, p.stdout, p.stderr))
    assert "Traceback" not in p.stderr
    return json.loads(p.stdout) if "--json" in args else p


def point(ds, name):
    """A test snapshot of this moment (the volume is idle) and its device."""
    run("zfs", "snapshot", "%s@%s" % (ds, name))
    return wait_for_path("/dev/zvol/%s@%s" % (ds, name))


def cmp(a, b):
    p = subprocess.run(["cmp", a, b], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True)
    assert p.returncode == 0, p.stdout + p.stderr


def aligned(ranges):
    blocks = set()
    for s, e in ranges:
        blocks.update(range(s // G, -(-e // G)))
    return len(blocks) * G


def test_full_incr_incr_restore_verify(zpool, tmp_path):
    size = 48 * MiB
    ds, dev_path = make_vol(zpool, "vol", size)
    repo = str(tmp_path / "repo")
    dev = Dev(dev_path)
    blob = os.urandom(MiB)
    dev.write(0, blob)
    dev.write(10 * MiB, blob[:300 * K])
    dev.write(40 * MiB, b"\x5a" * (2 * MiB))
    dev.close()
    snaps = [point(ds, "t0")]
    full = ok("backup", "full", ds, repo, "--json")
    assert full["kind"] == "full" and full["anchor"].startswith(ds + "#zfsng-cbt-backup-")
    assert full["bytes_read"] == aligned([(0, MiB), (10 * MiB, 10 * MiB + 300 * K),
                                          (40 * MiB, 42 * MiB)])
    # the anchor is a bookmark now, the snapshot is gone, no clone left behind
    names = run("zfs", "list", "-H", "-o", "name", "-t", "all", "-r", zpool).stdout
    assert "@zfsng-cbt-backup-" not in names and ".zfsng-bk-" not in names
    assert full["anchor"] in run("zfs", "list", "-H", "-o", "name", "-t", "bookmark",
                                 ds).stdout

    dev = Dev(dev_path)
    ch1 = [(5 * MiB + 4 * K, 5 * MiB + 8 * K), (12 * MiB - 10 * K, 12 * MiB + 70 * K),
           (10 * MiB + 64 * K, 10 * MiB + 192 * K)]
    dev.write(5 * MiB + 4 * K, blob[:4 * K])
    dev.write(12 * MiB - 10 * K, blob[:80 * K])                # crosses 64 KiB blocks
    dev.discard(10 * MiB + 64 * K, 128 * K)                     # discard inside old data
    dev.close()
    snaps.append(point(ds, "t1"))
    inc1 = ok("backup", "incr", ds, repo, "--json")
    assert inc1["parent"] == full["id"]
    assert inc1["bytes_read"] == aligned(ch1), inc1

    dev = Dev(dev_path)
    ch2 = [(40 * MiB + 100, 40 * MiB + 100 + 200 * K), (47 * MiB, 48 * MiB), (0, MiB)]
    dev.write(40 * MiB + 100, blob[:200 * K])
    dev.write(47 * MiB, blob)
    dev.discard(0, MiB)
    dev.close()
    snaps.append(point(ds, "t2"))
    inc2 = ok("backup", "incr", ds, repo, "--json", "--keep-snapshot")
    assert inc2["parent"] == inc1["id"]
    assert inc2["bytes_read"] == aligned(ch2), inc2
    assert inc2["anchor"].startswith(ds + "@zfsng-cbt-backup-")      # kept

    v = ok("backup", "verify", inc2["dir"], "--json")
    assert v["ok"] and v["backups"] == [full["id"], inc1["id"], inc2["id"]]
    for i, b in enumerate((full, inc1, inc2)):
        out = str(tmp_path / ("r%d.img" % i))
        r = engine.restore(b["dir"], out)     # in process: the CLI path is the same code
        assert r["chain"] == [x["id"] for x in (full, inc1, inc2)[:i + 1]]
        assert os.path.getsize(out) == size
        cmp(out, snaps[i])
    # into a new zvol, the way a volume is rebuilt
    r = ok("backup", "restore", inc1["dir"], "%s/restored" % zpool, "--zvol", "--json")
    cmp(r["target"], snaps[1])
    # restoring over an existing zvol overwrites everything (old data discarded)
    r = engine.restore(full["dir"], r["target"])
    cmp(r["target"], snaps[0])


def test_kill_during_backup_then_resume(zpool, tmp_path):
    size = 32 * MiB
    ds, dev_path = make_vol(zpool, "big", size)
    dev = Dev(dev_path)
    base = os.urandom(MiB)
    for i in range(24):
        dev.write(i * MiB, bytes([i]) * 16 + base[16:])
    dev.close()
    ref = point(ds, "ref")
    repo = str(tmp_path / "repo")
    env = dict(os.environ, PYTHONPATH=ROOT, ZFSNG_BACKUP_CHECKPOINT_BYTES=str(MiB))
    proc = subprocess.Popen([sys.executable, "-m", "sr_tools", "backup", "full", ds, repo,
                             "--json"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    done = 0
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        for d in os.listdir(repo) if os.path.isdir(repo) else []:
            try:
                with open(os.path.join(repo, d, "manifest.json")) as f:
                    done = json.load(f)["done"]
            except (OSError, ValueError):
                pass
        if done >= 32:            # at least 2 MiB recorded
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the backup ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (bid,) = os.listdir(repo)
    with open(os.path.join(repo, bid, "manifest.json")) as f:
        m = json.load(f)
    assert m["state"] == "running" and m["done"] >= 32
    # the interrupted backup's clone is still there; an incr refuses to start meanwhile
    assert ".zfsng-bk-" + bid in run("zfs", "list", "-H", "-o", "name", "-r", zpool).stdout
    p = zfsng("backup", "incr", ds, repo)
    assert p.returncode == 1 and "interrupted full backup" in p.stderr
    s = ok("backup", "full", ds, repo, "--json")
    assert s["id"] == bid and s["resumed_at_chunk"] == m["done"]
    # the second run read what the first did not checkpoint, nothing before it
    again = s["bytes_read"] - m["stats"]["bytes_read"]
    assert again == 24 * MiB - m["done"] * G
    names = run("zfs", "list", "-H", "-o", "name", "-r", zpool).stdout
    assert ".zfsng-bk-" not in names
    assert engine.verify(s["dir"])["ok"]
    out = str(tmp_path / "r.img")
    engine.restore(s["dir"], out)
    cmp(out, ref)
    print("resume: killed at chunk %d of %d; first run read %d bytes, the resumed one %d"
          % (m["done"], 24 * 16, m["stats"]["bytes_read"], again))


def test_one_percent_of_1gib(zpool, tmp_path):
    size = 1 << 30
    ds, dev_path = make_vol(zpool, "gig", size)
    dev = Dev(dev_path)
    blob = os.urandom(MiB)
    for i in range(0, 16):                       # 16 MiB of data spread over the volume
        dev.write(i * 64 * MiB, blob)
    dev.close()
    repo = str(tmp_path / "repo")
    full = ok("backup", "full", ds, repo, "--json")
    assert full["bytes_read"] == 16 * MiB
    rnd = random.Random(1)
    dev = Dev(dev_path)
    changed = []
    for blk in rnd.sample(range(size // G), size // G // 100):     # 1% of the 64 KiB blocks
        off = blk * G + rnd.randrange(0, G - 4 * K)
        dev.write(off, blob[:4 * K])
        changed.append((off, off + 4 * K))
    dev.close()
    t0 = time.time()
    inc = ok("backup", "incr", ds, repo, "--json")
    secs = time.time() - t0
    assert inc["bytes_read"] == aligned(changed)
    assert engine.verify(inc["dir"], chain=False)["ok"]
    print("1%% of 1 GiB: incr read %d bytes (%.2f%% of the volume), zfs send stream %s bytes,"
          " %.1f s (full read %d bytes)" % (inc["bytes_read"], 100.0 * inc["bytes_read"] / size,
                                            inc["cbt_stream_bytes"], secs, full["bytes_read"]))
